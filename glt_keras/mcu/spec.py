"""The network as the C export sees it: a Keras GLT network parsed into a chain of integer
layers (:class:`ModelSpec`: the input encoding's integer thresholds, then one :class:`ConvSpec` per
binary convolution with its bits, its folded ``BatchNorm -> sign`` threshold, its fused pooling and
channel shuffle, and the head's float affine), or an :class:`UnsupportedLayerError` naming the
layer the C library cannot reproduce exactly."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

#: larq quantizers whose forward pass is ``sign`` with sign(0) = +1.
SIGN_QUANTIZERS = {"SteSign", "ApproxSign", "SwishSign"}
#: Layers that do nothing at inference.
NOOP_LAYERS = {"Dropout", "SpatialDropout2D", "GaussianNoise", "GaussianDropout", "ActivityRegularization"}


class UnsupportedLayerError(ValueError):
    """The model holds a layer (or layer setting) the C export cannot reproduce exactly."""


def _unsupported(layer, why: str) -> UnsupportedLayerError:
    return UnsupportedLayerError(
        f"export_c: layer {layer.name!r} ({type(layer).__name__}) is not supported: {why}"
    )


def words_per_group(cin_g: int) -> int:
    """uint32 words holding one pixel's bits of one channel group."""
    return -(-cin_g // 32)


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

    @property
    def dense(self) -> bool:
        """Rows packed as one bit stream: fewer than 32 channels per group (e.g. the
        24 thermometer planes of RGB) would otherwise leave bits of every word unused."""
        return self.cin_g < 32 and self.kh * self.kw > 1

    @property
    def row_words(self) -> int:
        if self.dense:
            return -(-self.k_bits // 32)
        return self.kh * self.kw * words_per_group(self.cin_g)


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
    if levels > 32:
        raise _unsupported(layer, f"{levels} levels per channel (at most 32).")
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
