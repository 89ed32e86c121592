"""Keras layers of glt-keras: input encodings, binary convolutions and blocks."""
from tensorflow.python.autograph.core import config as _autograph_config

# AutoGraph skips the `keras` package but not `tf_keras`: without this rule the first
# fit / conversion of every process spends about a minute converting tf_keras code.
if not any(getattr(r, "_prefix", None) == "tf_keras" for r in _autograph_config.CONVERSION_RULES):
    _autograph_config.CONVERSION_RULES = _autograph_config.CONVERSION_RULES + (
        _autograph_config.DoNotConvert("tf_keras"),
    )

from . import ste as _ste  # noqa: E402

_ste.install()  # larq's straight-through gradients as a multiply (see ste.py for why)

from .binary import LCE_GROUP_CHANNELS, BinaryConv2D, ChannelShuffle  # noqa: E402
from .blocks import binary_head, conv_block  # noqa: E402
from .encoding import (  # noqa: E402
    BinaryPlanes,
    FixedThermometer,
    LearnedThermometer,
    RealInput,
    get_encoding,
    plot_transfer_curve,
)

__all__ = [
    "LCE_GROUP_CHANNELS", "BinaryConv2D", "ChannelShuffle", "binary_head", "conv_block",
    "BinaryPlanes", "FixedThermometer", "LearnedThermometer", "RealInput", "get_encoding",
    "plot_transfer_curve",
]
