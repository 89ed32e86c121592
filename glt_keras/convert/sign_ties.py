"""BatchNorm sign thresholds that sit on an integer: find them, move them off.

A binary convolution sums +-1 products, so its output (the accumulator) is an integer. When the
BatchNorm after it feeds only the next layer's sign (through max-pooling or a channel shuffle),
each channel's +-1 output flips where ``gamma * (acc - mean) / sqrt(var + eps) + beta`` crosses 0:
at ``acc* = mean - beta * sqrt(var + eps) / gamma``. If ``acc*`` lies on (or within float
rounding of) an integer that the accumulator can take, the sign of that channel is decided by
rounding: Keras computes the BatchNorm in float32 (differently with and without oneDNN, with and
without FMA), Larq Compute Engine and the C export fold it into their own thresholds, and they
can disagree on every image that reaches that accumulator. Training produces such channels: a
channel whose accumulator is constant has ``mean`` equal to that integer, and a ``beta`` decayed
to ~0 puts ``acc*`` on it (caltech101_binary's block7_bn had one, 6e-7 from the integer; the
conversion verified on one machine and failed on another).

:func:`separate_sign_ties` moves each such threshold half an accumulator step away, to the side
that keeps the decision exact (float64) arithmetic gives at the integer: every integer
accumulator gets the same sign as before in exact arithmetic, and now with a margin of half a
step in every implementation. Only ``beta`` changes, only for those channels, and only in
BatchNorms whose output is never used as a real value::

    >>> ties = separate_sign_ties(model)      # doctest: +SKIP
    >>> [f"{t.layer}[{t.channel}]" for t in ties]  # doctest: +SKIP
    ['block7_bn[93]']

``glt-keras zoo publish`` applies it before the weights are written; :func:`sign_ties` only
reports (the verifier names them as the likely cause of a mismatch).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SignTie", "sign_ties", "separate_sign_ties", "MARGIN"]

#: A threshold closer than this to an integer accumulator is a tie (accumulator units). float32
#: rounding of a BatchNorm over accumulators of a few thousand is ~1e-3 units at most.
MARGIN = 0.01

#: Layers between a BatchNorm and the next sign that keep each value's sign decision (a max of
#: values, a permutation of channels).
_PASS_THROUGH = ("MaxPooling2D", "MaxPool2D", "ChannelShuffle")


@dataclass(frozen=True)
class SignTie:
    """One channel whose sign threshold sits within ``MARGIN`` of an integer accumulator."""

    layer: str
    channel: int
    #: the integer accumulator the threshold sits on
    accumulator: int
    #: |threshold - accumulator|, in accumulator units
    distance: float
    #: the sign exact (float64) arithmetic gives at that accumulator: +1 or -1
    sign: int

    def __str__(self) -> str:
        return (f"{self.layer} channel {self.channel}: threshold {self.distance:.2g} from accumulator "
                f"{self.accumulator}")


#: Quantizers whose forward pass is exactly +-1 (larq's sign(0) = +1); not magnitude-aware ones.
_SIGNS = ("stesign", "approxsign", "swishsign")


def _is_sign(quantizer) -> bool:
    if quantizer is None:
        return False
    name = quantizer if isinstance(quantizer, str) else getattr(quantizer, "__name__", type(quantizer).__name__)
    return name.lower().replace("_", "") in _SIGNS


def _integer_accumulator(layer) -> bool:
    """A conv whose output is an integer: +-1 inputs times +-1 weights (padding adds +-1 or 0), no bias."""
    return (_is_sign(getattr(layer, "input_quantizer", None)) and _is_sign(getattr(layer, "kernel_quantizer", None))
            and not getattr(layer, "use_bias", True))


def _consumers(model) -> dict:
    """producer layer name -> [consumer layers] of a functional model."""
    consumers = {}
    for layer in model.layers:
        for node in getattr(layer, "_inbound_nodes", []):
            inbound = node.inbound_layers
            for producer in inbound if isinstance(inbound, (list, tuple)) else [inbound]:
                consumers.setdefault(producer.name, []).append(layer)
    return consumers


def _feeds_only_signs(layer, consumers, outputs) -> bool:
    """Every path from ``layer`` reaches a sign input quantizer through pass-through layers only
    (``outputs``: ids of the model's output tensors, whose real values are used)."""
    nexts = consumers.get(layer.name, [])
    if not nexts or id(layer.output) in outputs:
        return False
    for c in nexts:
        if type(c).__name__ in _PASS_THROUGH:
            if not _feeds_only_signs(c, consumers, outputs):
                return False
        elif not _is_sign(getattr(c, "input_quantizer", None)):
            return False
    return True


def _candidates(model):
    """The BatchNorms whose input is an integer accumulator and whose output only feeds signs."""
    import tensorflow as tf

    consumers = _consumers(model)
    outputs = {id(t) for t in model.outputs}
    found = []
    for layer in model.layers:
        if isinstance(layer, tf.keras.Model):
            found += _candidates(layer)
            continue
        if not isinstance(layer, tf.keras.layers.BatchNormalization) or not layer.built:
            continue
        producers = [n.inbound_layers for n in layer._inbound_nodes]
        producers = [p for ps in producers for p in (ps if isinstance(ps, (list, tuple)) else [ps])]
        if producers and all(_integer_accumulator(p) for p in producers) and _feeds_only_signs(layer, consumers, outputs):
            found.append(layer)
    return found


def _bn_affine(layer):
    """float64 (scale, beta, mean) of a BatchNormalization, y = scale * (x - mean) + beta (defaults where
    absent); scale is gamma / sqrt(var + epsilon)."""
    n = int(layer.moving_mean.shape[-1])
    gamma = np.asarray(layer.gamma.numpy(), np.float64) if layer.gamma is not None else np.ones(n)
    beta = np.asarray(layer.beta.numpy(), np.float64) if layer.beta is not None else np.zeros(n)
    var = np.asarray(layer.moving_variance.numpy(), np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = gamma / np.sqrt(var + float(layer.epsilon))
    return scale, beta, np.asarray(layer.moving_mean.numpy(), np.float64)


def _layer_ties(layer, margin: float) -> list:
    inv, beta, mean = _bn_affine(layer)
    with np.errstate(divide="ignore", invalid="ignore"):
        threshold = mean - beta / inv
    k = np.round(threshold)
    distance = np.abs(threshold - k)
    ties = []
    for c in np.flatnonzero(np.isfinite(threshold) & (inv != 0) & (distance < margin)):
        out = inv[c] * (k[c] - mean[c]) + beta[c]
        ties.append(SignTie(layer.name, int(c), int(k[c]), float(distance[c]), 1 if out >= 0 else -1))  # larq: sign(0) = +1
    return ties


def sign_ties(model, *, margin: float = MARGIN) -> list:
    """Every :class:`SignTie` of ``model`` (nested models included); ``[]`` when there is none."""
    if not (isinstance(margin, (int, float)) and 0 < margin < 0.5):
        raise ValueError(f"margin must be in (0, 0.5) accumulator units, got {margin!r}.")
    return [t for layer in _candidates(model) for t in _layer_ties(layer, margin)]


def separate_sign_ties(model, *, margin: float = MARGIN) -> list:
    """Move every tied threshold of ``model`` (in place) to the half-integer beside its integer,
    on the side that keeps exact arithmetic's sign there; returns the ties it moved."""
    moved = []
    for layer in _candidates(model):
        ties = _layer_ties(layer, margin)
        if not ties:
            continue
        if layer.beta is None:
            raise ValueError(f"{layer.name}: BatchNormalization without beta (center=False) has sign ties "
                             f"({', '.join(str(t) for t in ties)}) that only beta could move.")
        inv, beta, mean = _bn_affine(layer)
        for t in ties:
            c = t.channel
            # +1 at the integer: the threshold goes below it when BN rises with the accumulator.
            target = t.accumulator - 0.5 if (inv[c] > 0) == (t.sign > 0) else t.accumulator + 0.5
            beta[c] = -inv[c] * (target - mean[c])
        layer.beta.assign(beta.astype(layer.beta.dtype.as_numpy_dtype))
        moved += ties
    return moved
