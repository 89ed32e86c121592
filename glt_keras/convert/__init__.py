"""Keras -> Larq Compute Engine TFLite: convert, inspect, verify, C array.

    >>> from glt_keras.convert import to_tflite
    >>> result = to_tflite(model, "model.tflite", strict=True)  # doctest: +SKIP
    >>> print(result.to_markdown())  # doctest: +SKIP
"""
from .c_array import write_c_array
from .inspect import InspectReport, inspect_flatbuffer
from .sign_ties import SignTie, separate_sign_ties, sign_ties
from .tflite import (
    ConversionError,
    ConversionResult,
    StrictConversionError,
    strip_flatbuffer_strings,
    to_tflite,
)
from .verify import VerificationError, VerifyResult, verify_tflite

__all__ = [
    "to_tflite",
    "strip_flatbuffer_strings",
    "inspect_flatbuffer",
    "verify_tflite",
    "sign_ties",
    "separate_sign_ties",
    "SignTie",
    "write_c_array",
    "VerificationError",
    "StrictConversionError",
    "ConversionError",
    "ConversionResult",
    "InspectReport",
    "VerifyResult",
]
