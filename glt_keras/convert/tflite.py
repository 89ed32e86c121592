"""Keras model -> LCE TFLite flatbuffer, inspected, verified and written atomically."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .._io import atomic_write
from .inspect import InspectReport, _check_budget, inspect_flatbuffer, iter_layers
from .verify import VerificationError, VerifyResult, check_images, keras_predict, verify_tflite

TARGETS = ("arm", "xcore")
#: Raw pixels 0..255 as int8 with scale 1 and zero point -128.
PIXEL_RANGE = (0.0, 255.0)
#: Headroom over the largest calibration output when choosing an int8 output range.
OUTPUT_RANGE_HEADROOM = 1.25
KERAS_MODEL_SUFFIXES = (".h5", ".hdf5", ".keras")


class ConversionError(ValueError):
    """LCE could not convert the model (``.log`` holds the converter's output)."""

    def __init__(self, message: str, log: str = ""):
        super().__init__(message)
        self.log = log


class StrictConversionError(ValueError):
    """``strict=True`` and some convolution stayed float (``.result`` holds the full result)."""

    def __init__(self, message: str, result: "ConversionResult"):
        super().__init__(message)
        self.result = result


@dataclass
class ConversionResult:
    flatbuffer: bytes
    report: InspectReport
    verification: Optional[VerifyResult]
    path: Optional[Path]

    def to_markdown(self, title: str = "TFLite model report") -> str:
        text = self.report.to_markdown(title)
        if self.path is not None:
            text = text.replace("\n\n", f"\n\n- written to `{self.path}`\n", 1)
        if self.verification is not None:
            text += "\n" + self.verification.to_markdown()
        return text

    def to_dict(self) -> dict:
        return {
            "path": str(self.path) if self.path else None,
            "report": self.report.to_dict(),
            "verification": self.verification.to_dict() if self.verification else None,
        }


# ---------------------------------------------------------------------------------------
# Loading and preparing the Keras model
# ---------------------------------------------------------------------------------------
def load_keras_model(path):
    """Load a saved Keras model (``.h5`` / ``.keras`` / SavedModel folder) with glt_keras layers."""
    import tensorflow as tf

    from ..models import custom_objects

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No such model file: {path}")
    if path.is_file() and path.suffix.lower() not in KERAS_MODEL_SUFFIXES:
        raise ValueError(
            f"{path}: expected a saved Keras model ({', '.join(KERAS_MODEL_SUFFIXES)} or a "
            f"SavedModel folder), got a {path.suffix or 'suffix-less'} file."
        )
    try:
        with tf.keras.utils.custom_object_scope(custom_objects()):
            model = tf.keras.models.load_model(str(path), compile=False)
    except Exception as err:
        raise ValueError(f"Cannot load a Keras model from {path}: {type(err).__name__}: {err}") from err
    if not isinstance(model, tf.keras.Model):
        raise ValueError(f"{path} holds a {type(model).__name__}, not a Keras model.")
    return model


def has_split_groups(model) -> bool:
    from ..layers.binary import BinaryConv2D

    return any(isinstance(l, BinaryConv2D) and l.groups > 1 and l.split_groups for l in iter_layers(model))


def _non_float32(model) -> bool:
    policies = [getattr(model, "dtype_policy", None)] + [getattr(l, "dtype_policy", None)
                                                        for l in iter_layers(model)]
    return any(p is not None and p.name != "float32" for p in policies)


def float32_copy(model):
    """The same model and weights with every layer in float32 (TFLite has no bfloat16 path)."""
    import tensorflow as tf

    from ..models import custom_objects

    config = model.get_config()
    for layer in config.get("layers", ()):
        if "dtype" in layer.get("config", {}):
            layer["config"]["dtype"] = "float32"
    previous = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy("float32")
    try:
        with tf.keras.utils.custom_object_scope(custom_objects()):
            clone = model.__class__.from_config(config)
    finally:
        tf.keras.mixed_precision.set_global_policy(previous)
    clone.set_weights(model.get_weights())
    return clone


def prepare_for_lce(model):
    """float32 + native grouped convolutions (``glt_keras.models.for_export``) when needed."""
    if _non_float32(model):
        model = float32_copy(model)
    if has_split_groups(model):
        from ..models import for_export

        model = for_export(model)
    return model


def default_images(input_shape, n: int = 16, seed: int = 0) -> np.ndarray:
    """Verification pixels: uniform noise plus black, white, grey and a gradient image."""
    h, w, c = (int(d) for d in input_shape)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, h, w, c)).astype(np.uint8)
    if n >= 4:
        images[-4] = 0
        images[-3] = 255
        images[-2] = 128
        ramp = np.linspace(0, 255, w, dtype=np.float32)
        images[-1] = np.broadcast_to(ramp[None, :, None], (h, w, c)).astype(np.uint8)
    return images


def _output_is_probability(model) -> bool:
    import tensorflow as tf

    last = model.layers[-1]
    if isinstance(last, tf.keras.layers.Softmax):
        return True
    activation = getattr(last, "activation", None)
    return getattr(activation, "__name__", "") in ("softmax", "sigmoid")


def _check_range(value, name):
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (min, max) pair of numbers, got {value!r}.") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise ValueError(f"{name} must satisfy min < max (finite), got {value!r}.")
    if lo > 0 or hi < 0:
        raise ValueError(f"{name} must contain 0 (int8 represents 0 exactly), got {value!r}.")
    return lo, hi


def with_int8_io(model, *, input_range=PIXEL_RANGE, output_range):
    """Wrap ``model`` between two 8-bit fake-quant ops, so LCE can give it int8 I/O.

    With ``input_range=(0, 255)`` the int8 input is the raw pixel minus 128 (scale 1, zero
    point -128).
    """
    import tensorflow as tf

    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError("int8 I/O needs a single-input, single-output model.")
    lo, hi = input_range
    olo, ohi = output_range
    inputs = tf.keras.Input(model.input_shape[1:], name="pixels_int8")
    x = tf.quantization.fake_quant_with_min_max_args(inputs, min=lo, max=hi, num_bits=8)
    y = model(x)
    y = tf.quantization.fake_quant_with_min_max_args(y, min=olo, max=ohi, num_bits=8)
    return tf.keras.Model(inputs, y, name=f"{model.name}_int8_io")


# ---------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def _capture_native_stderr():
    """Collect what C++ code (the MLIR converter) prints on file descriptor 2."""
    captured: list = []
    try:
        sys.stderr.flush()
    except Exception:
        pass
    saved = os.dup(2)
    tmp = tempfile.TemporaryFile()
    os.dup2(tmp.fileno(), 2)
    try:
        yield captured
    finally:
        try:
            sys.stderr.flush()
        except Exception:
            pass
        os.dup2(saved, 2)
        os.close(saved)
        tmp.seek(0)
        captured.append(tmp.read().decode("utf-8", errors="replace"))
        tmp.close()


_MESSAGE = re.compile(r"\b(error|warning): (.*)")


def _converter_messages(log: str) -> list:
    seen, out = set(), []
    for line in log.splitlines():
        m = _MESSAGE.search(line)
        if m and not line.startswith("WARNING:"):
            text = f"{m.group(1)}: {m.group(2).strip()}"[:300]
            if text not in seen:
                seen.add(text)
                out.append(text)
    return out


def convert(model, *, int8_io: bool = False, target: str = "arm") -> tuple[bytes, list]:
    """``larq_compute_engine.convert_keras_model`` with the converter's messages collected."""
    import larq_compute_engine as lce
    import tensorflow as tf

    io_type = tf.int8 if int8_io else tf.float32
    with warnings.catch_warnings(record=True) as caught, _capture_native_stderr() as log:
        warnings.simplefilter("always")
        try:
            fb = lce.convert_keras_model(
                model, inference_input_type=io_type, inference_output_type=io_type, target=target
            )
            error = None
        except Exception as err:  # noqa: BLE001 - re-raised below with the converter log
            fb, error = None, err
    text = "".join(log)
    messages = _converter_messages(text)
    messages += [f"warning: {w.message}" for w in caught if "larq_compute_engine" in (w.filename or "")]
    if error is not None:
        tail = "\n".join(text.strip().splitlines()[-15:])
        raise ConversionError(
            f"LCE conversion failed: {type(error).__name__}: {error}\nconverter output (last lines):\n{tail}",
            text,
        ) from error
    return bytes(fb), messages


def _strict_message(report: InspectReport) -> str:
    lines = [f"{len(report.float_convs)} convolution(s) did not become LceBconv2d (strict=True):"]
    for c in report.float_convs:
        layer = f"layer {c.layer!r}" if c.layer else "unmatched layer"
        lines.append(f"  - {c.op} {c.weight_shape} ({layer}): {'; '.join(c.reasons) or 'unknown reason'}")
    return "\n".join(lines)


def to_tflite(
    model,
    path=None,
    *,
    int8_io: bool = False,
    target: str = "arm",
    verify: bool = True,
    verify_images=None,
    strict: bool = False,
    tolerance: Optional[float] = None,
    flash_budget: Optional[int] = None,
    min_argmax_agreement: float = 1.0,
    input_range=PIXEL_RANGE,
    output_range=None,
    strip_strings: bool = False,
) -> ConversionResult:
    """Convert a Keras model to an LCE flatbuffer, inspect it, verify it, and write it.

    Args:
        model: a Keras model, or the path of a saved one (``.h5``, ``.keras``, SavedModel
            folder). Split-group ``BinaryConv2D`` layers are switched to native groups with
            :func:`glt_keras.models.for_export`; mixed-precision models are cast to float32.
        path: where to write the ``.tflite`` (atomically), or ``None``.
        int8_io: int8 input and output. The input is raw pixels as int8 with scale 1 and zero
            point -128 (``pixel - 128``; set by ``input_range=(0, 255)``); the output range
            is ``output_range``, by default ``(0, 1)`` after a softmax, else
            ``+-1.25 * max |output|`` over ``verify_images`` (or the default random images).
        target: ``"arm"`` or ``"xcore"``.
        verify: run the flatbuffer in the LCE interpreter and compare with Keras
            (:func:`verify_tflite`) on ``verify_images`` (default: 16 random/synthetic pixel
            images); raises :class:`VerificationError` past ``tolerance``.
        strict: raise :class:`StrictConversionError` when any convolution stayed float.
        tolerance: see :func:`verify_tflite` (``None``: automatic).
        flash_budget: bytes of flash available; the report says whether the model fits.
        strip_strings: drop the strings a device does not need (tensor names, signature
            defs, model description; TFLite's ``flatbuffer_utils.strip_strings``): ~2-3 KB
            less on the zoo models. Inputs and outputs are then found by index only, and the
            report's tensor names are empty. Verification runs on the stripped flatbuffer.

    Returns:
        :class:`ConversionResult` (``flatbuffer``, ``report``, ``verification``, ``path``).

    Example:
        >>> from glt_keras.models import glt_net
        >>> model = glt_net(input_shape=(96, 96, 3), num_classes=2)  # doctest: +SKIP
        >>> result = to_tflite(model, "person.tflite", strict=True)  # doctest: +SKIP
        >>> print(result.report.to_markdown())  # doctest: +SKIP
    """
    import tensorflow as tf

    # -- validate the options before the (slow) conversion --------------------------------
    if target not in TARGETS:
        raise ValueError(f"Unknown target {target!r}: choose one of {', '.join(TARGETS)}.")
    for flag, value in dict(int8_io=int8_io, verify=verify, strict=strict, strip_strings=strip_strings).items():
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{flag} must be True or False, got {value!r}.")
    if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
                                  or not np.isfinite(tolerance) or tolerance < 0):
        raise ValueError(f"tolerance must be a finite number >= 0 (or None for automatic), got {tolerance!r}.")
    if isinstance(min_argmax_agreement, bool) or not isinstance(min_argmax_agreement, (int, float)) \
            or not 0 <= min_argmax_agreement <= 1:
        raise ValueError(f"min_argmax_agreement must be in [0, 1], got {min_argmax_agreement!r}.")
    if flash_budget is not None:
        flash_budget = _check_budget(flash_budget)
    input_range = _check_range(input_range, "input_range")
    if output_range is not None:
        output_range = _check_range(output_range, "output_range")
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"path {path} is a directory; give a file name such as model.tflite.")

    if isinstance(model, (str, os.PathLike)):
        model = load_keras_model(model)
    if not isinstance(model, tf.keras.Model):
        raise ValueError(f"Expected a Keras model or a path to a saved one, got {type(model).__name__}.")
    if len(model.inputs) != 1:
        raise ValueError(f"Expected a single-input model, {model.name} has {len(model.inputs)} inputs.")
    input_shape = tuple(model.input_shape[1:])
    if any(d is None for d in input_shape):
        raise ValueError(f"The model input shape must be fully known (except the batch), got {input_shape}.")

    images = None
    if verify_images is not None:
        images = check_images(verify_images, input_shape, name="verify_images")
    elif verify or (int8_io and output_range is None):
        images = default_images(input_shape).astype(np.float32)

    # -- convert -------------------------------------------------------------------------
    export = prepare_for_lce(model)
    to_convert = export
    if int8_io:
        if output_range is None:
            if _output_is_probability(export):
                output_range = (0.0, 1.0)
            else:
                peak = float(np.max(np.abs(keras_predict(model, images))))
                bound = max(peak * OUTPUT_RANGE_HEADROOM, 1e-3)
                output_range = (-bound, bound)
        to_convert = with_int8_io(export, input_range=input_range, output_range=output_range)
    fb, messages = convert(to_convert, int8_io=int8_io, target=target)
    if strip_strings:
        fb = strip_flatbuffer_strings(fb)

    report = inspect_flatbuffer(fb, keras_model=export, flash_budget=flash_budget,
                                converter_messages=messages)
    if int8_io:
        report.notes.append(
            f"int8 I/O: input range {input_range} -> scale/zero point in the inputs above; "
            f"output range {tuple(round(v, 4) for v in output_range)}"
        )
    result = ConversionResult(fb, report, None, None)
    if strict and report.float_convs:
        raise StrictConversionError(_strict_message(report), result)

    if verify:
        try:
            result.verification = verify_tflite(
                fb, model, images, tolerance=tolerance, min_argmax_agreement=min_argmax_agreement
            )
        except VerificationError as err:
            result.verification = err.result
            err.conversion = result
            raise

    if path is not None:
        result.path = atomic_write(path, fb)
    return result


def strip_flatbuffer_strings(fb: bytes) -> bytes:
    """``fb`` without the strings a device does not need (tensor names, signature defs, model
    description; TFLite's ``flatbuffer_utils.strip_strings``). Custom op codes stay, so the
    LCE interpreter runs it unchanged: ``to_tflite(..., strip_strings=True)`` verifies that."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(fb))
    flatbuffer_utils.strip_strings(model)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def conversion_result_json(result: ConversionResult) -> dict:
    """JSON-safe dict of a result (without the flatbuffer bytes)."""
    return _json_safe(result.to_dict())


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if dataclasses.is_dataclass(value):
        return _json_safe(dataclasses.asdict(value))
    return value
