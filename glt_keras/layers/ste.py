"""A faster backward pass for larq's straight-through sign estimators.

larq's ``ste_sign`` passes the gradient where ``|x| <= clip_value`` with
``tf.where(mask, dy, zeros_like(dy))``: a zeros tensor and a SelectV2 per quantizer. In a
cifar10_binary training step under ``mixed_bfloat16`` those selects took more time together
than all the forward convolutions (TensorFlow's bfloat16 SelectV2 has no vectorised CPU
kernel), and they were the slowest element-wise op in float32 too
(benchmarks/bench_training_throughput.py ``--recipe cifar10_binary --profile DIR``).
``dy * cast(mask)`` gives the same values (``0 * dy`` is ``-0.0`` where ``dy < 0``: equal to
``0.0`` in every sum, product and comparison that follows; a float32 training step gives
bit-identical weights, tests/test_precision.py) at ~0.4x the time of the select in float32
and ~0.3x in bfloat16 (one 128x16x16x64 tensor).

The forward pass is untouched (LCE converts the same ``sign`` pattern). larq is pinned
(setup.py); with a larq whose private helper has moved, :func:`install` warns and changes nothing.
"""
from __future__ import annotations

import tensorflow as tf


def clipped_gradient(x, dy, clip_value):
    """``dy`` where ``|x| <= clip_value``, else 0: larq's ``_clipped_gradient`` as a multiply."""
    if clip_value is None:
        return dy
    return dy * tf.cast(tf.math.less_equal(tf.math.abs(x), clip_value), dy.dtype)


@tf.custom_gradient
def approx_sign(x):
    """larq's ``approx_sign`` (Bi-Real Net: sign forward, ``2 - 2|x|`` inside ``[-1, 1]`` back)
    with the gradient as ``dy * relu(2 - 2|x|)`` instead of a ``tf.where``: the same values
    (``2 - 2|x| == (1 - |x|) * 2`` exactly: scaling by 2 is exact), one fewer select."""
    from larq import math as lq_math

    def grad(dy):
        return dy * tf.nn.relu(2.0 - 2.0 * tf.math.abs(x))

    return lq_math.sign(x), grad


def install() -> None:
    """Route every larq straight-through sign estimator (``ste_sign``, ``ste_heaviside``,
    ``ste_tern``, the thermometers') through :func:`clipped_gradient`, and ``approx_sign``
    through :func:`approx_sign`. Idempotent."""
    from larq import quantizers

    original = getattr(quantizers, "_clipped_gradient", None)
    if original is None:  # another larq: train with its own (slower, same-valued) gradient
        import warnings

        warnings.warn("larq.quantizers._clipped_gradient not found: glt_keras keeps larq's own "
                      "straight-through gradient (check glt_keras/layers/ste.py against this larq).")
        return
    if original is not clipped_gradient:
        quantizers._larq_clipped_gradient = original  # kept for tests comparing both
        quantizers._clipped_gradient = clipped_gradient
    if quantizers.approx_sign is not approx_sign:  # ApproxSign.call looks it up at each call
        quantizers._larq_approx_sign = quantizers.approx_sign
        quantizers.approx_sign = approx_sign
