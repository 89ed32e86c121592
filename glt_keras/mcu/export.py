"""Export a trained fully-binarized GLT network as a self-contained C99 library.

The generated library (``export_c``) computes exactly what the Keras model computes:

- the input encoding (learned / fixed thermometer, or binary planes) as integer
  comparisons on uint8 pixels. The integer threshold of every plane is the smallest
  pixel value that the Keras layer maps to +1, found by running the layer on all 256
  pixel values, so the planes are identical to Keras for every integer pixel (for a
  thermometer it equals ``ceil(t)``);
- every binary convolution as XNOR-popcount on bit-packed activations and weights,
  with the model's padding (``pad_values=1``: padded inputs are +1) and groups;
- ``BatchNorm -> sign`` as one integer threshold per channel on the popcount (the
  Keras BN layer is evaluated on every possible integer conv output, so ties, zero
  gammas / variances and negative scales come out as Keras decides them; a negative
  scale is folded into the weights by negating that channel's row);
- ``MaxPool`` between BN and the next sign as the OR of the pooled bits, and
  ``ChannelShuffle`` as a static permutation of the producer's output rows;
- the head (1x1 binary conv -> BN -> global average [-> softmax]) as integer sums
  followed by one float affine per class.

Activations are bit-packed and live in one static arena planned at export time
(two-ended ping-pong; the first layer encodes the uint8 image row by row into a small
ring instead of materialising all bit planes; pooling is fused into the conv so
full-resolution outputs are never stored).
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import tensorflow as tf

__all__ = ["export_c", "ExportResult", "UnsupportedLayerError", "parse_model"]

#: larq quantizers whose forward pass is ``sign`` with sign(0) = +1.
SIGN_QUANTIZERS = {"SteSign", "ApproxSign", "SwishSign"}
#: Layers that do nothing at inference.
NOOP_LAYERS = {"Dropout", "SpatialDropout2D", "GaussianNoise", "GaussianDropout", "ActivityRegularization"}

TEMPLATE_FILES = ("glt_internal.h", "glt_runtime.c")


class UnsupportedLayerError(ValueError):
    """The model holds a layer (or layer setting) the C export cannot reproduce exactly."""


def _unsupported(layer, why: str) -> UnsupportedLayerError:
    return UnsupportedLayerError(
        f"export_c: layer {layer.name!r} ({type(layer).__name__}) is not supported: {why}"
    )


# ------------------------------------------------------------------------------------
# Intermediate representation
# ------------------------------------------------------------------------------------
@dataclass
class EncodingSpec:
    layer: str
    kind: str  # "thermometer" or "bitplanes"
    channels: int
    levels: int
    thresholds: np.ndarray | None  # (C, M) int: plane is +1 iff pixel >= threshold (0..256)


@dataclass
class ConvSpec:
    name: str  # keras conv layer
    bn: str | None
    pool_layer: str | None
    head: bool
    in_h: int
    in_w: int
    in_c: int
    groups: int
    kh: int
    kw: int
    sh: int
    sw: int
    pad_top: int
    pad_left: int
    conv_h: int
    conv_w: int
    ph: int
    pw: int
    out_h: int
    out_w: int
    cout: int
    kernel_bits: np.ndarray  # (kh, kw, cin/g, cout) bool, True = +1 (after the flips)
    perm: np.ndarray  # output position j holds original channel perm[j]
    thr_pop: np.ndarray | None = None  # (cout,) original channel order: bit = pop >= thr
    flip: np.ndarray | None = None  # (cout,) bool: row negated (negative BN scale)
    scale: np.ndarray | None = None  # head: float affine of the integer sum
    offset: np.ndarray | None = None

    @property
    def cin_g(self) -> int:
        return self.in_c // self.groups

    @property
    def k_bits(self) -> int:
        return self.kh * self.kw * self.cin_g


@dataclass
class ModelSpec:
    name: str
    input_shape: tuple
    num_classes: int
    softmax: bool
    encoding: EncodingSpec
    convs: list  # ConvSpec, the last one is the head


def _chain(model):
    """The model's layers as a linear chain (InputLayer dropped), or a clear error."""
    layers = [l for l in model.layers if not isinstance(l, tf.keras.layers.InputLayer)]
    if not layers:
        raise UnsupportedLayerError("export_c: the model has no layers.")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise UnsupportedLayerError("export_c: only single-input, single-output models are supported.")
    previous = None
    for layer in layers:
        nodes = getattr(layer, "_inbound_nodes", [])
        if len(nodes) > 1:
            raise _unsupported(layer, "the layer is used more than once (shared layers).")
        if nodes:
            inbound = nodes[0].inbound_layers
            inbound = inbound if isinstance(inbound, (list, tuple)) else [inbound]
            inbound = [l for l in inbound if not isinstance(l, tf.keras.layers.InputLayer)]
            expected = [] if previous is None else [previous]
            if inbound != expected:
                raise _unsupported(layer, "only a plain chain of layers is supported (no branches or merges).")
        previous = layer
    return layers


def _quantizer_name(q) -> str | None:
    if q is None:
        return None
    return getattr(q, "__name__", None) or type(q).__name__


def _is_encoding(layer) -> bool:
    from ..layers.encoding import BinaryPlanes, LearnedThermometer

    return isinstance(layer, (LearnedThermometer, BinaryPlanes))


def _parse_encoding(layer, input_shape) -> EncodingSpec:
    from ..layers.encoding import BinaryPlanes, LearnedThermometer

    h, w, c = input_shape
    out_c = int(layer.output_shape[-1])
    if out_c % c:
        raise _unsupported(layer, f"{out_c} output planes are not a multiple of {c} input channels.")
    levels = out_c // c
    if levels > 255:
        raise _unsupported(layer, f"{levels} levels per channel (at most 255).")
    # Every plane depends only on its own channel: probe all 256 pixel values at once.
    pixels = np.repeat(np.arange(256, dtype="float32")[:, None], c, axis=1)
    planes = layer(tf.constant(pixels[None, None]), training=False).numpy()[0, 0]  # (256, C*M)
    if not np.all(np.abs(planes) == 1):
        raise _unsupported(layer, "its output is not +-1 for every integer pixel.")
    bits = planes > 0  # (256, C*M)
    if isinstance(layer, LearnedThermometer):
        thresholds = np.zeros((c, levels), dtype="int64")
        for ch in range(c):
            for k in range(levels):
                col = bits[:, ch * levels + k]
                on = np.flatnonzero(col)
                first = int(on[0]) if len(on) else 256
                if not np.array_equal(col, np.arange(256) >= first):
                    raise _unsupported(layer, f"plane {ch * levels + k} is not a threshold of the pixel.")
                thresholds[ch, k] = first
        return EncodingSpec(layer.name, "thermometer", c, levels, thresholds)
    if isinstance(layer, BinaryPlanes):
        if levels != 8:
            raise _unsupported(layer, f"{levels} bit planes per channel (expected 8).")
        p = np.arange(256)
        expected = np.stack([(p >> (7 - k)) & 1 for k in range(8)], 1).astype(bool)
        if not np.array_equal(bits, np.tile(expected, (1, c))):
            raise _unsupported(layer, "its planes are not the bits of the pixel (MSB first).")
        return EncodingSpec(layer.name, "bitplanes", c, 8, None)
    raise _unsupported(layer, "unknown input encoding.")  # pragma: no cover


def _same_padding(size, k, s):
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return out, total // 2


def _probe_bn(bn, values, cout, bias):
    """Keras's own BN output for a column of conv outputs (float32), shape (n, cout)."""
    x = np.repeat(np.asarray(values, "float32")[:, None], cout, axis=1)
    if bias is not None:
        x = (x + bias[None].astype("float32")).astype("float32")
    if bn is None:
        return x
    return bn(tf.constant(x[None, None]), training=False).numpy()[0, 0]


def _parse_conv(layer, layers, i):
    """Parse conv [-> BN] [-> MaxPool / ChannelShuffle]* (or the head). Returns (spec, next i)."""
    import larq as lq

    from ..layers.binary import ChannelShuffle

    cls = type(layer).__name__
    if not isinstance(layer, lq.layers.QuantConv2D):
        if isinstance(layer, tf.keras.layers.Conv2D) or "Conv" in cls or "Dense" in cls:
            raise _unsupported(layer, "only binary convolutions (larq QuantConv2D / BinaryConv2D) are supported.")
        raise _unsupported(layer, "expected a binary convolution here.")
    iq, kq = _quantizer_name(layer.input_quantizer), _quantizer_name(layer.kernel_quantizer)
    if iq not in SIGN_QUANTIZERS or kq not in SIGN_QUANTIZERS:
        raise _unsupported(
            layer,
            f"a real-valued (non-binary) convolution (input_quantizer={iq}, kernel_quantizer={kq}); "
            f"both quantizers must be one of {sorted(SIGN_QUANTIZERS)}.",
        )
    if layer.data_format != "channels_last":
        raise _unsupported(layer, "data_format must be channels_last.")
    if tuple(layer.dilation_rate) != (1, 1):
        raise _unsupported(layer, f"dilation_rate={tuple(layer.dilation_rate)} (only 1).")
    pad_values = float(tf.keras.backend.get_value(layer.pad_values))
    if layer.padding == "same" and pad_values != 1.0:
        raise _unsupported(layer, f"'same' padding with pad_values={pad_values} (only +1 can be packed).")
    if layer.padding not in ("same", "valid"):
        raise _unsupported(layer, f"padding={layer.padding!r}.")
    _, in_h, in_w, in_c = (int(d) if d is not None else None for d in layer.input_shape)
    if None in (in_h, in_w, in_c):
        raise _unsupported(layer, f"its input shape {layer.input_shape} is not fully known.")
    kh, kw = (int(k) for k in layer.kernel_size)
    sh, sw = (int(s) for s in layer.strides)
    groups = int(getattr(layer, "groups", 1) or 1)
    cout = int(layer.filters)
    if layer.padding == "same":
        conv_h, pad_top = _same_padding(in_h, kh, sh)
        conv_w, pad_left = _same_padding(in_w, kw, sw)
    else:
        conv_h, conv_w, pad_top, pad_left = (in_h - kh) // sh + 1, (in_w - kw) // sw + 1, 0, 0
    if tuple(layer.output_shape[1:3]) != (conv_h, conv_w):
        raise _unsupported(layer, f"unexpected output shape {layer.output_shape}.")  # pragma: no cover
    kernel = layer.kernel.numpy()
    if kernel.shape != (kh, kw, in_c // groups, cout):
        raise _unsupported(layer, f"unexpected kernel shape {kernel.shape}.")  # pragma: no cover
    kernel_bits = kernel >= 0  # larq sign: sign(0) = +1
    bias = layer.bias.numpy() if getattr(layer, "use_bias", False) and layer.bias is not None else None

    i += 1
    bn = None
    if i < len(layers) and isinstance(layers[i], tf.keras.layers.BatchNormalization):
        bn = layers[i]
        axis = bn.axis if isinstance(bn.axis, int) else (bn.axis[0] if len(bn.axis) == 1 else None)
        if axis not in (-1, 3):
            raise _unsupported(bn, f"BatchNormalization over axis {bn.axis} (only the channel axis).")
        i += 1
    pool_layer, ph, pw = None, 1, 1
    perm = np.arange(cout)
    head = False
    while i < len(layers):
        nxt = layers[i]
        ncls = type(nxt).__name__
        if ncls in NOOP_LAYERS:
            i += 1
        elif isinstance(nxt, tf.keras.layers.MaxPooling2D):
            if pool_layer is not None:
                raise _unsupported(nxt, f"a second max-pool after {layer.name!r}.")
            ph, pw = (int(p) for p in nxt.pool_size)
            if tuple(int(s) for s in nxt.strides) != (ph, pw) or nxt.padding != "valid":
                raise _unsupported(nxt, "max-pool strides must equal the pool size, with 'valid' padding.")
            pool_layer = nxt.name
            i += 1
        elif isinstance(nxt, ChannelShuffle):
            probe = tf.reshape(tf.range(cout, dtype=tf.float32), (1, 1, 1, cout))
            perm = perm[nxt(probe).numpy().ravel().astype(int)]
            i += 1
        elif isinstance(nxt, tf.keras.layers.GlobalAveragePooling2D):
            if pool_layer is not None or not np.array_equal(perm, np.arange(cout)):
                raise _unsupported(nxt, "global pooling after a max-pool or shuffle in the head.")
            if getattr(nxt, "keepdims", False):
                raise _unsupported(nxt, "keepdims=True.")
            head = True
            i += 1
            break
        elif isinstance(nxt, tf.keras.layers.GlobalMaxPooling2D):
            raise _unsupported(nxt, "global max pooling (the head must use global average pooling).")
        else:
            break
    out_h, out_w = conv_h // ph, conv_w // pw
    spec = ConvSpec(
        name=layer.name, bn=bn.name if bn else None, pool_layer=pool_layer, head=head,
        in_h=in_h, in_w=in_w, in_c=in_c, groups=groups, kh=kh, kw=kw, sh=sh, sw=sw,
        pad_top=pad_top, pad_left=pad_left, conv_h=conv_h, conv_w=conv_w, ph=ph, pw=pw,
        out_h=out_h, out_w=out_w, cout=cout, kernel_bits=kernel_bits, perm=perm,
    )
    K = spec.k_bits
    if head:
        # Integer sums s in [-K, K] -> BN (affine) -> mean. Fold BN into scale / offset.
        if bn is None:
            scale, offset = np.ones(cout), np.zeros(cout)
        else:
            gamma = bn.gamma.numpy().astype("float64") if bn.scale else np.ones(cout)
            beta = bn.beta.numpy().astype("float64") if bn.center else np.zeros(cout)
            mean = bn.moving_mean.numpy().astype("float64")
            var = bn.moving_variance.numpy().astype("float64")
            with np.errstate(invalid="ignore", divide="ignore"):
                scale = gamma / np.sqrt(var + float(bn.epsilon))
            offset = beta - mean * scale
        if bias is not None:
            offset = offset + bias.astype("float64") * scale
        if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(offset))):
            raise _unsupported(bn or layer, "non-finite folded BatchNorm (negative moving variance?).")
        # Cross-check the fold against Keras on every possible conv output.
        s = np.arange(-K, K + 1)
        keras_y = _probe_bn(bn, s, cout, bias).astype("float64")
        ours = s[:, None] * scale[None] + offset[None]
        tol = 1e-5 * (np.abs(keras_y).max() + 1.0)
        if np.abs(keras_y - ours).max() > tol:  # pragma: no cover
            raise _unsupported(bn or layer, "could not fold the BatchNorm into an affine map.")
        spec.scale, spec.offset = scale, offset
        return spec, i
    # BN + sign -> a threshold on the popcount p (s = 2p - K), as Keras decides it.
    pops = np.arange(K + 1)
    y = _probe_bn(bn, 2 * pops - K, cout, bias)
    if not np.all(np.isfinite(y)):
        raise _unsupported(bn or layer, "its output is not finite (negative moving variance?).")
    bits = y >= 0  # larq sign(0) = +1
    thr = np.zeros(cout, dtype="int64")
    flip = np.zeros(cout, dtype=bool)
    for o in range(cout):
        col = bits[:, o]
        if np.all(col[1:] >= col[:-1]):  # non-decreasing in p (positive scale or constant)
            on = np.flatnonzero(col)
            thr[o] = on[0] if len(on) else K + 1
        elif np.all(col[1:] <= col[:-1]):  # negative scale: negate the row, p' = K - p
            flip[o] = True
            col = col[::-1]
            thr[o] = np.flatnonzero(col)[0]
        else:  # pragma: no cover - an affine float map is monotone
            raise _unsupported(bn or layer, f"channel {o}: BN + sign is not monotone in the conv output.")
    spec.kernel_bits = np.where(flip[None, None, None, :], ~kernel_bits, kernel_bits)
    spec.thr_pop, spec.flip = thr, flip
    return spec, i


def parse_model(model: tf.keras.Model) -> ModelSpec:
    """Read a Keras GLT model into the integer form the C library computes."""
    from ..layers.encoding import RealInput

    layers = _chain(model)
    shape = tuple(model.input_shape[1:])
    if len(shape) != 3 or None in shape:
        raise UnsupportedLayerError(f"export_c: the input shape must be a fixed (H, W, C), got {shape}.")
    first = layers[0]
    if isinstance(first, RealInput):
        raise _unsupported(first, "a real-valued input path (teacher model); export a binary student.")
    if not _is_encoding(first):
        raise _unsupported(
            first, "the first layer must be an input encoding (LearnedThermometer, FixedThermometer or BinaryPlanes)."
        )
    encoding = _parse_encoding(first, shape)
    convs = []
    i = 1
    while i < len(layers):
        layer = layers[i]
        if type(layer).__name__ in NOOP_LAYERS:
            i += 1
            continue
        if convs and convs[-1].head:
            break
        spec, i = _parse_conv(layer, layers, i)
        if convs and spec.in_c != convs[-1].cout:  # pragma: no cover
            raise _unsupported(layer, "channel count does not match the previous layer.")
        convs.append(spec)
    if not convs or not convs[-1].head:
        raise UnsupportedLayerError(
            "export_c: the model must end with a binary conv head -> [BatchNorm] -> "
            "GlobalAveragePooling2D [-> softmax] (include_top=True)."
        )
    softmax = False
    for layer in layers[i:]:
        cls = type(layer).__name__
        if cls in NOOP_LAYERS:
            continue
        if isinstance(layer, tf.keras.layers.Activation):
            act = getattr(layer.activation, "__name__", str(layer.activation))
            if act == "softmax" and not softmax:
                softmax = True
                continue
            if act == "linear":
                continue
            raise _unsupported(layer, f"activation {act!r} after the head (only softmax or linear).")
        if isinstance(layer, tf.keras.layers.Softmax) and not softmax:
            if layer.axis not in (-1, 1):
                raise _unsupported(layer, f"softmax over axis {layer.axis}.")
            softmax = True
            continue
        raise _unsupported(layer, "unexpected layer after the head.")
    for spec in convs[:-1]:
        if spec.head:  # pragma: no cover
            raise UnsupportedLayerError("export_c: only one head.")
    return ModelSpec(
        name=model.name, input_shape=shape, num_classes=convs[-1].cout, softmax=softmax,
        encoding=encoding, convs=convs,
    )


# ------------------------------------------------------------------------------------
# Packing and memory plan
# ------------------------------------------------------------------------------------
def _wpg(cin_g: int) -> int:
    return -(-cin_g // 32)


@dataclass
class LayerPlan:
    name: str
    kind: str  # "conv" or "head"
    in_words: int
    out_words: int
    in_off: int
    out_off: int
    in_what: str
    out_what: str


@dataclass
class MemoryPlan:
    arena_words: int
    pingpong_words: int
    scratch_words: int
    ring_rows: int
    layers: list = field(default_factory=list)

    @property
    def peak_ram_bytes(self) -> int:
        return 4 * self.arena_words


def _consumer_layout(nxt: ConvSpec | None):
    """(channels per group, words per group, words per pixel) of the next layer's input."""
    cin_g = nxt.cin_g
    wpg = _wpg(cin_g)
    return cin_g, wpg, wpg * nxt.groups


def plan_memory(spec: ModelSpec) -> MemoryPlan:
    convs = spec.convs
    first = convs[0]
    ring_rows = (first.ph - 1) * first.sh + first.kh
    sizes = []
    for idx, conv in enumerate(convs):
        in_wpp = _wpg(conv.cin_g) * conv.groups
        if idx == 0:
            in_words = ring_rows * conv.in_w * in_wpp
            in_what = f"ring of {ring_rows} encoded input rows"
        else:
            in_words = conv.in_h * conv.in_w * in_wpp
            in_what = f"{conv.in_h}x{conv.in_w}x{conv.in_c} bits"
        if conv.head:
            out_words, out_what = conv.cout, f"{conv.cout} int32 sums"
        else:
            _, _, out_wpp = _consumer_layout(convs[idx + 1])
            out_words = conv.out_h * conv.out_w * out_wpp
            out_what = f"{conv.out_h}x{conv.out_w}x{conv.cout} bits"
        sizes.append((conv, in_words, out_words, in_what, out_what))
    pingpong = max(a + b for _, a, b, _, _ in sizes)
    scratch = max(c.ph * c.pw * c.kh * c.kw * _wpg(c.cin_g) * c.groups for c in convs)
    plan = MemoryPlan(arena_words=pingpong + scratch, pingpong_words=pingpong, scratch_words=scratch,
                      ring_rows=ring_rows)
    low = True  # where the current layer's input lives
    for conv, in_words, out_words, in_what, out_what in sizes:
        in_off = 0 if low else pingpong - in_words
        out_off = pingpong - out_words if low else 0
        plan.layers.append(LayerPlan(conv.name, "head" if conv.head else "conv", in_words, out_words,
                                     in_off, out_off, in_what, out_what))
        low = not low
    return plan


def _pack_rows(conv: ConvSpec, row_order: np.ndarray) -> np.ndarray:
    """Weights as uint32 words: rows in consumer order, each [ky][kx][word] of its group."""
    wpg = _wpg(conv.cin_g)
    bits = conv.kernel_bits[..., row_order]  # (kh, kw, cin_g, cout)
    padded = np.zeros((conv.kh, conv.kw, wpg * 32, conv.cout), dtype=np.uint64)
    padded[:, :, : conv.cin_g, :] = bits
    padded = padded.reshape(conv.kh, conv.kw, wpg, 32, conv.cout)
    weights = (padded << np.arange(32, dtype=np.uint64)[None, None, None, :, None]).sum(axis=3)
    return np.ascontiguousarray(np.moveaxis(weights, -1, 0)).reshape(-1).astype(np.uint32)


def _pad_vector(conv: ConvSpec) -> np.ndarray:
    wpg = _wpg(conv.cin_g)
    bits = np.zeros((conv.groups, wpg * 32), dtype=np.uint64)
    bits[:, : conv.cin_g] = 1
    words = (bits.reshape(conv.groups, wpg, 32) << np.arange(32, dtype=np.uint64)).sum(-1)
    return words.reshape(-1).astype(np.uint32)


def _group_formula(groups_of_rows: np.ndarray, groups: int):
    if groups == 1:
        return 1, 1
    j = np.arange(len(groups_of_rows))
    for div in range(1, len(groups_of_rows) + 1):
        if np.array_equal((j // div) % groups, groups_of_rows):
            return div, groups
    return None


# ------------------------------------------------------------------------------------
# Code generation
# ------------------------------------------------------------------------------------
def _c_array(ctype: str, name: str, values, per_line: int = 8, fmt=None) -> str:
    values = list(values)
    if fmt is None:
        fmt = (lambda v: f"0x{int(v):08x}u") if ctype == "uint32_t" else (lambda v: str(int(v)))
    lines = []
    for k in range(0, len(values), per_line):
        lines.append("    " + ", ".join(fmt(v) for v in values[k : k + per_line]) + ",")
    body = "\n".join(lines) if lines else "    0"
    return f"static const {ctype} {name}[{max(len(values), 1)}] = {{\n{body}\n}};\n"


def _float_literal(v: float) -> str:
    v = float(np.float32(v))
    text = repr(v)
    if "e" not in text and "." not in text and "inf" not in text and "nan" not in text:
        text += ".0"
    return text + "f"


@dataclass
class ExportResult:
    """What :func:`export_c` wrote, with the memory plan and the sizes it implies."""

    out_dir: Path
    name: str
    header: Path
    files: list
    input_shape: tuple
    num_classes: int
    softmax: bool
    peak_ram_bytes: int
    plan: MemoryPlan
    weight_bytes: int  # packed binary weights (const)
    const_bytes: int  # all const tables: weights, thresholds, encoding, head affine
    layers: list  # per-layer summary dicts

    def summary(self) -> dict:
        return {
            "name": self.name,
            "out_dir": str(self.out_dir),
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "softmax": self.softmax,
            "peak_ram_bytes": self.peak_ram_bytes,
            "weight_bytes": self.weight_bytes,
            "const_bytes": self.const_bytes,
            "layers": self.layers,
        }


def export_c(model: tf.keras.Model, out_dir, *, name: str = "glt_model") -> ExportResult:
    """Generate a self-contained C99 library computing ``model`` on uint8 HWC images.

    Writes ``{name}.h`` (the API: ``int glt_infer(const uint8_t *rgb, float *scores)``
    and the macros ``GLT_INPUT_HEIGHT``, ``GLT_INPUT_WIDTH``, ``GLT_INPUT_CHANNELS``,
    ``GLT_NUM_CLASSES``, ``GLT_PEAK_RAM_BYTES``), ``glt_internal.h``,
    ``glt_runtime.c``, ``{name}_data.c`` and a ``README`` into ``out_dir``. The
    sources compile with ``cc -std=c99 -O2 -c out_dir/*.c``.

    ``model`` is a fully binarized GLT network (any topology of :func:`glt_net`,
    grouped or not, with or without softmax). Raises :class:`UnsupportedLayerError`,
    naming the layer and its class, for anything the C library cannot reproduce
    exactly (real-valued convolutions, teacher input paths, branches, ...).

    Example:
        >>> result = export_c(model, "build/c_model")      # doctest: +SKIP
        >>> result.peak_ram_bytes                          # doctest: +SKIP
        40176
    """
    if not name.isidentifier():
        raise ValueError(f"export_c: name must be a C identifier, got {name!r}.")
    spec = parse_model(model)
    plan = plan_memory(spec)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    convs = spec.convs
    enc = spec.encoding
    data = []
    layer_inits = []
    layer_summaries = []
    weight_bytes = 0
    const_bytes = 0
    thr_type = "int16_t" if max(c.k_bits for c in convs) < 32767 else "int32_t"
    if thr_type != "int16_t":  # pragma: no cover - kernels would need > 32k bits per output
        raise UnsupportedLayerError("export_c: a convolution has more than 32766 inputs per output.")

    # -- encoding: planes scattered into the first layer's packed layout ----------------
    first = convs[0]
    planes = enc.channels * enc.levels
    if planes != first.in_c:  # pragma: no cover
        raise UnsupportedLayerError("export_c: encoding planes do not match the first convolution.")
    cin_g, wpg = first.cin_g, _wpg(first.cin_g)
    dst = [(ch // cin_g) * wpg * 32 + (ch % cin_g) for ch in range(planes)]
    data.append(_c_array("uint16_t", "glt_enc_dst", dst, per_line=12))
    const_bytes += 2 * len(dst)
    if enc.kind == "thermometer":
        data.append(_c_array("uint16_t", "glt_enc_thr", enc.thresholds.reshape(-1), per_line=12))
        const_bytes += 2 * planes
        enc_init = (f"const glt_encoding_t glt_encoding = {{GLT_ENC_THERMOMETER, {enc.channels}, "
                    f"{enc.levels}, glt_enc_thr, glt_enc_dst}};\n")
    else:
        enc_init = (f"const glt_encoding_t glt_encoding = {{GLT_ENC_BITPLANES, {enc.channels}, "
                    f"{enc.levels}, NULL, glt_enc_dst}};\n")

    # -- layers -----------------------------------------------------------------------------
    for idx, (conv, lp) in enumerate(zip(convs, plan.layers)):
        tag = f"glt_l{idx}"
        in_wpg = _wpg(conv.cin_g)
        in_wpp = in_wpg * conv.groups
        if conv.head:
            out_cpg, out_wpg, out_wpp = conv.cout, 0, 0
        else:
            out_cpg, out_wpg, out_wpp = _consumer_layout(convs[idx + 1])
        order = conv.perm  # row j computes original channel perm[j]
        weights = _pack_rows(conv, order)
        data.append(f"/* {conv.name}: {conv.kh}x{conv.kw}, {conv.in_c}->{conv.cout} channels, "
                    f"groups={conv.groups}, {conv.in_h}x{conv.in_w} -> {conv.out_h}x{conv.out_w} */\n")
        data.append(_c_array("uint32_t", f"{tag}_w", weights, per_line=6))
        weight_bytes += 4 * len(weights)
        const_bytes += 4 * len(weights)
        pad = _pad_vector(conv)
        data.append(_c_array("uint32_t", f"{tag}_pad", pad, per_line=6))
        const_bytes += 4 * len(pad)
        groups_of_rows = order // (conv.cout // conv.groups)
        formula = _group_formula(groups_of_rows, conv.groups)
        if formula is None:
            data.append(_c_array("uint16_t", f"{tag}_grp", groups_of_rows, per_line=16))
            const_bytes += 2 * conv.cout
            grp_div, grp_mod, grp_table = 1, 1, f"{tag}_grp"
        else:
            (grp_div, grp_mod), grp_table = formula, "NULL"
        if conv.head:
            data.append(_c_array("float", f"{tag}_scale", conv.scale, per_line=4, fmt=_float_literal))
            data.append(_c_array("float", f"{tag}_offset", conv.offset, per_line=4, fmt=_float_literal))
            const_bytes += 8 * conv.cout
            thr_ref, scale_ref, offset_ref = "NULL", f"{tag}_scale", f"{tag}_offset"
        else:
            # bit = pop >= thr_pop  <=>  mismatches <= K - thr_pop
            mism = conv.k_bits - conv.thr_pop[order]
            data.append(_c_array(thr_type, f"{tag}_thr", mism, per_line=12))
            const_bytes += 2 * conv.cout
            thr_ref, scale_ref, offset_ref = f"{tag}_thr", "NULL", "NULL"
        layer_inits.append(
            "    {" + ", ".join(str(v) for v in (
                conv.in_h, conv.in_w, conv.out_h, conv.out_w, conv.kh, conv.kw, conv.sh, conv.sw,
                conv.ph, conv.pw, conv.pad_top, conv.pad_left, in_wpp, in_wpg, conv.cout,
                grp_div, grp_mod, grp_table, out_wpp, out_cpg, out_wpg, conv.k_bits,
                f"{tag}_w", thr_ref, f"{tag}_pad", f"{lp.in_off}u", f"{lp.out_off}u", scale_ref, offset_ref,
            )) + "}"
        )
        layer_summaries.append({
            "conv": conv.name, "bn": conv.bn, "pool": conv.pool_layer, "head": conv.head,
            "input": [conv.in_h, conv.in_w, conv.in_c], "output": [conv.out_h, conv.out_w, conv.cout],
            "kernel": [conv.kh, conv.kw], "groups": conv.groups, "k_bits": conv.k_bits,
            "weight_bytes": 4 * len(weights),
            "negated_rows": int(conv.flip.sum()) if conv.flip is not None else 0,
            "binary_macs": conv.conv_h * conv.conv_w * conv.cout * conv.k_bits,
            "out_layout": {"h": conv.out_h, "w": conv.out_w, "channels": conv.cout, "cpg": out_cpg,
                           "wpg": out_wpg, "wpp": out_wpp},
            "arena": {"in_off": lp.in_off, "in_words": lp.in_words, "out_off": lp.out_off,
                      "out_words": lp.out_words},
        })

    max_rows = max((c.ph - 1) * c.sh + c.kh for c in convs)
    # Inline a constant-size kernel for the common row sizes (at most 4: code size).
    row_words = sorted({c.kh * c.kw * _wpg(c.cin_g) for c in convs[:-1]})
    specialized = " ".join(f"X({n})" for n in row_words if n <= 60)
    specialized = " ".join(specialized.split(" ")[:4])
    head = convs[-1]
    if head.ph != 1 or head.pw != 1:  # pragma: no cover
        raise UnsupportedLayerError("export_c: the head cannot pool.")
    guard = f"GLT_{name.upper()}_H"
    h, w, c = spec.input_shape
    total_macs = sum(l["binary_macs"] for l in layer_summaries)
    header = f"""/* {name}.h: C99 inference library for the binarized GLT network "{spec.name}".
 * Generated by glt_keras.mcu.export_c. Self-contained: only <stdint.h> (and expf() from
 * <math.h> when GLT_SOFTMAX is 1). No dynamic allocation; not reentrant (static arena).
 *
 *   uint8_t image[GLT_INPUT_HEIGHT * GLT_INPUT_WIDTH * GLT_INPUT_CHANNELS];  (HWC, 0..255)
 *   float scores[GLT_NUM_CLASSES];
 *   int err = glt_infer(image, scores);   (0 on success)
 */
#ifndef {guard}
#define {guard}

#include <stdint.h>

#ifdef __cplusplus
extern "C" {{
#endif

#define GLT_INPUT_HEIGHT {h}
#define GLT_INPUT_WIDTH {w}
#define GLT_INPUT_CHANNELS {c}
#define GLT_NUM_CLASSES {spec.num_classes}
/* 1: glt_infer returns softmax probabilities (the Keras model ends with softmax);
 * 0: it returns logits = mean over H x W of BN(head conv). */
#define GLT_SOFTMAX {int(spec.softmax)}

/* Static RAM of the library: the activation arena (bit-packed ping-pong buffers, the
 * ring of encoded input rows and the gather scratch). The caller owns the input image
 * ({h * w * c} bytes) and the scores; the stack use of glt_infer is small (see README). */
#define GLT_PEAK_RAM_BYTES {plan.peak_ram_bytes}
#define GLT_ARENA_WORDS {plan.arena_words}
/* Packed binary weights (const, in flash). */
#define GLT_WEIGHT_BYTES {weight_bytes}
#define GLT_BINARY_MACS {total_macs}

#define GLT_OK 0
#define GLT_ERR_NULL_ARGUMENT 1

/* Library internals. */
#define GLT_NUM_CONV_LAYERS {len(convs)}
#define GLT_MAX_ROWS {max_rows}
#define GLT_RING_ROWS {plan.ring_rows}
#define GLT_SCRATCH_OFFSET {plan.pingpong_words}
/* Words per weight row with a specialised (unrolled) kernel. */
#define GLT_SPECIALIZED_NK(X) {specialized}

/* Classify one image: rgb = GLT_INPUT_HEIGHT x GLT_INPUT_WIDTH x GLT_INPUT_CHANNELS
 * uint8 pixels (row-major HWC), scores = GLT_NUM_CLASSES floats. Returns GLT_OK, or
 * GLT_ERR_NULL_ARGUMENT when a pointer is NULL. */
int glt_infer(const uint8_t *rgb, float *scores);

/* 1 if this build counts bits with __builtin_popcount, 0 for the portable SWAR code. */
int glt_popcount_builtin(void);

#ifdef __cplusplus
}}
#endif

#endif /* {guard} */
"""
    data_c = (
        f"/* {name}_data.c: weights, thresholds, layer table and arena of \"{spec.name}\".\n"
        " * Generated by glt_keras.mcu.export_c: do not edit. */\n"
        f'#include "{name}.h"\n#include "glt_internal.h"\n\n'
        + "\n".join(data)
        + "\n" + enc_init + "\n"
        + "const glt_conv_t glt_layers[GLT_NUM_CONV_LAYERS] = {\n" + ",\n".join(layer_inits) + "\n};\n\n"
        + "uint32_t glt_arena[GLT_ARENA_WORDS];\n"
    )

    files = []
    header_path = out_dir / f"{name}.h"
    header_path.write_text(header)
    files.append(header_path)
    data_path = out_dir / f"{name}_data.c"
    data_path.write_text(data_c)
    files.append(data_path)
    templates = resources.files("glt_keras.mcu") / "templates"
    for fname in TEMPLATE_FILES:
        text = (templates / fname).read_text()
        text = text.replace("@HEADER@", f"{name}.h")
        path = out_dir / fname
        path.write_text(text)
        files.append(path)

    result = ExportResult(
        out_dir=out_dir, name=name, header=header_path, files=files, input_shape=spec.input_shape,
        num_classes=spec.num_classes, softmax=spec.softmax, peak_ram_bytes=plan.peak_ram_bytes,
        plan=plan, weight_bytes=weight_bytes, const_bytes=const_bytes, layers=layer_summaries,
    )
    readme = out_dir / "README"
    readme.write_text(_readme(result, spec))
    files.append(readme)
    plan_path = out_dir / "plan.json"
    plan_path.write_text(json.dumps(
        {**result.summary(), "plan": asdict(plan), "encoding": _encoding_summary(enc)}, indent=1
    ))
    files.append(plan_path)
    return result


def _encoding_summary(enc: EncodingSpec) -> dict:
    out = {"layer": enc.layer, "kind": enc.kind, "channels": enc.channels, "levels": enc.levels}
    if enc.thresholds is not None:
        out["integer_thresholds"] = enc.thresholds.tolist()
    return out


def _readme(result: ExportResult, spec: ModelSpec) -> str:
    h, w, c = spec.input_shape
    enc = spec.encoding
    rows = []
    for lay in result.layers:
        rows.append(
            f"  {lay['conv']:<14} {'x'.join(map(str, lay['input'])):>12} -> {'x'.join(map(str, lay['output'])):<11}"
            f" k={lay['kernel'][0]}x{lay['kernel'][1]} g={lay['groups']:<2} pool={'yes' if lay['pool'] else 'no ':<3}"
            f" weights={lay['weight_bytes']:>7} B  arena in@{lay['arena']['in_off']}+{lay['arena']['in_words']}"
            f" out@{lay['arena']['out_off']}+{lay['arena']['out_words']} words"
        )
    if enc.kind == "thermometer":
        enc_text = (
            f"Input encoding ({enc.layer}): thermometer, {enc.levels} levels per channel. Plane\n"
            f"c*{enc.levels}+k is +1 iff pixel >= T[c][k], with the integer thresholds T below (the\n"
            "smallest pixel the Keras layer maps to +1, i.e. ceil of its float threshold), so the\n"
            "planes equal Keras's for every uint8 pixel:\n"
            + "\n".join(f"  channel {ch}: {enc.thresholds[ch].tolist()}" for ch in range(enc.channels))
        )
    else:
        enc_text = (f"Input encoding ({enc.layer}): binary planes, plane c*8+k is bit 7-k of the pixel "
                    "of channel c.")
    plan = result.plan
    return f"""GLT C inference library for "{spec.name}" (generated by glt_keras.mcu.export_c)
=====================================================================================

Files
  {result.name}.h       API and sizes (include this)
  {result.name}_data.c  const weights / thresholds / layer table, and the static arena
  glt_runtime.c      XNOR-popcount kernels and glt_infer()
  glt_internal.h     types shared by the two .c files
  plan.json          memory plan and per-layer numbers (not needed to build)

Build: plain C99, no dynamic allocation, only the C standard library:
  cc -std=c99 -O2 -c *.c            (link with -lm when GLT_SOFTMAX is 1: expf)
Cortex-M4, for example:
  arm-none-eabi-gcc -std=c99 -O2 -mcpu=cortex-m4 -mthumb -mfloat-abi=hard -mfpu=fpv4-sp-d16 -c *.c

API
  int glt_infer(const uint8_t *rgb, float *scores);
    rgb: {h} x {w} x {c} uint8 pixels, row-major HWC (GLT_INPUT_HEIGHT/WIDTH/CHANNELS).
    scores: GLT_NUM_CLASSES = {spec.num_classes} floats: {'softmax probabilities' if spec.softmax else 'logits (mean over H x W of the head BatchNorm output)'}.
    Returns 0 (GLT_OK), or GLT_ERR_NULL_ARGUMENT (1) when a pointer is NULL.
  Not reentrant: one static arena.

Exactness
  All binary parts are integer and exact; the result equals the Keras model's up to
  float rounding in the head's final affine map (and softmax).
  - Conv: s = K - 2 * popcount(x XOR w) over bit-packed +-1 values (bit 1 = +1), with
    padded positions read as +1 (larq pad_values=1) and unused bits zero.
  - BatchNorm + sign (larq: sign(0) = +1) -> per-channel integer threshold on the
    mismatch count, found by evaluating the Keras BN layer on every possible conv
    output; channels with a negative BN scale have their weight row negated, channels
    whose BN output has a constant sign (zero gamma) get an always/never threshold.
  - MaxPool then sign == OR of the signs (sign is monotone): the conv is computed at
    the pooled positions and the bits are ORed (stopping at the first +1); the
    full-resolution output is never stored.
  - ChannelShuffle: a static reordering of the producing layer's weight rows, so each
    layer writes its bits directly in the next layer's (grouped) input layout.
  - Head: integer sums over H x W, then scale * mean + offset (BN folded), {'then softmax.' if spec.softmax else 'no softmax.'}

{enc_text}

Memory plan (GLT_PEAK_RAM_BYTES = {result.peak_ram_bytes} bytes of static RAM)
  One uint32 arena of {plan.arena_words} words: a two-ended ping-pong region of
  {plan.pingpong_words} words (each layer reads from one end and writes to the other, so
  the region is max(input + output) over layers) and a gather scratch of
  {plan.scratch_words} words (one output pixel's receptive fields). The first layer
  reads the image through a ring of {plan.ring_rows} thermometer-encoded rows instead of
  materialising all {h}x{w}x{c * enc.levels} planes. Not counted: the caller's image ({h * w * c} B)
  and scores, and the stack of glt_infer (a few hundred bytes: row pointers and
  ring tags; measured under QEMU by glt_keras.mcu.qemu).
{chr(10).join(rows)}

Flash: {result.weight_bytes} bytes of packed weights, {result.const_bytes} bytes of const data in all
(weights, thresholds, encoding tables, head affine), plus the code (a few KB).

Popcount
  Default: a portable SWAR bit trick, with byte-wise partial counts of up to 31 words
  folded once (fast on Cortex-M, which has no popcount instruction).
  -DGLT_USE_BUILTIN_POPCOUNT (GCC / Clang): use __builtin_popcount, worthwhile where it
  is one instruction (x86 with -mpopcnt, AArch64). Chosen automatically when the
  compiler targets x86 POPCNT (__POPCNT__); -DGLT_NO_BUILTIN_POPCOUNT forces SWAR.
  glt_popcount_builtin() reports which one a build uses.
"""
