"""The learning-rate schedule (warm-up then cosine) and the optimizer of a recipe's
training settings (larq CaseOptimizer: one Adam for latent binary weights, one optimizer for
the rest: Adam, or SGD with Nesterov momentum for real-valued teachers; optional weight decay)."""
from __future__ import annotations

import math

import larq as lq
import tensorflow as tf


@tf.keras.utils.register_keras_serializable(package="glt_keras")
class WarmupCosine(tf.keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to ``peak`` over ``warmup_steps``, then cosine decay to ``peak * min_fraction``."""

    def __init__(self, peak, total_steps, warmup_steps=0, min_fraction=0.01):
        self.peak = float(peak)
        self.total_steps = int(max(1, total_steps))
        self.warmup_steps = int(warmup_steps)
        self.min_fraction = float(min_fraction)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warm = self.peak * (step + 1.0) / max(1, self.warmup_steps)
        progress = tf.clip_by_value(
            (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps), 0.0, 1.0
        )
        cosine = 0.5 * (1.0 + tf.cos(math.pi * progress))
        decayed = self.peak * (self.min_fraction + (1.0 - self.min_fraction) * cosine)
        return tf.where(step < self.warmup_steps, warm, decayed)

    def get_config(self):
        return dict(peak=self.peak, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                    min_fraction=self.min_fraction)


def make_optimizer(training: dict, steps_per_epoch: int, epochs: int, model=None):
    """Larq CaseOptimizer: Adam on latent binary weights, ``training.optimizer`` on the
    real-valued rest (``adam``, or ``sgd``: Nesterov momentum ``training.momentum``).

    A ``model`` without binary weights (a real-valued teacher) gets the real-valued optimizer
    alone: larq's CaseOptimizer refuses an optimizer that claims no variable.
    ``training.weight_decay`` > 0 (needs ``model``) adds ``weight_decay * w`` to the gradient
    of every real-valued conv / dense kernel (:func:`weight_decay_transform`)."""
    total = steps_per_epoch * epochs
    warmup = int(training.get("warmup_epochs", 0) * steps_per_epoch)
    floor = training.get("min_lr_fraction", 0.01)
    kind = training.get("optimizer", "adam")
    decay = float(training.get("weight_decay", 0.0) or 0.0)
    if decay and model is None:
        raise ValueError("training.weight_decay needs the model (make_optimizer(..., model=model)).")
    transformers = [weight_decay_transform(model, decay)] if decay else []
    real_schedule = WarmupCosine(training["real_lr"], total, warmup, floor)
    if kind == "adam":
        real = tf.keras.optimizers.legacy.Adam(real_schedule, gradient_transformers=transformers)
    elif kind == "sgd":
        real = tf.keras.optimizers.legacy.SGD(real_schedule, momentum=float(training.get("momentum", 0.9)),
                                              nesterov=True, gradient_transformers=transformers)
    else:
        raise ValueError(f"training.optimizer must be 'adam' or 'sgd', got {kind!r}.")
    if model is not None and not any(lq.optimizers.Bop.is_binary_variable(v) for v in model.trainable_variables):
        return real
    binary = tf.keras.optimizers.legacy.Adam(WarmupCosine(training["binary_lr"], total, warmup, floor))
    return lq.optimizers.CaseOptimizer((lq.optimizers.Bop.is_binary_variable, binary), default_optimizer=real)


def decayed_kernels(model) -> list:
    """The variables weight decay applies to: kernels of real-valued conv and dense layers
    (not latent binary weights, BatchNorm, biases or thermometer thresholds)."""
    kernels = []
    for layer in model.submodules:
        kernel = getattr(layer, "kernel", None)
        if (isinstance(layer, (tf.keras.layers.Conv2D, tf.keras.layers.Dense)) and kernel is not None
                and kernel.trainable and not lq.optimizers.Bop.is_binary_variable(kernel)):
            kernels.append(kernel)
    return kernels


def weight_decay_transform(model, weight_decay: float):
    """A legacy-optimizer gradient transformer: ``g + weight_decay * w`` for the kernels of
    :func:`decayed_kernels` (SGD's coupled weight decay, an L2 penalty ``weight_decay / 2 * |w|^2``),
    other gradients unchanged."""
    names = {v.name for v in decayed_kernels(model)}
    rate = float(weight_decay)

    def transform(grads_and_vars):
        return [(g + rate * tf.cast(v, g.dtype) if g is not None and v.name in names else g, v)
                for g, v in grads_and_vars]

    return transform
