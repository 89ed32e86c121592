"""The candidates of partial binarization (every conv of a ``glt_net``) and the cost model:
the real-valued fraction of MACs or of int8-counted weight bytes, checked exactly against a budget."""
from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable

import numpy as np
import tensorflow as tf

from ... import models
from ...recipe import Recipe, load_recipe


METHODS = ("gated", "greedy", "first_last", "random")
BY = ("macs", "bytes")
#: Bits per weight of a real-valued layer in the byte budget (int8 deployment).
REAL_BITS = 8



@dataclass(frozen=True)
class Candidate:
    """A convolution that may stay real-valued."""

    name: str  # "block3" / "head" (glt_net's real_layers name) or the conv layer's name
    conv: str  # the Keras conv layer's name
    index: int  # position among the candidates (glt_net's real_layers index)
    params: int
    macs: int
    precision: str  # "binary" or "real" in the model it was read from


def _short_name(conv_name: str) -> str:
    m = re.fullmatch(r"(block\d+|head)_conv", conv_name)
    return m.group(1) if m else conv_name


def _as_model(model_or_config) -> tf.keras.Model:
    """A Keras model from a model, a Recipe, a recipe name / path or glt_net kwargs (logits)."""
    if isinstance(model_or_config, tf.keras.Model):
        return model_or_config
    if isinstance(model_or_config, dict):
        return models.glt_net(**{**model_or_config, "classifier_activation": None})
    return _as_recipe(model_or_config).build_model(classifier_activation=None)


def _as_recipe(recipe) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else load_recipe(recipe)


def candidates(model_or_config) -> list[Candidate]:
    """Every convolution of the model, in order, with its weights and MACs."""
    if isinstance(model_or_config, (list, tuple)) and all(isinstance(c, Candidate) for c in model_or_config):
        return list(model_or_config)
    model = _as_model(model_or_config)
    out = [Candidate(_short_name(c.name), c.name, i, int(c.params), int(c.macs), c.precision)
           for i, c in enumerate(models.layer_costs(model))]
    if not out:
        raise ValueError(f"{model.name} has no convolution to keep real-valued.")
    return out


def resolve_layers(cands: list[Candidate], layers: Iterable) -> list[str]:
    """Candidate names of ``layers`` (``"block3"``, ``"head"``, conv names or indices), in order."""
    by_name = {c.name: c for c in cands}
    by_name.update({c.conv: c for c in cands})
    chosen = set()
    for item in layers or ():
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            if not 0 <= int(item) < len(cands):
                raise ValueError(f"Layer index {item} out of range: {len(cands)} candidate layers.")
            chosen.add(cands[int(item)].name)
        elif str(item) in by_name:
            chosen.add(by_name[str(item)].name)
        else:
            raise ValueError(f"Unknown layer {item!r}: candidates are {[c.name for c in cands]}.")
    return [c.name for c in cands if c.name in chosen]


def _check_by(by: str) -> str:
    if by not in BY:
        raise ValueError(f"by must be one of {BY}, got {by!r}.")
    return by


def _check_budget(budget) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float, np.integer, np.floating)) \
            or not np.isfinite(budget) or not 0.0 <= float(budget) <= 1.0:
        raise ValueError(f"budget must be a fraction in [0, 1], got {budget!r}.")
    return float(budget)


def _unit_costs(cands: list[Candidate], by: str) -> dict:
    return {c.name: (c.macs if by == "macs" else c.params) for c in cands}


def _exact_fraction(real_units: int, total_units: int, by: str) -> Fraction:
    if total_units <= 0:
        return Fraction(0)
    if by == "macs":
        return Fraction(real_units, total_units)
    # bytes: R real weights at 1 byte, the other P - R at 1/8 byte.
    bits_per_real = REAL_BITS
    return Fraction(bits_per_real * real_units, (bits_per_real - 1) * real_units + total_units)


def _fits(real_units: int, total_units: int, by: str, budget: float) -> bool:
    return _exact_fraction(real_units, total_units, by) <= Fraction(budget)


def budget_cost(model_or_config, real_layers, *, by: str = "macs") -> float:
    """The fraction of the network's cost (``by="macs"`` or ``"bytes"``) that ``real_layers`` take.

    ``model_or_config``: a Keras model, a Recipe, a recipe name / path, glt_net kwargs
    or a list of :class:`Candidate`. See the module docstring for the cost model.

    Example:
        >>> budget_cost({"input_shape": (32, 32, 3), "num_classes": 10, "topology": "tiny"},
        ...             ["head"], by="macs")  # doctest: +ELLIPSIS
        0.00...
    """
    by = _check_by(by)
    cands = candidates(model_or_config)
    names = set(resolve_layers(cands, real_layers))
    units = _unit_costs(cands, by)
    real = sum(units[c.name] for c in cands if c.name in names)
    return float(_exact_fraction(real, sum(units.values()), by))


def cost_summary(model_or_config, real_layers=()) -> dict:
    """MACs and weight bytes of a precision assignment (int8 and float32 real weights).

    ``weight_bytes_int8``: real weights at 1 byte, binary at 1/8 byte (the byte budget's
    count); ``weight_bytes_float32``: real weights at 4 bytes (what the flatbuffer holds).
    """
    cands = candidates(model_or_config)
    names = set(resolve_layers(cands, real_layers))
    real_params = sum(c.params for c in cands if c.name in names)
    binary_params = sum(c.params for c in cands if c.name not in names)
    binary_bytes = (binary_params + 7) // 8
    return {
        "real_layers": [c.name for c in cands if c.name in names],
        "macs": sum(c.macs for c in cands),
        "real_macs": sum(c.macs for c in cands if c.name in names),
        "params": real_params + binary_params,
        "real_params": real_params,
        "binary_params": binary_params,
        "weight_bytes_int8": real_params + binary_bytes,
        "weight_bytes_float32": 4 * real_params + binary_bytes,
        "cost_macs": budget_cost(cands, names, by="macs"),
        "cost_bytes": budget_cost(cands, names, by="bytes"),
    }

