"""Building blocks of the fully binarized networks: conv block and 1x1 binary head."""
from __future__ import annotations

import tensorflow as tf

from .binary import BinaryConv2D, ChannelShuffle

BN_MOMENTUM = 0.9
#: A binary conv's keywords for a real-valued kernel (no sign, no clip to [-1, 1]).
_REAL_KERNEL = {"kernel_quantizer": None, "kernel_constraint": None}


def conv_block(
    x,
    filters: int,
    *,
    name: str,
    kernel_size: int = 3,
    strides: int = 1,
    padding: str = "same",
    groups: int = 1,
    pool: bool = False,
    shuffle: bool = False,
    precision: str = "binary",
    split_groups: bool = True,
    input_quantizer: str = "ste_sign",
    binary_weights: bool = True,
    shortcut: bool = False,
    binary_input: bool = False,
):
    """Conv -> BatchNorm [+ shortcut] [-> MaxPool 2x2] [-> channel shuffle].

    ``precision="binary"``: a :class:`BinaryConv2D`; its +-1 output activation is the
    next layer's input quantizer, so BN fuses into ``LceBconv2d`` and a MaxPool followed
    by the next sign becomes ``LceBMaxPool2d``. ``precision="real"``: the same conv
    unquantized (zero padding), with a ReLU after BN: the teacher twin and MixBin's
    real-valued layers. ``input_quantizer``: the binary conv's activation sign (its forward
    is always the sign; the quantizers differ in their backward pass). ``binary_weights=False``:
    a binary block whose kernel stays real-valued (binary activations only), the first step of
    a two-step training. ``shortcut=True``: the block's real-valued input is added to its BN
    output before pooling (Bi-Real Net's shortcut, Liu et al. 2018), repeated along channels when
    the block widens; no weights, so the block's bytes do not change. ``binary_input=True``: the
    block's input is exactly +-1 (the thermometer's planes), so training skips its sign
    (:meth:`BinaryConv2D.call`).
    """
    if precision not in ("binary", "real"):
        raise ValueError(f"{name}: precision must be 'binary' or 'real', got {precision!r}.")
    common = dict(groups=groups, strides=strides, padding=padding, split_groups=split_groups, name=f"{name}_conv")
    if precision == "binary":
        conv = BinaryConv2D(filters, kernel_size, input_quantizer=input_quantizer, binary_input=binary_input,
                            **({} if binary_weights else _REAL_KERNEL), **common)
    else:
        conv = BinaryConv2D(
            filters,
            kernel_size,
            input_quantizer=None,
            pad_values=0.0,
            lce_check=False,
            **_REAL_KERNEL,
            **common,
        )
    block_input = x
    x = conv(x)
    x = tf.keras.layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=1e-5, name=f"{name}_bn")(x)
    if shortcut:
        x = tf.keras.layers.Add(name=f"{name}_add")([x, _widened(block_input, filters, strides, name)])
    if precision == "real":
        x = tf.keras.layers.ReLU(name=f"{name}_relu")(x)
    if pool:
        x = tf.keras.layers.MaxPool2D(2, name=f"{name}_pool")(x)
    if shuffle and groups > 1:
        x = ChannelShuffle(groups, name=f"{name}_shuffle")(x)
    return x


def shortcut_fits(in_channels: int, filters: int, strides: int = 1) -> bool:
    """Whether a weight-free shortcut can join a block's input to its output: same
    resolution, and the output width a whole multiple of the input width."""
    return strides == 1 and filters % in_channels == 0


def _widened(x, filters: int, strides: int, name: str):
    """``x`` repeated along channels to ``filters`` (a block that doubles its width adds its
    input to both halves)."""
    channels = int(x.shape[-1])
    if not shortcut_fits(channels, filters, strides):
        raise ValueError(f"{name}: no weight-free shortcut from {channels} channels to {filters} "
                         f"at stride {strides} (the width must be a multiple of {channels}, stride 1).")
    if filters == channels:
        return x
    return tf.keras.layers.Concatenate(name=f"{name}_widen")([x] * (filters // channels))


def binary_head(x, num_classes: int, *, precision: str = "binary", classifier_activation="softmax",
                input_quantizer: str = "ste_sign", binary_weights: bool = True):
    """Classifier: 1x1 binary conv to one map per class -> BN -> global average pooling.

    A 1x1 ``QuantConv2D`` instead of ``QuantDense``, which LCE does not accelerate.
    Pooling comes last so that every location votes; the average of a (H, W,
    classes) map is a negligible float op.

    The head computes in float32 under any precision policy (``dtype="float32"``; a no-op
    in a float32 model): under ``mixed_bfloat16`` the logits the loss sees are not rounded
    to bfloat16, and the head is a few thousand MACs.
    """
    if precision == "binary":
        conv = BinaryConv2D(num_classes, 1, input_quantizer=input_quantizer, lce_check=False, dtype="float32",
                            name="head_conv", **({} if binary_weights else _REAL_KERNEL))
    else:
        conv = BinaryConv2D(
            num_classes, 1, input_quantizer=None, pad_values=0.0, lce_check=False, dtype="float32",
            name="head_conv", **_REAL_KERNEL,
        )
    x = conv(x)
    x = tf.keras.layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=1e-5, dtype="float32", name="head_bn")(x)
    x = tf.keras.layers.GlobalAveragePooling2D(dtype="float32", name="head_pool")(x)
    if classifier_activation:
        x = tf.keras.layers.Activation(classifier_activation, dtype="float32", name="predictions")(x)
    return x
