"""Input encodings: raw RGB pixels in [0, 255] -> +-1 bit planes (or real values for teachers).

All encodings share one interface: they take ``(N, H, W, C)`` pixels in raw units
(uint8 or float, 0..255, never normalised) and return ``(N, H, W, C * levels)``.
Output channel ``c * levels + k`` is level ``k`` of input channel ``c``.
"""
from __future__ import annotations

import numpy as np
import larq as lq
import tensorflow as tf

from .checks import check_pixels

PIXEL_MAX = 255.0
#: Smallest gap between consecutive thresholds (pixel units), built into the
#: parameterisation so that ordering survives float32 saturation of the softmax.
MIN_GAP = 0.25
#: Width of the band above a whole pixel value that the forward pass treats as that value:
#: a threshold ``t`` acts as ``floor(t + SNAP_BAND) + 0.5`` (see
#: :meth:`LearnedThermometer.effective_thresholds`).
SNAP_BAND = 2.0 ** -10


def snap_thresholds(t):
    """The forward pass's thresholds: ``floor(t + SNAP_BAND) + 0.5``, half-integers.

    An integer pixel ``p`` is then never equal to a threshold, ``p - t_eff`` is exact in
    float32, and ``p >= t_eff`` holds iff ``p > t + SNAP_BAND``: the same as ``p >= t``
    except where ``t`` lies in ``[p - SNAP_BAND, p]``, i.e. on a whole value or within
    float error below it, where float32 rounding (e.g. oneDNN's softmax against the
    default one) used to decide the answer.
    """
    return tf.floor(t + SNAP_BAND) + 0.5


def _as_pixels(inputs, layer=None):
    if inputs.dtype != tf.float32:
        inputs = tf.cast(inputs, tf.float32)
    if layer is None:
        return inputs
    # NaN / inf, normalised or out-of-range pixels, a wrong image size: a clear error (checks.py).
    return check_pixels(inputs, getattr(layer, "_build_input_shape", None), layer.name)


def _check_channels(layer, input_shape):
    channels = input_shape[-1]
    if channels is None:
        raise ValueError(f"{layer.name}: the channel dimension of the input must be known.")
    if len(input_shape) != 4:
        raise ValueError(
            f"{layer.name}: expects NHWC images, got an input of rank {len(input_shape)} "
            f"(shape {tuple(input_shape)})."
        )
    return int(channels)


class _Float32Encoding(tf.keras.layers.Layer):
    """An input encoding computes in float32 under every Keras precision policy.

    Under ``mixed_bfloat16`` (``glt_keras.training.precision``) Keras would otherwise cast
    the pixels and the thresholds to bfloat16, which has 8 significant bits: the
    half-integer thresholds above 128 (``170.5``) do not exist there and the +-1 code would
    change. In float32 it is exact; the next layer casts the +-1 output (exact in any
    float type) to its own compute dtype. Under float32 this changes nothing.
    """

    def __init__(self, **kwargs):
        if kwargs.get("dtype") is None:
            kwargs["dtype"] = "float32"
        super().__init__(**kwargs)


@tf.keras.utils.register_keras_serializable(package="glt_keras")
class LearnedThermometer(_Float32Encoding):
    """Generic Learned Thermometer (GLT): learned, ordered thresholds -> +-1 bit planes.

    Each input channel ``c`` gets ``levels`` thresholds ``t_1 < ... < t_M`` inside
    ``(0, 255)``. The output plane ``k`` is ``+1`` where ``pixel >= t_k`` and ``-1``
    elsewhere, so the number of ``+1`` planes is a learned, non-linear quantisation of
    the pixel: a learned global tone curve in place of the ADC's natural binary code.

    Ordering and range hold by construction: the thresholds are the cumulative sum
    of ``M + 1`` positive increments ``min_gap + (255 - (M + 1) * min_gap) *
    softmax(logits)`` (the last one is the room above ``t_M``; ``min_gap`` defaults to
    ``MIN_GAP`` = 0.25 px), so they are strictly increasing, at least ``min_gap`` apart
    and strictly inside ``(0, 255)`` whatever
    the optimizer does; nothing is clipped after the fact.

    Integer pixels are never ambiguous: the forward pass compares against the *effective*
    thresholds ``floor(t_k + 2**-10) + 0.5`` (:meth:`effective_thresholds`, half-integers),
    so a uint8 pixel never equals a threshold and Keras, LCE and the C export encode it the
    same on every CPU. A pixel ``p`` gives ``+1`` iff ``p > t_k + 2**-10``: the same as
    ``p >= t_k`` except for thresholds on a whole value or within ``2**-10`` below it. The
    gradient reaches the latent ``t_k`` unchanged (straight through the snap).

    Gradient: the forward pass is ``sign(pixel - t_eff_k)``; the backward pass uses the
    clipped straight-through estimator (larq's ``ste_sign``) on ``(pixel - t_eff_k)``
    measured in pixel units: the gradient is passed where ``|pixel - t_eff_k| <=
    ste_window`` and is zero elsewhere. A threshold therefore learns from the pixels
    that lie near it. ``threshold_lr_multiplier`` scales the logits (``logits =
    multiplier * variable``), which multiplies the effective learning rate of the
    thresholds under Adam-like optimizers, whose step size ignores gradient scale.

    The default ``LearnedThermometer()`` has 8 levels per channel (3 x 8 = 24 planes
    for RGB, a cheap first binary convolution), thresholds per channel (colour
    channels have different statistics) and a uniform initialisation (the fixed
    thermometer is the starting point, so learning can only move away from a known
    baseline); call :meth:`init_from_data` for quantile initialisation.

    In Larq Compute Engine the comparison is a broadcasting SUB of a small constant
    followed by ``LceQuantize``, so the next binary convolution becomes ``LceBconv2d``.

    Example:
        >>> enc = LearnedThermometer(levels=4)
        >>> planes = enc(tf.constant([[[[0.0, 128.0, 255.0]]]]))
        >>> planes.shape
        TensorShape([1, 1, 1, 12])
    """

    trainable_thresholds = True

    def __init__(
        self,
        levels: int = 8,
        *,
        per_channel: bool = True,
        ste_window: float | None = None,
        threshold_lr_multiplier: float = 1.0,
        initial_thresholds=None,
        min_gap: float = MIN_GAP,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if int(levels) != levels or levels < 1:
            raise ValueError(f"{self.name}: levels must be a positive integer, got {levels!r}.")
        if threshold_lr_multiplier <= 0:
            raise ValueError(
                f"{self.name}: threshold_lr_multiplier must be > 0, got {threshold_lr_multiplier}."
            )
        self.levels = int(levels)
        self.per_channel = bool(per_channel)
        if not 0.0 <= min_gap < PIXEL_MAX / (self.levels + 1):
            raise ValueError(f"{self.name}: min_gap must be in [0, {PIXEL_MAX / (self.levels + 1):.2f}), got {min_gap}.")
        # 0 gives the plain softmax parameterisation (runs trained before MIN_GAP existed).
        self.min_gap = float(min_gap)
        # Half of the initial uniform spacing: every pixel informs its nearest threshold.
        self.ste_window = float(ste_window) if ste_window else PIXEL_MAX / (self.levels + 1) / 2
        self.threshold_lr_multiplier = float(threshold_lr_multiplier)
        self.initial_thresholds = (
            None if initial_thresholds is None else np.asarray(initial_thresholds, "float32").tolist()
        )

    # -- parameterisation ---------------------------------------------------------
    def _logits_from_thresholds(self, thresholds: np.ndarray) -> np.ndarray:
        """Inverse of the softmax/cumsum map, for rows of strictly increasing thresholds."""
        t = np.asarray(thresholds, dtype="float64")
        edges = np.concatenate(
            [np.zeros(t.shape[:-1] + (1,)), t, np.full(t.shape[:-1] + (1,), PIXEL_MAX)], -1
        )
        gaps = np.diff(edges, axis=-1)
        if np.any(gaps <= self.min_gap):
            raise ValueError(
                "thresholds must be strictly increasing, more than "
                f"{self.min_gap} apart and inside ({self.min_gap}, {PIXEL_MAX - self.min_gap}), "
                f"got {np.round(t, 2).tolist()}"
            )
        room = PIXEL_MAX - gaps.shape[-1] * self.min_gap
        logits = np.log((gaps - self.min_gap) / room)
        return (logits - logits.mean(-1, keepdims=True)).astype("float32")

    def _uniform_thresholds(self, rows: int) -> np.ndarray:
        t = PIXEL_MAX * np.arange(1, self.levels + 1) / (self.levels + 1)
        return np.tile(t[None], (rows, 1)).astype("float32")

    def build(self, input_shape):
        channels = _check_channels(self, input_shape)
        self.channels = channels
        rows = channels if self.per_channel else 1
        if self.initial_thresholds is not None:
            init = np.asarray(self.initial_thresholds, "float32").reshape(-1, self.levels)
            if init.shape[0] == 1 and rows > 1:
                init = np.tile(init, (rows, 1))
            if init.shape != (rows, self.levels):
                raise ValueError(
                    f"{self.name}: initial_thresholds must have shape ({rows}, {self.levels}) "
                    f"or ({self.levels},), got {np.asarray(self.initial_thresholds).shape}."
                )
        else:
            init = self._uniform_thresholds(rows)
        logits = self._logits_from_thresholds(init) / self.threshold_lr_multiplier
        self.threshold_logits = self.add_weight(
            name="threshold_logits",
            shape=(rows, self.levels + 1),
            initializer=tf.constant_initializer(logits),
            trainable=self.trainable_thresholds,
        )
        super().build(input_shape)

    def _thresholds_tensor(self):
        shares = tf.nn.softmax(self.threshold_logits * self.threshold_lr_multiplier, axis=-1)
        increments = self.min_gap + (PIXEL_MAX - (self.levels + 1) * self.min_gap) * shares
        return tf.cumsum(increments, axis=-1)[:, : self.levels]

    def _effective_thresholds_tensor(self):
        # Forward: the snapped half-integers exactly (t - stop_gradient(t) is exactly 0);
        # backward: d t_eff / d t = 1 (straight through the floor).
        t = self._thresholds_tensor()
        return tf.stop_gradient(snap_thresholds(t)) + (t - tf.stop_gradient(t))

    def thresholds(self) -> np.ndarray:
        """Current (latent, trained) thresholds in pixel units, shape ``(channels, levels)``
        (broadcast if shared). The forward pass uses :meth:`effective_thresholds`."""
        t = self._thresholds_tensor().numpy()
        if t.shape[0] == 1:
            t = np.tile(t, (self.channels, 1))
        return t

    def effective_thresholds(self) -> np.ndarray:
        """The thresholds the forward pass compares pixels with, shape ``(channels, levels)``:
        half-integers ``floor(t + 2**-10) + 0.5`` of :meth:`thresholds`. Plane ``k`` of
        channel ``c`` is ``+1`` iff ``pixel >= effective_thresholds()[c, k]``; for integer
        pixels iff ``pixel >= effective_thresholds()[c, k] + 0.5`` (the C export's integer
        thresholds)."""
        t = self._effective_thresholds_tensor().numpy()
        if t.shape[0] == 1:
            t = np.tile(t, (self.channels, 1))
        return t

    def set_thresholds(self, thresholds) -> None:
        """Set the thresholds (shape ``(channels, levels)`` or ``(levels,)``) in pixel units."""
        rows = self.threshold_logits.shape[0]
        t = np.asarray(thresholds, "float32").reshape(-1, self.levels)
        if t.shape[0] != rows:
            t = np.tile(t.mean(0, keepdims=True), (rows, 1)) if rows == 1 else np.tile(t, (rows, 1))
        self.threshold_logits.assign(self._logits_from_thresholds(t) / self.threshold_lr_multiplier)

    def init_from_data(self, images, *, max_pixels: int = 2_000_000, seed: int = 0) -> np.ndarray:
        """Set the thresholds to the data's quantiles ``k / (levels + 1)``.

        ``images``: a numpy array / tensor ``(N, H, W, C)`` of raw pixels or a
        ``tf.data.Dataset`` of such batches (or of ``(images, labels)``). Each level
        then holds an equal share of the pixels: histogram equalisation as a start.
        Ties (e.g. saturated pixels) are broken so the thresholds stay strictly ordered.
        """
        if isinstance(images, tf.data.Dataset):
            chunks, count = [], 0
            for batch in images:
                batch = batch[0] if isinstance(batch, (tuple, list)) else batch
                arr = np.asarray(batch, "float32").reshape(-1, np.shape(batch)[-1])
                chunks.append(arr)
                count += len(arr)
                if count >= max_pixels:
                    break
            pixels = np.concatenate(chunks)
        else:
            pixels = np.asarray(images, "float32")
            pixels = pixels.reshape(-1, pixels.shape[-1])
        if not self.built:
            self.build((None, None, None, pixels.shape[-1]))
        if pixels.shape[-1] != self.channels:
            raise ValueError(
                f"{self.name}: data has {pixels.shape[-1]} channels, layer expects {self.channels}."
            )
        if len(pixels) > max_pixels:
            rng = np.random.default_rng(seed)
            pixels = pixels[rng.choice(len(pixels), max_pixels, replace=False)]
        qs = np.arange(1, self.levels + 1) / (self.levels + 1)
        if self.per_channel:
            t = np.quantile(pixels, qs, axis=0).T  # (C, M)
        else:
            t = np.quantile(pixels.reshape(-1), qs)[None]
        t = self._make_valid(t)
        self.set_thresholds(t)
        return self.thresholds()

    def _make_valid(self, t: np.ndarray) -> np.ndarray:
        # Quantiles of 8-bit data tie often; spread ties by at least half a level so
        # each plane still carries information.
        t = np.clip(t.astype("float64"), 0.5, PIXEL_MAX - 0.5)
        gap = 0.5
        for row in t:
            for k in range(1, len(row)):
                row[k] = max(row[k], row[k - 1] + gap)
            for k in range(len(row) - 1, -1, -1):
                upper = PIXEL_MAX - gap * (len(row) - k)
                row[k] = min(row[k], upper)
                if k < len(row) - 1:
                    row[k] = min(row[k], row[k + 1] - gap)
        return t

    # -- forward ---------------------------------------------------------------
    def call(self, inputs):
        x = _as_pixels(inputs, self)
        t = self._effective_thresholds_tensor()  # (rows, M) half-integers
        if not self.per_channel:
            t = tf.tile(t, [self.channels, 1])
        # Repeat each channel M times, then one SUB against a (C*M,) constant: LCE keeps
        # this small instead of folding a full-resolution broadcast into the flatbuffer.
        x = tf.repeat(x, self.levels, axis=-1)
        return lq.quantizers.ste_sign(x - tf.reshape(t, [-1]), clip_value=self.ste_window)

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape[:-1]).concatenate([input_shape[-1] * self.levels])

    def get_config(self):
        config = super().get_config()
        config.update(
            levels=self.levels,
            per_channel=self.per_channel,
            ste_window=self.ste_window,
            threshold_lr_multiplier=self.threshold_lr_multiplier,
            initial_thresholds=self.initial_thresholds,
            min_gap=self.min_gap,
        )
        return config


@tf.keras.utils.register_keras_serializable(package="glt_keras")
class FixedThermometer(LearnedThermometer):
    """Thermometer code with fixed, uniform thresholds ``255 * k / (M + 1)`` (not trained).

    The paper's fixed-thermometer baseline: same interface and output as
    :class:`LearnedThermometer` (the same effective, half-integer thresholds: with 8 levels
    ``85`` and ``170`` act as ``85.5`` and ``170.5``), but the thresholds are a constant.

    Example:
        >>> FixedThermometer(levels=3)(tf.constant([[[[100.0]]]])).numpy().ravel().tolist()
        [1.0, -1.0, -1.0]
    """

    trainable_thresholds = False


@tf.keras.utils.register_keras_serializable(package="glt_keras")
class BinaryPlanes(_Float32Encoding):
    """Natural binary coding: the 8 bit planes of each uint8 pixel as +-1 (MSB first).

    The paper's "what an ADC gives you" baseline. Output channel ``c * 8 + k`` is bit
    ``7 - k`` of channel ``c``. Pixels are rounded and clipped to [0, 255] first.

    Example:
        >>> BinaryPlanes()(tf.constant([[[[129.0]]]])).numpy().ravel().tolist()
        [1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, 1.0]
    """

    levels = 8

    def build(self, input_shape):
        self.channels = _check_channels(self, input_shape)
        super().build(input_shape)

    def call(self, inputs):
        x = tf.clip_by_value(tf.round(_as_pixels(inputs, self)), 0.0, PIXEL_MAX)
        x = tf.repeat(x, self.levels, axis=-1)
        weights = tf.constant([2.0 ** (7 - k) for k in range(8)] * self.channels)
        bits = tf.math.floormod(tf.math.floor(x / weights), 2.0)
        # No useful gradient through a bit plane: a straight sign of (bit - 0.5).
        return lq.quantizers.ste_sign(tf.stop_gradient(bits) - 0.5)

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape[:-1]).concatenate([input_shape[-1] * self.levels])


@tf.keras.utils.register_keras_serializable(package="glt_keras")
class RealInput(_Float32Encoding):
    """Real-valued input path for teachers: pixels ``/ 127.5 - 1`` into [-1, 1].

    Example:
        >>> RealInput()(tf.constant([[[[0.0, 255.0]]]])).numpy().ravel().tolist()
        [-1.0, 1.0]
    """

    levels = 1

    def call(self, inputs):
        return _as_pixels(inputs, self) / 127.5 - 1.0


ENCODINGS = {
    "glt": LearnedThermometer,
    "fixed": FixedThermometer,
    "binary_planes": BinaryPlanes,
    "real": RealInput,
}


def get_encoding(kind: str, **kwargs) -> tf.keras.layers.Layer:
    """Build an input encoding by kind: ``glt``, ``fixed``, ``binary_planes`` or ``real``."""
    if kind not in ENCODINGS:
        raise ValueError(f"Unknown input encoding {kind!r}; choose one of {sorted(ENCODINGS)}.")
    cls = ENCODINGS[kind]
    if cls in (BinaryPlanes, RealInput):
        kwargs.pop("levels", None)
        kwargs = {k: v for k, v in kwargs.items() if k == "name"}
    return cls(**kwargs)


def plot_transfer_curve(thermometer, path, *, title=None):
    """Save the learned tone curve (pixel value -> number of +1 planes) per channel as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = thermometer.effective_thresholds()  # what the forward pass compares with
    pixels = np.arange(256)
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    colors = ["tab:red", "tab:green", "tab:blue"] + [None] * 16
    uniform = snap_thresholds(PIXEL_MAX * np.arange(1, t.shape[1] + 1) / (t.shape[1] + 1)).numpy()
    ax.plot(pixels, (pixels[:, None] >= uniform[None]).sum(1), "k:", label="uniform")
    for c in range(t.shape[0]):
        level = (pixels[:, None] >= t[c][None]).sum(1)
        ax.step(pixels, level, where="post", color=colors[c], label=f"channel {c}")
    ax.set_xlabel("pixel value")
    ax.set_ylabel("thermometer level (# of +1 planes)")
    ax.set_xlim(0, 255)
    ax.set_title(title or f"{thermometer.name}: learned transfer curve")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path = str(path)
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    import os

    os.replace(tmp, path)
    return path
