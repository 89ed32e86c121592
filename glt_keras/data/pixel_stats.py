"""Pixel statistics of a training set: per-channel histograms and the thresholds of a fixed
thermometer placed at the data's quantiles (histogram equalisation as a fixed encoding).

The quantile thermometer with ``M`` levels has, for each channel ``c``, the thresholds
``t[c, k] = quantile(pixels of channel c, (k + 1) / (M + 1))``, ``k = 0 .. M - 1``, with numpy's
default (linear) interpolation: the same definition as
:meth:`glt_keras.layers.LearnedThermometer.init_from_data`, but exact (from the full histogram,
not a sample of pixels). Compute it from training images only. Use it as
``FixedThermometer(levels=M, initial_thresholds=t)`` (a recipe's
``model: {encoding: fixed, encoding_kwargs: {initial_thresholds: t}}``).
"""
from __future__ import annotations

import numpy as np

__all__ = ["pixel_histogram", "quantile_thresholds", "spread_ties"]


def pixel_histogram(images, *, chunk: int = 1024) -> np.ndarray:
    """Counts of each value 0..255 per channel: int64 ``(C, 256)`` of uint8 ``(N, H, W, C)`` images."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"pixel_histogram: expects uint8 pixels, got {images.dtype}.")
    channels = images.shape[-1]
    counts = np.zeros((channels, 256), np.int64)
    for start in range(0, len(images), chunk):  # bounded memory on large sets
        block = images[start:start + chunk].reshape(-1, channels)
        for c in range(channels):
            counts[c] += np.bincount(block[:, c], minlength=256)
    return counts


def _quantiles_from_counts(counts: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """``np.quantile(values, qs)`` (linear interpolation) of the values a 256-bin histogram counts."""
    n = int(counts.sum())
    if n == 0:
        raise ValueError("quantile_thresholds: no pixels.")
    cum = np.cumsum(counts)
    h = (n - 1) * qs
    lo = np.floor(h).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    # The i-th smallest value (0-based) is the first v whose cumulative count exceeds i.
    v_lo = np.searchsorted(cum, lo, side="right").astype(np.float64)
    v_hi = np.searchsorted(cum, hi, side="right").astype(np.float64)
    return v_lo + (h - lo) * (v_hi - v_lo)


def spread_ties(thresholds, *, gap: float = 1.0, lo: float = 0.5, hi: float = 254.5) -> np.ndarray:
    """Rows of non-decreasing thresholds made usable by a thermometer on uint8 pixels: inside
    ``[lo, hi]`` and at least ``gap`` apart, moving as few as possible (upwards first, then
    downwards from the top). A threshold ``t`` acts on an integer pixel ``p`` as ``p > floor(t)``
    (``LearnedThermometer.effective_thresholds``), so thresholds a whole pixel apart always give
    distinct planes; quantiles that tie (saturated pixels, few distinct values) are spread."""
    t = np.clip(np.array(thresholds, dtype=np.float64, ndmin=2), lo, hi)
    levels = t.shape[-1]
    if hi - lo < gap * (levels - 1):
        raise ValueError(f"spread_ties: {levels} thresholds {gap} apart do not fit in [{lo}, {hi}].")
    for row in t:
        for k in range(1, levels):
            row[k] = max(row[k], row[k - 1] + gap)
        for k in range(levels - 1, -1, -1):
            row[k] = min(row[k], hi - gap * (levels - 1 - k))
            if k < levels - 1:
                row[k] = min(row[k], row[k + 1] - gap)
    return t


def quantile_thresholds(images=None, levels: int = 8, *, histogram=None) -> np.ndarray:
    """Thresholds ``(C, levels)`` at the per-channel quantiles ``k / (levels + 1)`` of the pixels
    of ``images`` (uint8 ``(N, H, W, C)``), or of a :func:`pixel_histogram` ``(C, 256)``.

    Exactly ``np.quantile(images[..., c], k / (levels + 1))`` wherever consecutive quantiles are at
    least one pixel apart and inside ``[0.5, 254.5]``; elsewhere (ties) spread by
    :func:`spread_ties`.

        >>> x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
        >>> quantile_thresholds(x, 3).tolist()
        [[63.75, 127.5, 191.25]]
    """
    if int(levels) != levels or levels < 1:
        raise ValueError(f"levels must be a positive integer, got {levels!r}.")
    counts = pixel_histogram(images) if histogram is None else np.asarray(histogram, np.int64)
    qs = np.arange(1, levels + 1) / (levels + 1)
    t = np.stack([_quantiles_from_counts(row, qs) for row in counts])
    return spread_ties(t)
