"""Check a converted model against its Keras original in the LCE interpreter."""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ._io import read_tflite


class VerificationError(ValueError):
    """The converted model disagrees with the Keras model (``.result`` holds the numbers)."""

    def __init__(self, message: str, result: "Optional[VerifyResult]" = None):
        super().__init__(message)
        self.result = result


@dataclass
class VerifyResult:
    """How closely the LCE interpreter reproduces the Keras model on some images."""

    n_images: int
    max_abs_diff: float
    mean_abs_diff: float
    tolerance: float
    #: fraction of images whose top class is the same
    argmax_agreement: float
    #: same, counting as agreement a different top class whose Keras score is within
    #: ``tolerance`` of the Keras maximum (a tie, e.g. from int8 output quantization)
    argmax_agreement_within_tolerance: float
    min_argmax_agreement: float
    passed: bool
    input_dtype: str
    output_dtype: str
    input_quantization: Optional[tuple] = None
    output_quantization: Optional[tuple] = None
    #: fraction of input values clipped by int8 input quantization
    input_clipped: float = 0.0
    #: set when every failing image has inputs on an effective thermometer threshold
    threshold_ties: Optional[str] = None

    @property
    def message(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"verification {verdict} on {self.n_images} images: max |tflite - keras| = "
            f"{self.max_abs_diff:.4g} (tolerance {self.tolerance:.4g}), mean {self.mean_abs_diff:.3g}; "
            f"top-1 agreement {self.argmax_agreement:.1%} "
            f"({self.argmax_agreement_within_tolerance:.1%} counting ties within tolerance, "
            f"required {self.min_argmax_agreement:.1%})"
        )

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["message"] = self.message
        return out

    def to_markdown(self) -> str:
        lines = ["### Verification (LCE interpreter vs Keras)", "", f"- {self.message}",
                 f"- input {self.input_dtype}" + (
                     f" (scale {self.input_quantization[0]:.6g}, zero point {self.input_quantization[1]})"
                     if self.input_quantization else ""),
                 f"- output {self.output_dtype}" + (
                     f" (scale {self.output_quantization[0]:.6g}, zero point {self.output_quantization[1]})"
                     if self.output_quantization else "")]
        if self.input_clipped:
            lines.append(f"- {self.input_clipped:.2%} of the input values were clipped by int8 quantization")
        if self.threshold_ties:
            lines.append(f"- {self.threshold_ties}")
        return "\n".join(lines) + "\n"


def lce_interpreter(fb, *, num_threads: int = 1, use_xnnpack: bool = False):
    """The LCE interpreter (indirect BGEMM, which grouped binary convolutions need)."""
    from larq_compute_engine.tflite.python.interpreter import Interpreter

    fb, source = read_tflite(fb)
    from .inspect import parse_flatbuffer

    parse_flatbuffer(fb)  # a clear error for a corrupt model rather than a crash in C++
    try:
        return Interpreter(fb, num_threads=num_threads, use_indirect_bgemm=True, use_xnnpack=use_xnnpack)
    except Exception as err:
        raise ValueError(f"The LCE interpreter cannot load {source}: {err}") from err


class TFLiteModel:
    """A ``.tflite`` classifier in LCE's interpreter (:func:`lce_interpreter`: indirect BGEMM)
    with the little of a Keras model that evaluation uses: ``name``, ``input_shape``,
    ``output_shape`` and ``predict`` (raw pixels in, float scores out; int8 I/O quantized and
    dequantized with the model's parameters)."""

    def __init__(self, path):
        from pathlib import Path

        self.interpreter = lce_interpreter(path)
        if len(self.interpreter.input_shapes) != 1 or len(self.interpreter.output_shapes) != 1:
            raise ValueError(f"{path}: only single-input, single-output models can be run this way.")
        self.name = Path(path).stem
        self.input_shape = (None,) + tuple(int(d) for d in self.interpreter.input_shapes[0][1:])
        self.output_shape = (None,) + tuple(int(d) for d in self.interpreter.output_shapes[0][1:])

    def predict(self, data, verbose: int = 0) -> np.ndarray:
        """Scores for an array of images, or for an iterable of batches (``images`` or
        ``(images, labels)``, e.g. a ``tf.data.Dataset``)."""
        batches = [data] if isinstance(data, np.ndarray) else data
        outs = []
        for batch in batches:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            outs.append(run_interpreter(self.interpreter, np.asarray(images, np.float32))[0])
        return np.concatenate(outs)


def check_images(images, expected_shape, *, name: str = "images") -> np.ndarray:
    """Validate a batch of raw-pixel images against a model input ``(H, W, C)``; float32 copy."""
    expected = tuple(int(d) for d in expected_shape)
    try:
        arr = np.asarray(images)
    except Exception as err:
        raise ValueError(f"{name} must be a numpy array of pixels, got {type(images).__name__}.") from err
    if arr.dtype.kind not in "uif":
        raise ValueError(
            f"{name} must be numeric pixels (uint8, or int/float in 0..255), got dtype {arr.dtype}."
        )
    want = "(N, " + ", ".join(str(d) for d in expected) + ")"
    if arr.ndim == len(expected) and arr.shape == expected:
        raise ValueError(
            f"{name} must be a batch of shape {want}, got one image of shape {arr.shape}: "
            f"add a batch axis ({name}[None])."
        )
    if arr.ndim != len(expected) + 1 or tuple(arr.shape[1:]) != expected:
        raise ValueError(f"{name} must have shape {want} to match the model input, got {arr.shape}.")
    if len(arr) == 0:
        raise ValueError(f"{name} is empty: need at least one image.")
    arr = arr.astype(np.float32)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contain NaN or infinite values.")
    return arr


def _quant(scales, zero_points, index=0):
    scale = scales[index] if scales else None
    if isinstance(scale, (list, tuple, np.ndarray)):
        scale = scale[0] if len(scale) == 1 else None
    if not scale:
        return None
    zp = zero_points[index] if zero_points else 0
    if isinstance(zp, (list, tuple, np.ndarray)):
        zp = zp[0]
    return float(scale), int(zp or 0)


def run_interpreter(interpreter, images: np.ndarray) -> tuple[np.ndarray, dict]:
    """Run float pixels through the interpreter, (de)quantizing int8 / uint8 I/O. Float outputs."""
    in_dtype = np.dtype(interpreter.input_types[0])
    out_dtype = np.dtype(interpreter.output_types[0])
    info = {"input_dtype": str(in_dtype), "output_dtype": str(out_dtype), "input_clipped": 0.0,
            "input_quantization": None, "output_quantization": None}
    x = images
    if in_dtype.kind in "iu":
        q = _quant(interpreter.input_scales, interpreter.input_zero_points)
        if q is None:
            raise ValueError(f"The model input is {in_dtype} without quantization parameters.")
        info["input_quantization"] = q
        lo, hi = np.iinfo(in_dtype).min, np.iinfo(in_dtype).max
        raw = np.round(images / q[0]) + q[1]
        clipped = (raw < lo) | (raw > hi)
        info["input_clipped"] = float(clipped.mean())
        if clipped.any():
            warnings.warn(
                f"{clipped.mean():.2%} of the input values fall outside the {in_dtype} input range "
                f"(scale {q[0]:.6g}, zero point {q[1]}) and were clipped."
            )
        x = np.clip(raw, lo, hi).astype(in_dtype)
    else:
        x = images.astype(in_dtype)
    out = np.asarray(interpreter.predict(x))
    if out_dtype.kind in "iu":
        q = _quant(interpreter.output_scales, interpreter.output_zero_points)
        if q is None:
            raise ValueError(f"The model output is {out_dtype} without quantization parameters.")
        info["output_quantization"] = q
        out = (out.astype(np.float32) - q[1]) * q[0]
    return out.astype(np.float32), info


#: Inputs this close to an effective thermometer threshold count as sitting on it: there,
#: float rounding (not the model) decides the +-1 plane, and Keras and LCE may disagree.
TIE_BAND = 2.0 ** -10


def threshold_ties(keras_model, images: np.ndarray):
    """Images (indices) with an input value on or within ``TIE_BAND`` of an effective
    thermometer threshold of ``keras_model``'s input encoding, and one example
    ``(image, channel, value, threshold, layer name)``; ``([], None)`` without such a layer.
    Integer pixels never tie: the effective thresholds are half-integers."""
    from .inspect import iter_layers

    layer = next((l for l in iter_layers(keras_model) if callable(getattr(l, "effective_thresholds", None))
                  and getattr(l, "built", False)), None)
    if layer is None or images.ndim != 4:
        return [], None
    t = np.asarray(layer.effective_thresholds(), np.float64)  # (C, M)
    if t.shape[0] != images.shape[-1]:
        return [], None
    x = images.astype(np.float64)
    close = np.abs(x[..., :, None] - t) <= TIE_BAND  # (N, H, W, C, M)
    per_image = close.reshape(len(x), -1).any(1)
    tied = [int(i) for i in np.flatnonzero(per_image)]
    if not tied:
        return [], None
    n, hh, ww, c, k = np.argwhere(close)[0]
    return tied, (int(n), int(c), float(x[n, hh, ww, c]), float(t[c, k]), layer.name)


def _sign_tie_hint(keras_model, images: np.ndarray, failing) -> str:
    """The message's hint when failing images reach a BatchNorm sign threshold that sits on an
    integer accumulator (:mod:`glt_keras.convert.sign_ties`), else ``""``."""
    import tensorflow as tf

    from .sign_ties import sign_ties

    failing = sorted(int(i) for i in failing)
    try:
        ties = sign_ties(keras_model)
        layers = sorted({t.layer for t in ties})
        if not ties or not failing:
            return ""
        probe = tf.keras.Model(keras_model.input, [keras_model.get_layer(n).input for n in layers])
        outs = probe(images[failing].astype(np.float32), training=False)
    except Exception:  # a model this check cannot probe (e.g. nested): no hint rather than a second error
        return ""
    accumulators = dict(zip(layers, outs if isinstance(outs, (list, tuple)) else [outs]))
    for t in sorted(ties, key=lambda t: t.distance):
        reached = np.asarray(accumulators[t.layer])[..., t.channel] == t.accumulator
        hit = np.flatnonzero(reached.reshape(len(failing), -1).any(1))
        if len(hit):
            return (f" Possible cause: failing image {failing[hit[0]]} reaches accumulator {t.accumulator} of "
                    f"{t.layer} channel {t.channel}, whose BatchNorm sign threshold sits {t.distance:.2g} from it "
                    f"({len(ties)} such channels), where Keras and LCE may round to different signs; "
                    "glt_keras.convert.separate_sign_ties(model) moves them off (the same signs in exact "
                    "arithmetic).")
    return ""


def keras_predict(model, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    outs = []
    for start in range(0, len(images), batch_size):
        y = model(images[start:start + batch_size], training=False)
        if isinstance(y, (list, tuple, dict)):
            raise ValueError("Only single-output Keras models can be verified.")
        outs.append(np.asarray(y, dtype=np.float32))
    return np.concatenate(outs)


def verify_tflite(fb, keras_model, images, *, tolerance: Optional[float] = None,
                  min_argmax_agreement: float = 1.0, raise_on_failure: bool = True) -> VerifyResult:
    """Run ``images`` through the flatbuffer (LCE interpreter, 1 thread) and ``keras_model``.

    Args:
        fb: flatbuffer bytes or a ``.tflite`` path.
        keras_model: the model it was converted from (split or native groups: same math).
        images: ``(N, H, W, C)`` raw pixels (uint8 or float, 0..255); int8 inputs are
            quantized with the model's input scale / zero point, int8 outputs dequantized.
        tolerance: largest allowed ``max |tflite - keras|``. Default: ``1e-3 * max(1, max
            |keras output|)`` for float outputs, plus one quantization step for int8 outputs.
        min_argmax_agreement: required fraction of images with the same top class (a
            different top class within ``tolerance`` of the Keras maximum counts as a tie).
        raise_on_failure: raise :class:`VerificationError` (else return ``passed=False``).

    Raises:
        FileNotFoundError / ValueError: missing or corrupt model, images of the wrong shape or
        dtype, bad arguments. VerificationError: the outputs differ beyond tolerance.
    """
    if tolerance is not None:
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float, np.floating)) \
                or not np.isfinite(tolerance) or tolerance < 0:
            raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}.")
    if isinstance(min_argmax_agreement, bool) or not isinstance(min_argmax_agreement, (int, float)) \
            or not 0.0 <= min_argmax_agreement <= 1.0:
        raise ValueError(f"min_argmax_agreement must be in [0, 1], got {min_argmax_agreement!r}.")
    interpreter = lce_interpreter(fb)
    if len(interpreter.input_shapes) != 1 or len(interpreter.output_shapes) != 1:
        raise ValueError(
            f"Only single-input, single-output models can be verified; this one has "
            f"{len(interpreter.input_shapes)} inputs and {len(interpreter.output_shapes)} outputs."
        )
    tfl_shape = tuple(int(d) for d in interpreter.input_shapes[0][1:])
    keras_shape = tuple(keras_model.input_shape[1:]) if keras_model is not None else tfl_shape
    if keras_shape != tfl_shape:
        raise ValueError(
            f"The Keras model takes inputs of shape {keras_shape} but the flatbuffer {tfl_shape}: "
            "not the model it was converted from?"
        )
    x = check_images(images, tfl_shape)
    ref = keras_predict(keras_model, x)
    out, info = run_interpreter(interpreter, x)
    if out.shape != ref.shape:
        raise ValueError(f"Output shapes differ: flatbuffer {out.shape}, Keras {ref.shape}.")
    diff = np.abs(out - ref)
    if tolerance is None:
        tolerance = 1e-3 * max(1.0, float(np.max(np.abs(ref))))
        if info["output_quantization"]:
            tolerance += info["output_quantization"][0] * 1.01
    flat_ref = ref.reshape(len(ref), -1)
    flat_out = out.reshape(len(out), -1)
    top_ref, top_out = flat_ref.argmax(1), flat_out.argmax(1)
    same = top_ref == top_out
    tie = flat_ref[np.arange(len(ref)), top_out] >= flat_ref.max(1) - tolerance
    result = VerifyResult(
        n_images=int(len(x)),
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        tolerance=float(tolerance),
        argmax_agreement=float(same.mean()),
        argmax_agreement_within_tolerance=float((same | tie).mean()),
        min_argmax_agreement=float(min_argmax_agreement),
        passed=False,
        **info,
    )
    result.passed = bool(result.max_abs_diff <= tolerance
                         and result.argmax_agreement_within_tolerance >= min_argmax_agreement)
    if not result.passed:
        failing = (diff.reshape(len(diff), -1).max(1) > tolerance) | ~(same | tie)
        tied, example = threshold_ties(keras_model, x)
        failing_idx = set(int(i) for i in np.flatnonzero(failing))
        if failing_idx and failing_idx <= set(tied):
            n, c, value, threshold, layer = example
            result.threshold_ties = (
                f"every failing image ({len(failing_idx)} of {len(x)}) has inputs on or within "
                f"{TIE_BAND:.3g} of an effective threshold of {layer!r} (e.g. image {n}, channel "
                f"{c}: {value:.7g} vs {threshold:g}), where float rounding decides the +-1 plane: "
                "a tie in the inputs, not a conversion error (integer pixels never tie)"
            )
    if not result.passed and raise_on_failure:
        worst = np.unravel_index(int(diff.argmax()), diff.shape)
        cause = (f" Likely cause: {result.threshold_ties}." if result.threshold_ties
                 else _sign_tie_hint(keras_model, x, np.flatnonzero(failing)))
        raise VerificationError(
            f"The converted model does not match Keras: {result.message}. Largest difference at "
            f"image {worst[0]}, output {tuple(int(i) for i in worst[1:])}: tflite "
            f"{out[worst]:.5g} vs keras {ref[worst]:.5g}.{cause}",
            result,
        )
    return result
