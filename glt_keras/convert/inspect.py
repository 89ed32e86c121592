"""What a converted model became: op census, float convolutions and why, size, budget.

:func:`inspect_flatbuffer` reads a TFLite flatbuffer (no interpreter needed) and, when the
Keras model it came from is given, matches every convolution that stayed float
(``CONV_2D``, ``DEPTHWISE_CONV_2D``, ``FULLY_CONNECTED``, ...) to its Keras layer and says
why Larq Compute Engine did not binarize it.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import types
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ._io import read_tflite

#: Ops that carry a real-valued (float or int8) weight tensor.
FLOAT_CONV_OPS = (
    "CONV_2D",
    "DEPTHWISE_CONV_2D",
    "FULLY_CONNECTED",
    "TRANSPOSE_CONV",
    "CONV_3D",
    "BATCH_MATMUL",
)
BINARY_CONV_OP = "LceBconv2d"

#: Quantizers that LCE lowers to a sign (``LceQuantize``), normalised (lower case, no ``_``).
BINARY_QUANTIZERS = {"stesign", "approxsign", "swishsign", "magnitudeawaresign"}

_TENSOR_TYPES = {
    0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 5: "string", 6: "bool",
    7: "int16", 8: "complex64", 9: "int8", 10: "float64", 11: "complex128", 12: "uint64",
    13: "resource", 14: "variant", 15: "uint32", 16: "uint16", 17: "int4",
}
_ITEM_BYTES = {"float32": 4, "float16": 2, "int32": 4, "uint8": 1, "int64": 8, "int16": 2,
               "int8": 1, "float64": 8, "bool": 1, "uint32": 4, "uint16": 2, "uint64": 8}


# ---------------------------------------------------------------------------------------
# Report structures
# ---------------------------------------------------------------------------------------
@dataclass
class TensorInfo:
    name: str
    shape: list
    dtype: str
    scale: Optional[float] = None
    zero_point: Optional[int] = None


@dataclass
class BufferInfo:
    index: int
    bytes: int
    tensors: list
    shape: list
    dtype: str
    #: ops reading it, as ``"OP[input position]"``
    consumers: list
    #: a convolution's weights (position 1 of a conv op) or bias (position 2+)
    is_weight: bool


@dataclass
class FloatConv:
    """A convolution / matmul that stayed real-valued in the flatbuffer."""

    op_index: int
    op: str
    output: str
    weight_shape: list
    layer: Optional[str] = None
    layer_class: Optional[str] = None
    reasons: list = field(default_factory=list)


@dataclass
class InspectReport:
    """The op census and size accounting of one TFLite flatbuffer (see :func:`inspect_flatbuffer`)."""

    flatbuffer_bytes: int
    op_counts: dict
    binary_convs: int
    float_convs: list
    largest_buffers: list
    #: large constants that are not conv weights: constant-folding blow-ups
    suspicious_buffers: list
    #: weight bytes as stored in the flatbuffer: bitpacked binary vs real-valued
    binary_weight_bytes: int
    real_weight_bytes: int
    inputs: list
    outputs: list
    #: ``glt_keras.models.model_summary`` of the Keras model, when given
    keras_summary: Optional[dict] = None
    #: binary convs of the Keras model that LCE converts but with a slower path (notes)
    notes: list = field(default_factory=list)
    converter_messages: list = field(default_factory=list)
    flash_budget: Optional[int] = None

    @property
    def all_binary(self) -> bool:
        """True when every convolution became ``LceBconv2d``."""
        return not self.float_convs

    @property
    def fits_flash(self) -> Optional[bool]:
        if self.flash_budget is None:
            return None
        return self.flatbuffer_bytes <= self.flash_budget

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["all_binary"] = self.all_binary
        out["fits_flash"] = self.fits_flash
        return out

    def to_markdown(self, title: str = "TFLite model report") -> str:
        lines = [f"## {title}", ""]
        lines.append(f"- flatbuffer: **{self.flatbuffer_bytes:,} bytes**")
        if self.flash_budget is not None:
            verdict = "yes" if self.fits_flash else "**NO**"
            lines.append(
                f"- fits flash budget of {self.flash_budget:,} bytes: {verdict} "
                f"({self.flatbuffer_bytes / self.flash_budget:.0%} of it)"
            )
        total_convs = self.binary_convs + len(self.float_convs)
        status = "all binary" if self.all_binary else f"**{len(self.float_convs)} stayed float**"
        lines.append(f"- convolutions: {self.binary_convs} of {total_convs} are `LceBconv2d` ({status})")
        lines.append(
            f"- weights in the flatbuffer: {self.binary_weight_bytes:,} bytes bitpacked binary, "
            f"{self.real_weight_bytes:,} bytes real-valued (float conv weights, fused BatchNorm, "
            "thresholds)"
        )
        for t in self.inputs:
            lines.append(f"- input `{t.name}`: {t.dtype} {t.shape}" + _quant_text(t))
        for t in self.outputs:
            lines.append(f"- output `{t.name}`: {t.dtype} {t.shape}" + _quant_text(t))
        if self.keras_summary:
            s = self.keras_summary
            lines.append(
                f"- Keras model: {s['params']:,} parameters ({s['binary_params']:,} binary = "
                f"{s['binary_weight_bytes']:,} bytes at 1 bit, {s['real_params']:,} real-valued); "
                f"{s['macs']:,} MACs of which {s['binary_macs']:,} binary"
            )
        lines += ["", "### Ops", "", "| op | count |", "|---|---:|"]
        lines += [f"| {name} | {count} |" for name, count in self.op_counts.items()]
        if self.float_convs:
            lines += ["", "### Convolutions that stayed float", "",
                      "| # | op | weights | Keras layer | reason |", "|---:|---|---|---|---|"]
            for c in self.float_convs:
                layer = f"`{c.layer}` ({c.layer_class})" if c.layer else "?"
                reasons = "; ".join(c.reasons) or "unknown"
                lines.append(f"| {c.op_index} | {c.op} | {c.weight_shape} | {layer} | {reasons} |")
        if self.notes:
            lines += ["", "### Notes", ""] + [f"- {n}" for n in self.notes]
        lines += ["", "### Largest buffers", "", "| buffer | bytes | dtype | shape | tensor | used by |",
                  "|---:|---:|---|---|---|---|"]
        for b in self.largest_buffers:
            flag = " **(not a weight)**" if b in self.suspicious_buffers else ""
            tensor = (b.tensors[0] if b.tensors else "")[:48]
            lines.append(
                f"| {b.index} | {b.bytes:,}{flag} | {b.dtype} | {b.shape} | `{tensor}` | "
                f"{', '.join(b.consumers[:3])} |"
            )
        if self.suspicious_buffers:
            lines += ["", "**Warning**: large constants that are not convolution weights (a "
                      "constant-folded broadcast?): "
                      + ", ".join(f"buffer {b.index} ({b.bytes:,} bytes, {b.shape})"
                                  for b in self.suspicious_buffers)]
        if self.converter_messages:
            lines += ["", "### Converter messages", ""]
            lines += [f"- `{m}`" for m in self.converter_messages]
        return "\n".join(lines) + "\n"


def _quant_text(t: TensorInfo) -> str:
    if t.scale is None:
        return ""
    return f", scale {t.scale:.6g}, zero point {t.zero_point}"


# ---------------------------------------------------------------------------------------
# Flatbuffer parsing (the lazy flatbuffers reader: no copy of the weight buffers)
# ---------------------------------------------------------------------------------------
def _builtin_names() -> dict:
    from tensorflow.lite.python import schema_py_generated as schema

    return {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


@dataclass
class _Op:
    name: str
    inputs: list
    outputs: list


@dataclass
class _Tensor:
    name: str
    shape: list
    dtype: str
    buffer: int
    scale: Optional[float]
    zero_point: Optional[int]


@dataclass
class _Graph:
    ops: list  # main subgraph
    tensors: list  # main subgraph
    inputs: list
    outputs: list
    buffer_bytes: list
    op_counts: dict  # all subgraphs


def parse_flatbuffer(fb: bytes) -> _Graph:
    """The main subgraph's ops and tensors and every buffer's size; ``ValueError`` if corrupt."""
    from tensorflow.lite.python import schema_py_generated as schema

    try:
        model = schema.Model.GetRootAs(fb, 0)
        names = _builtin_names()
        codes = []
        for i in range(model.OperatorCodesLength()):
            oc = model.OperatorCodes(i)
            code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
            if names.get(code) == "CUSTOM":
                custom = oc.CustomCode()
                codes.append(custom.decode() if custom else "CUSTOM")
            else:
                codes.append(names.get(code, f"BUILTIN_{code}"))
        buffer_bytes = []
        for i in range(model.BuffersLength()):
            buf = model.Buffers(i)
            size = buf.DataLength()
            if not size and buf.Offset() > 1:  # stored after the flatbuffer (models > 2 GB)
                size = buf.Size()
            buffer_bytes.append(int(size))
        if model.SubgraphsLength() < 1:
            raise ValueError("it has no subgraph")
        op_counts: dict = {}
        graph = None
        for s in range(model.SubgraphsLength()):
            sg = model.Subgraphs(s)
            ops = []
            for i in range(sg.OperatorsLength()):
                op = sg.Operators(i)
                name = codes[op.OpcodeIndex()]
                op_counts[name] = op_counts.get(name, 0) + 1
                if s == 0:
                    ops.append(_Op(name, op.InputsAsNumpy().tolist() if op.InputsLength() else [],
                                   op.OutputsAsNumpy().tolist() if op.OutputsLength() else []))
            if s == 0:
                tensors = []
                for i in range(sg.TensorsLength()):
                    t = sg.Tensors(i)
                    q = t.Quantization()
                    scale = zero_point = None
                    if q is not None and q.ScaleLength() == 1:
                        scale = float(q.ScaleAsNumpy()[0])
                        zero_point = int(q.ZeroPointAsNumpy()[0]) if q.ZeroPointLength() else 0
                    tensors.append(_Tensor(
                        (t.Name() or b"").decode(errors="replace"),
                        t.ShapeAsNumpy().tolist() if t.ShapeLength() else [],
                        _TENSOR_TYPES.get(t.Type(), f"type{t.Type()}"),
                        int(t.Buffer()), scale, zero_point,
                    ))
                graph = _Graph(
                    ops, tensors,
                    sg.InputsAsNumpy().tolist() if sg.InputsLength() else [],
                    sg.OutputsAsNumpy().tolist() if sg.OutputsLength() else [],
                    buffer_bytes, {},
                )
        graph.op_counts = dict(sorted(op_counts.items(), key=lambda kv: (-kv[1], kv[0])))
        for op in graph.ops:
            for i in op.inputs + op.outputs:
                if i >= len(graph.tensors):
                    raise ValueError(f"op {op.name} refers to tensor {i} of {len(graph.tensors)}")
        for t in graph.tensors:
            if t.buffer >= len(buffer_bytes):
                raise ValueError(f"tensor {t.name!r} refers to buffer {t.buffer} of {len(buffer_bytes)}")
        return graph
    except ValueError as err:
        raise ValueError(f"Corrupt TFLite flatbuffer: {err}") from err
    except Exception as err:  # struct.error, IndexError, UnicodeDecodeError... on garbage
        raise ValueError(
            f"Corrupt TFLite flatbuffer: cannot parse it ({type(err).__name__}: {err})."
        ) from err


# ---------------------------------------------------------------------------------------
# Keras side: which layers are convolutions, and what keeps LCE from binarizing them
# ---------------------------------------------------------------------------------------
def iter_layers(model):
    """Every layer of ``model``, nested models flattened (depth first, in order)."""
    for layer in getattr(model, "layers", ()):
        if hasattr(layer, "layers") and layer.layers:
            yield from iter_layers(layer)
        else:
            yield layer


def _quantizer_name(q) -> Optional[str]:
    if q is None:
        return None
    if isinstance(q, str):
        return q
    if isinstance(q, (types.FunctionType, types.BuiltinFunctionType, functools.partial)):
        return getattr(q, "__name__", None) or getattr(getattr(q, "func", None), "__name__", "function")
    return type(q).__name__  # larq quantizer objects: SteSign, ApproxSign, ...


def _is_binary_quantizer(q) -> bool:
    name = _quantizer_name(q)
    if name is None:
        return False
    key = name.lower().replace("_", "")
    if key in BINARY_QUANTIZERS:
        return True
    # larq's NoOp(precision=1) marks an input that is binary already.
    return key in ("noop", "noopquantizer") and getattr(q, "precision", None) == 1


def conv_kind(layer) -> Optional[str]:
    """``"conv"``, ``"depthwise"``, ``"dense"`` or ``None`` (not a weighted conv/matmul)."""
    import tensorflow as tf

    if isinstance(layer, (tf.keras.layers.DepthwiseConv2D,)):
        return "depthwise"
    if isinstance(layer, tf.keras.layers.SeparableConv2D):
        return "separable"
    if isinstance(layer, tf.keras.layers.Conv2D):
        return "conv"
    if isinstance(layer, tf.keras.layers.Dense):
        return "dense"
    return None


def lce_blockers(layer) -> list:
    """Why LCE would leave this Keras layer a float op (empty if it should binarize)."""
    from ..layers.binary import LCE_GROUP_CHANNELS

    kind = conv_kind(layer)
    cls = type(layer).__name__
    if kind is None:
        return []
    reasons = []
    if kind == "dense":
        reasons.append(
            f"{cls}: LCE does not binarize dense layers (FULLY_CONNECTED); use a 1x1 binary "
            "QuantConv2D head instead"
        )
        return reasons
    if kind in ("depthwise", "separable"):
        reasons.append(f"{cls}: LCE has no binary depthwise/separable convolution")
        return reasons
    input_q = getattr(layer, "input_quantizer", None)
    kernel_q = getattr(layer, "kernel_quantizer", None)
    if not hasattr(layer, "input_quantizer"):
        reasons.append(f"{cls} is a real-valued convolution (not a larq QuantConv2D)")
        return reasons
    if input_q is None and kernel_q is None:
        reasons.append("real-valued by design: no input and no kernel quantizer")
        return reasons
    if input_q is None:
        reasons.append("no input quantizer (the input is not binarized)")
    elif not _is_binary_quantizer(input_q):
        reasons.append(f"input quantizer {_quantizer_name(input_q)!r} is not a binary sign quantizer")
    if kernel_q is None:
        reasons.append("no kernel quantizer (the weights are real-valued)")
    elif not _is_binary_quantizer(kernel_q):
        reasons.append(f"kernel quantizer {_quantizer_name(kernel_q)!r} is not a binary sign quantizer")
    groups = int(getattr(layer, "groups", 1) or 1)
    if groups > 1 and getattr(layer, "kernel", None) is not None:
        per_group = int(layer.kernel.shape[-2])
        if per_group % LCE_GROUP_CHANNELS:
            reasons.append(
                f"grouped convolution with {per_group} input channels per group "
                f"({per_group * groups} channels / groups={groups}): LCE needs a multiple of "
                f"{LCE_GROUP_CHANNELS} per group"
            )
    dilation = tuple(getattr(layer, "dilation_rate", (1, 1)))
    if any(d != 1 for d in dilation) and groups > 1:
        reasons.append(f"dilation_rate={dilation} with groups={groups}")
    return reasons


def padding_note(layer) -> Optional[str]:
    """LCE 0.16 binarizes ``same`` convolutions with zero padding, but through a correction."""
    if conv_kind(layer) != "conv" or not hasattr(layer, "pad_values"):
        return None
    if getattr(layer, "input_quantizer", None) is None:
        return None
    if layer.padding == "same" and float(layer.pad_values) != 1.0 and max(layer.kernel_size) > 1:
        return (
            f"`{layer.name}`: padding='same' with pad_values={layer.pad_values}; LCE pads binary "
            "convolutions with +1 natively (pad_values=1.0), other values need a padding "
            "correction or keep the convolution float"
        )
    return None


def _keras_weight_shape(layer, kind) -> Optional[tuple]:
    """The layer's weight shape as the TFLite op stores it."""
    try:
        if kind == "conv":
            kh, kw, cin, cout = (int(d) for d in layer.kernel.shape)
            return (cout, kh, kw, cin)
        if kind == "depthwise":
            kh, kw, c, mult = (int(d) for d in layer.depthwise_kernel.shape)
            return (1, kh, kw, c * mult)
        if kind == "dense":
            cin, cout = (int(d) for d in layer.kernel.shape)
            return (cout, cin)
    except (AttributeError, ValueError, TypeError):
        return None
    return None


def _name_hits(layer_name: str, names: list) -> int:
    pattern = re.compile(r"(^|/)" + re.escape(layer_name) + r"(/|$)")
    return sum(1 for n in names for part in n.split(";") if pattern.search(part))


def _match_layers(graph: _Graph, float_convs: list, keras_model) -> None:
    layers = [l for l in iter_layers(keras_model) if conv_kind(l)]
    taken = set()
    for conv in float_convs:
        op = graph.ops[conv.op_index]
        names_out = [graph.tensors[i].name for i in op.outputs]
        names_in = [graph.tensors[i].name for i in op.inputs if i >= 0]
        best, best_score = None, -1
        for order, layer in enumerate(layers):
            if id(layer) in taken:
                continue
            kind = conv_kind(layer)
            want = _keras_weight_shape(layer, kind)
            shape_ok = want is not None and tuple(conv.weight_shape) == want
            op_kind_ok = {
                "CONV_2D": ("conv",), "DEPTHWISE_CONV_2D": ("depthwise", "conv"),
                "FULLY_CONNECTED": ("dense", "conv"),
            }.get(conv.op, (kind,))
            if kind not in op_kind_ok:
                continue
            score = 4 * _name_hits(layer.name, names_out) + 2 * _name_hits(layer.name, names_in)
            score += 3 if shape_ok else (-3 if want is not None else 0)
            if score <= 0:
                continue
            if score > best_score:
                best, best_score = layer, score
        if best is not None:
            taken.add(id(best))
            conv.layer = best.name
            conv.layer_class = type(best).__name__
            conv.reasons = lce_blockers(best) or [
                "no known blocker on the Keras side: see the converter messages"
            ]


# ---------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------
def inspect_flatbuffer(fb, keras_model=None, flash_budget: Optional[int] = None,
                       *, converter_messages=(), top_buffers: int = 5) -> InspectReport:
    """Census of a TFLite flatbuffer (bytes or a ``.tflite`` path).

    Args:
        fb: flatbuffer bytes or a path to a ``.tflite`` file.
        keras_model: the Keras model it was converted from: float convolutions are then
            matched to their layers with the reason they stayed float, and parameter /
            MAC counts come from :func:`glt_keras.models.model_summary`.
        flash_budget: bytes available for the model; the report says if it fits.
        converter_messages: lines the converter printed (shown in the report).

    Raises:
        FileNotFoundError: missing file. ValueError: not a (valid) TFLite flatbuffer.

    Example:
        >>> report = inspect_flatbuffer("model.tflite")  # doctest: +SKIP
        >>> report.op_counts["LceBconv2d"], report.all_binary  # doctest: +SKIP
        (9, True)
    """
    fb, _source = read_tflite(fb)
    if flash_budget is not None:
        flash_budget = _check_budget(flash_budget)
    graph = parse_flatbuffer(fb)

    # Who reads each buffer, and which buffers are conv weights.
    conv_ops = set(FLOAT_CONV_OPS) | {BINARY_CONV_OP}
    consumers: dict = {}
    weight_buffers: dict = {}  # buffer -> "binary" | "real"
    for op in graph.ops:
        for pos, ti in enumerate(op.inputs):
            if ti < 0:
                continue
            b = graph.tensors[ti].buffer
            if graph.buffer_bytes[b] == 0:
                continue
            consumers.setdefault(b, []).append(f"{op.name}[{pos}]")
            if op.name in conv_ops and pos >= 1:
                weight_buffers[b] = "binary" if (op.name == BINARY_CONV_OP and pos == 1) else (
                    weight_buffers.get(b, "real"))
    tensors_of: dict = {}
    for t in graph.tensors:
        tensors_of.setdefault(t.buffer, []).append(t)

    buffers = []
    for b, size in enumerate(graph.buffer_bytes):
        if size == 0:
            continue
        ts = tensors_of.get(b, [])
        buffers.append(BufferInfo(
            index=b, bytes=size, tensors=[t.name for t in ts],
            shape=ts[0].shape if ts else [], dtype=ts[0].dtype if ts else "?",
            consumers=consumers.get(b, []), is_weight=b in weight_buffers,
        ))
    buffers.sort(key=lambda x: -x.bytes)
    threshold = max(16 * 1024, len(fb) // 10)
    suspicious = [b for b in buffers if not b.is_weight and b.bytes > threshold]
    largest = buffers[:top_buffers] + [b for b in suspicious if b not in buffers[:top_buffers]]

    float_convs = []
    for i, op in enumerate(graph.ops):
        if op.name in FLOAT_CONV_OPS:
            weight = graph.tensors[op.inputs[1]].shape if len(op.inputs) > 1 and op.inputs[1] >= 0 else []
            output = graph.tensors[op.outputs[0]].name if op.outputs else ""
            float_convs.append(FloatConv(i, op.name, output, list(weight)))

    notes = []
    summary = None
    if keras_model is not None:
        _match_layers(graph, float_convs, keras_model)
        notes = [n for n in (padding_note(l) for l in iter_layers(keras_model)) if n]
        try:
            from ..models import model_summary

            summary = model_summary(keras_model)
        except Exception as err:  # a model the zoo accounting does not understand
            notes.append(f"no parameter/MAC summary: {type(err).__name__}: {err}")
        n_keras_binary = sum(1 for l in iter_layers(keras_model) if conv_kind(l) and not lce_blockers(l))
        n_lce = graph.op_counts.get(BINARY_CONV_OP, 0)
        if n_lce < n_keras_binary and not float_convs:
            notes.append(f"the Keras model has {n_keras_binary} binarizable convolutions but the "
                         f"flatbuffer only {n_lce} LceBconv2d")

    def io(index):
        t = graph.tensors[index]
        return TensorInfo(t.name, t.shape, t.dtype, t.scale, t.zero_point)

    return InspectReport(
        flatbuffer_bytes=len(fb),
        op_counts=graph.op_counts,
        binary_convs=graph.op_counts.get(BINARY_CONV_OP, 0),
        float_convs=float_convs,
        largest_buffers=largest,
        suspicious_buffers=suspicious,
        binary_weight_bytes=sum(graph.buffer_bytes[b] for b, k in weight_buffers.items() if k == "binary"),
        real_weight_bytes=sum(graph.buffer_bytes[b] for b, k in weight_buffers.items() if k == "real"),
        inputs=[io(i) for i in graph.inputs],
        outputs=[io(i) for i in graph.outputs],
        keras_summary=summary,
        notes=notes,
        converter_messages=list(converter_messages),
        flash_budget=flash_budget,
    )


def _check_budget(flash_budget) -> int:
    if isinstance(flash_budget, bool) or not isinstance(flash_budget, (int, np.integer)):
        raise ValueError(f"flash_budget must be a whole number of bytes, got {flash_budget!r}.")
    if flash_budget <= 0:
        raise ValueError(f"flash_budget must be positive, got {flash_budget}.")
    return int(flash_budget)
