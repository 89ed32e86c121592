"""The learning-rate schedule (warm-up then cosine) and the optimizer of a recipe's
training settings (larq CaseOptimizer: one Adam for latent binary weights, one for the rest)."""
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
    """Larq CaseOptimizer: Adam on latent binary weights, Adam on the real-valued rest.

    A ``model`` without binary weights (a real-valued teacher) gets the plain Adam:
    larq's CaseOptimizer refuses an optimizer that claims no variable."""
    total = steps_per_epoch * epochs
    warmup = int(training.get("warmup_epochs", 0) * steps_per_epoch)
    floor = training.get("min_lr_fraction", 0.01)
    binary = tf.keras.optimizers.legacy.Adam(WarmupCosine(training["binary_lr"], total, warmup, floor))
    real = tf.keras.optimizers.legacy.Adam(WarmupCosine(training["real_lr"], total, warmup, floor))
    if model is not None and not any(lq.optimizers.Bop.is_binary_variable(v) for v in model.trainable_variables):
        return real
    return lq.optimizers.CaseOptimizer((lq.optimizers.Bop.is_binary_variable, binary), default_optimizer=real)
