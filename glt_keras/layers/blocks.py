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
):
    """Conv -> BatchNorm [-> MaxPool 2x2] [-> channel shuffle].

    ``precision="binary"``: a :class:`BinaryConv2D`; its +-1 output activation is the
    next layer's input quantizer, so BN fuses into ``LceBconv2d`` and a MaxPool followed
    by the next sign becomes ``LceBMaxPool2d``. ``precision="real"``: the same conv
    unquantized (zero padding), with a ReLU after BN: the teacher twin and MixBin's
    real-valued layers. ``input_quantizer``: the binary conv's activation sign (its forward
    is always the sign; the quantizers differ in their backward pass). ``binary_weights=False``:
    a binary block whose kernel stays real-valued (binary activations only), the first step of
    a two-step training.
    """
    if precision not in ("binary", "real"):
        raise ValueError(f"{name}: precision must be 'binary' or 'real', got {precision!r}.")
    common = dict(groups=groups, strides=strides, padding=padding, split_groups=split_groups, name=f"{name}_conv")
    if precision == "binary":
        conv = BinaryConv2D(filters, kernel_size, input_quantizer=input_quantizer,
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
    x = conv(x)
    x = tf.keras.layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=1e-5, name=f"{name}_bn")(x)
    if precision == "real":
        x = tf.keras.layers.ReLU(name=f"{name}_relu")(x)
    if pool:
        x = tf.keras.layers.MaxPool2D(2, name=f"{name}_pool")(x)
    if shuffle and groups > 1:
        x = ChannelShuffle(groups, name=f"{name}_shuffle")(x)
    return x


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
