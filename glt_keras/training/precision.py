"""Training precision: ``float32`` or Keras ``mixed_bfloat16`` (bfloat16 compute, float32
variables and optimizer state), and ``auto``, which picks bfloat16 only where it is fast.

Why bfloat16 suits these networks: a binary convolution multiplies +-1 activations by +-1
weights, both exact in bfloat16, and oneDNN accumulates in float32; on CPUs with AVX512-BF16
or AMX the convolutions then run several times faster. What must stay float32:

- the input encodings (``layers/encoding.py``): bfloat16 has 8 significant bits, so the
  thermometer's half-integer thresholds above 128 (e.g. 170.5) do not exist in it;
- the head's BatchNorm and pooling (``layers/blocks.py``): the logits that the loss and
  the softmax see;
- the latent weights, BatchNorm statistics and Adam state (Keras keeps variables float32).

Those layers carry ``dtype="float32"`` in every precision, so a float32 model is built and
computes exactly as before.

A float32-trained model built under ``mixed_bfloat16`` computes the same +-1 activations in
every layer, and the same logits (tests/test_precision.py; the zoo's vww_binary and
cifar10_binary: identical logits on all 500 / 10,000 evaluation images). Why:

- a binary conv's sum of K = kh * kw * cin / groups products of +-1 is an integer with the
  parity of K (the padding is +1 too); oneDNN accumulates in float32 and rounds once to
  bfloat16, which holds every integer up to 256 and every even one up to 512: exact for
  every layer with K <= 512. Wider layers (3x3 on 64 channels per group: K = 576) round sums
  beyond +-512 to a multiple of 4; the zoo models' largest sums are 332 (vww_binary) and
  274 (cifar10_binary);
- BatchNorm computes in float32 and rounds its output (keeping the sign); max-pooling and
  shuffles move rounded values around, which keeps their signs;
- where this machine's bfloat16 conv is wrong, the conv computes in float32.
  ``BinaryConv2D`` checks its own shape once, when built (``_bf16_conv_is_exact``): with AMX,
  oneDNN (TensorFlow 2.16) got ~97 % of the sums of glt96's 4x4 stride-4 conv on 24 thermometer
  planes wrong (also 6x6 / 8x8 stride >= 4 convs on 8-28 channels; its backward convs were
  right), which took vww_binary from 75.8 % to 50.8 % under bfloat16. Only the training model is built under the policy: weights files
hold float32 variables, and eval / conversion / export rebuild the float32 network.
"""
from __future__ import annotations

import contextlib

from .._cpu import bf16_is_fast

PRECISIONS = ("float32", "mixed_bfloat16", "auto")


def resolve(precision: str | None) -> str:
    """``float32`` / ``mixed_bfloat16``; ``auto`` -> bfloat16 where :func:`bf16_is_fast`; ``None`` -> float32."""
    precision = precision or "float32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
    if precision == "auto":
        return "mixed_bfloat16" if bf16_is_fast() else "float32"
    return precision


@contextlib.contextmanager
def policy(precision: str | None):
    """Build layers under the Keras mixed-precision policy of ``precision`` (resolved), then
    restore the previous global policy. Yields the resolved name."""
    import tensorflow as tf

    name = resolve(precision)
    previous = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy(name)
    try:
        yield name
    finally:
        tf.keras.mixed_precision.set_global_policy(previous)
