"""Budget-aware partial binarization: which layers of a binary network stay real-valued.

A fully binarized network loses accuracy mostly in a few layers. Keeping *those* layers
real-valued (real weights and real inputs; an unquantized ``CONV_2D`` in the LCE
flatbuffer, every other convolution an ``LceBconv2d``) recovers much of the gap for a
small price in size and compute. This module chooses the layers under an explicit
budget, after MixBin (Bamba et al., "Partial Binarization of Neural Networks for
Budget-Aware Efficient Learning" / "MixBin: Towards Budgeted Binarization", WACV 2024,
arXiv 2211.06739).

    >>> sel = select_layers("cifar10_binary", 0.10, by="macs", method="gated")  # doctest: +SKIP
    >>> print(sel.to_markdown())  # layers, costs, scores, learned gates  # doctest: +SKIP
    >>> train_selection("cifar10_binary", sel, out_dir="runs/mixbin_c10")  # doctest: +SKIP

or ``glt-keras mixbin cifar10_binary --budget 0.1 --method gated --train`` and
``benchmarks/mixbin_table.py`` for the budgets x methods table.

The candidates
--------------
Every convolution of a ``glt_net`` model: ``block1`` ... ``blockN`` and ``head``, the
names ``glt_net(real_layers=...)`` takes (:func:`glt_keras.models.glt_net` builds the
chosen network; ``recipe.with_changes(model={"real_layers": [...]})`` makes the recipe).
A real layer computes ``BN(conv(x, W))`` with the latent weights ``W`` and the real
input ``x`` (the previous block's BatchNorm output, or the thermometer's +-1 planes for
``block1``); a following binary layer takes its sign, so there is no ReLU in between
(a ReLU before a sign would make every bit +1).

The cost model (``by="macs"`` or ``by="bytes"``)
------------------------------------------------
Only the convolutions' weights and multiply-accumulates count, since they are the only
part that changes with precision (BatchNorm, thresholds and the pooling are the same
either way); per layer, from :func:`glt_keras.models.layer_costs`:

- ``params = kh * kw * (cin / groups) * cout``, ``MACs = params * H_out * W_out``.
- ``by="macs"``: the fraction of the network's MACs that are real-valued,
  ``sum_real MACs / sum_all MACs`` (a binary MAC and a real MAC both count one).
- ``by="bytes"``: the fraction of the model's weight bytes that are real-valued, a real
  weight counted at **8 bits** (int8, the deployment format) and a binary one at 1 bit:
  ``R / (R + (P - R) / 8)`` with ``R`` the real layers' weights and ``P`` all weights.

The budget ``b`` is the largest fraction allowed: ``cost(S) <= b``, checked exactly
(rational arithmetic), so a selection never exceeds it; ``b = 0`` gives the fully
binary network. ``model_int8.tflite`` stores the real layers at 1 byte per weight,
``model.tflite`` at 4 (see "Deployment" below); :func:`cost_summary` reports both.

The methods
-----------
All four score each candidate layer, then pick a set within the budget:

- ``"gated"`` (default, MixBin-like): every candidate becomes a
  :class:`MixBinGatedConv2D`, which computes both precisions from **one shared latent
  kernel** and mixes their normalised outputs with a learned gate,
  ``y = g * BN_real(conv(x, W)) + (1 - g) * BN_bin(conv(sign(x), sign(W)))``,
  ``g = sigmoid(logit)``. The network, its thresholds, both BatchNorms of every layer and
  the gate logits train jointly for ``steps`` steps on cross-entropy plus a budget
  penalty ``lam * relu(E[cost](g) - b) / b``, ``E[cost]`` being the cost model above with
  each layer weighted by its gate. The gates start at ``g = b`` (the expected cost equals
  the budget) and the penalty makes the layers *compete* for the budget: a gate can only
  grow if another shrinks. A layer's **score** is then read off the trained gated
  network as the loss it saves when real: ``L(g_l = 0) - L(g_l = 1)`` on held-out images,
  the other gates at their learned values and every BatchNorm's statistics re-estimated
  for the toggled network (a finite-difference sensitivity in the budgeted context, where
  both paths of every layer are trained). The set is the exact 0/1 **knapsack**
  solution: the largest total score whose cost fits the budget (a layer with a score
  <= 0 is never taken, so a budget may be left partly unused).
- ``"greedy"``: one-at-a-time sensitivity by brief fine-tuning. The binary network
  trains ``steps`` steps; from there, the binary network and each single-layer-real
  variant fine-tune ``finetune_steps`` steps; the score is the held-out loss drop of that
  variant (BatchNorm statistics re-estimated after the switch and after the fine-tuning,
  as for the toggles of ``gated``). Layers are added in decreasing score per unit cost
  while they fit (the classic greedy rule for a knapsack, as in sensitivity-based
  mixed-precision searches). ``n + 1`` fine-tunes: the most expensive method. Its scores
  do not depend on the budget (``benchmarks/mixbin_table.py`` reuses them).
- ``"first_last"``: the usual practice: the first and the last layer stay real (both if
  they fit, else the one that fits; knapsack with score 1 for them, 0 for the rest).
- ``"random"``: seeded uniform random scores, knapsack: a random set that uses the budget.

Why a gate and a knapsack
-------------------------
Layer sensitivities interact: how much ``block3`` gains from being real depends on
which other layers are real and on the weights having been trained for that precision;
flipping one layer of a binary-trained network measures neither (the greedy baseline
fine-tunes to make up for the second). The gated network trains both precisions of every
layer at once in one network whose expected real-valued cost is held at the budget, which
is the cheap, differentiable relaxation of the combinatorial choice (one training run
instead of one per layer or per subset). The relaxed solution cannot be used directly:
the penalty is soft (the gates may overshoot the budget) and rounding gates at 0.5
ignores cost, while the gate values themselves are not additive benefits (under a
cost-weighted penalty the open gates equalise benefit *per cost*, so ``g`` says little
about the size of the benefit). So the gates shape the training, the toggled losses give
additive per-layer values in loss units, and an exact knapsack turns them into a set
that provably respects the hard budget. With ten-odd candidates the knapsack is solved
exactly by dynamic programming over the Pareto frontier of (cost, score) of the subsets
(:func:`knapsack`), no discretisation of the costs.

How this differs from MixBin
----------------------------
MixBin (as published) trains a network in which binary and full-precision components are
mixed with learned importances and arrives at the budgeted binary network (B2NN) by a
search that progressively makes components binary until the FLOP budget is met, then
fine-tunes it. Here the candidates are whole GLT blocks (the unit that LCE converts to
one op), the search is a single joint run with a budget penalty instead of an iterative
schedule, the selection is an exact knapsack over measured per-layer values instead of
progressive thresholding, and the chosen network is trained with the recipe, every method
with the same schedule so that they are compared on equal terms: from scratch, or (with
``init_weights``, closer to MixBin's fine-tuning of a trained network, and hours cheaper)
fine-tuned from the trained fully binary network, each real layer starting as the binary
conv it replaces (:func:`binary_start`), optionally with knowledge distillation
(``kd.teacher``). With ``init_weights`` the searches start from that network too. The
budget can be MACs (MixBin's FLOPs) or int8 bytes.

Deployment
----------
LCE converts a mixed model as expected: binary layers ``LceBconv2d``, real ones
``CONV_2D`` with float32 weights, verified against Keras by
:func:`glt_keras.convert.to_tflite` (``model.tflite``). For int8 real layers,
:func:`int8_real_export` folds each real layer's BatchNorm into it and wraps it in 8-bit
fake-quant nodes (input and output per tensor, calibrated min / max; weights per output
channel): LCE then emits an int8 ``CONV_2D`` (int8 weights, int32 bias) in the otherwise
binary graph (``model_int8.tflite``), about 4x smaller real layers. This is post-training
quantization, not QAT (``tfmot.quantization.keras.quantize_model`` cannot wrap larq
layers), and a binary layer after an int8 one can flip signs of values near 0, so the int8
flatbuffer is checked by its accuracy and top-1 agreement with the float Keras model
rather than by a tight tolerance (:func:`evaluate_variant`).
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import larq as lq
import tensorflow as tf

from .. import models
from ..data.augment import random_subset
from ..layers.binary import BinaryConv2D
from ..recipe import ZOO_DIR, Recipe, load_recipe

METHODS = ("gated", "greedy", "first_last", "random")
BY = ("macs", "bytes")
#: Bits per weight of a real-valued layer in the byte budget (int8 deployment).
REAL_BITS = 8


# ============================================================================ candidates and costs
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


# ============================================================================ selection rules
def knapsack(costs: dict, values: dict, fits: Callable[[int], bool]) -> list[str]:
    """Exact 0/1 knapsack: the subset of largest total value whose summed cost ``fits``.

    ``costs``: name -> non-negative integer cost (insertion order is the tie order);
    ``values``: name -> score (items with score <= 0 are never taken); ``fits(total)``:
    monotone feasibility of a total cost. Dynamic programming over the Pareto frontier of
    (cost, value) pairs of the subsets built so far: exact, and small for a few dozen
    items. Ties: higher value, then lower cost, then the earlier subset.

    Example:
        >>> knapsack({"a": 3, "b": 2, "c": 2}, {"a": 5.0, "b": 3.0, "c": 3.0}, lambda t: t <= 4)
        ['b', 'c']
    """
    frontier = [(0, 0.0, ())]
    for name, cost in costs.items():
        value = float(values.get(name, 0.0))
        if value <= 0 or not fits(cost):
            continue
        grown = [(c + cost, v + value, s + (name,)) for c, v, s in frontier if fits(c + cost)]
        merged = sorted(frontier + grown, key=lambda t: (t[0], -t[1]))
        frontier, best = [], -np.inf
        for state in merged:
            if state[1] > best + 1e-12:
                frontier.append(state)
                best = state[1]
    cost, value, chosen = max(frontier, key=lambda t: (t[1], -t[0]))
    return [n for n in costs if n in chosen]


def greedy_by_ratio(costs: dict, values: dict, fits: Callable[[int], bool]) -> list[str]:
    """Add items by decreasing value per unit cost (value > 0) while the total fits."""
    order = sorted((n for n in costs if values.get(n, 0) > 0),
                   key=lambda n: -values[n] / max(costs[n], 1))
    total, chosen = 0, set()
    for n in order:
        if fits(total + costs[n]):
            chosen.add(n)
            total += costs[n]
    return [n for n in costs if n in chosen]


@dataclass
class Selection:
    """The layers kept real-valued, and why."""

    layers: list
    cost: float
    budget: float
    by: str
    method: str
    #: candidate -> score (higher: more worth keeping real)
    scores: dict
    #: candidate -> its own cost fraction (``by``)
    costs: dict
    #: candidate -> {"params", "macs"}
    sizes: dict = field(default_factory=dict)
    #: method-specific numbers: learned gates, losses, ...
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return _json_safe(dataclasses.asdict(self))

    def to_markdown(self) -> str:
        lines = [f"MixBin selection ({self.method}, budget {self.budget:g} of {self.by}): "
                 f"real layers {self.layers or 'none (fully binary)'}, cost {self.cost:.4f}", "",
                 "| layer | params | MACs | cost | score | real |", "|---|---:|---:|---:|---:|:---:|"]
        for name, cost in self.costs.items():
            size = self.sizes.get(name, {})
            lines.append(f"| {name} | {size.get('params', '')} | {size.get('macs', '')} | {cost:.4f} | "
                         f"{self.scores.get(name, 0.0):.4g} | {'yes' if name in self.layers else ''} |")
        gates = self.details.get("gates")
        if gates:
            lines += ["", "learned gates: " + ", ".join(f"{k} {v:.3f}" for k, v in gates.items())]
        return "\n".join(lines) + "\n"


def select_from_scores(model_or_config, scores: dict, budget: float, *, by: str = "macs",
                       rule: str = "knapsack", method: str = "custom", details=None) -> Selection:
    """The :class:`Selection` that ``scores`` give under ``budget`` (``rule``: knapsack or greedy)."""
    by = _check_by(by)
    budget = _check_budget(budget)
    cands = candidates(model_or_config)
    if any(c.precision != "binary" for c in cands):
        raise ValueError("Layer selection starts from the fully binary network; these layers are "
                         f"real already: {[c.name for c in cands if c.precision != 'binary']}.")
    units = _unit_costs(cands, by)
    total = sum(units.values())
    fits = lambda t: _fits(t, total, by, budget)  # noqa: E731
    values = {c.name: float(scores.get(c.name, 0.0)) for c in cands}
    if rule == "knapsack":
        layers = knapsack(units, values, fits)
    elif rule == "greedy":
        layers = greedy_by_ratio(units, values, fits)
    else:
        raise ValueError(f"rule must be 'knapsack' or 'greedy', got {rule!r}.")
    chosen_units = sum(units[n] for n in layers)
    assert fits(chosen_units), "selection over budget"  # by construction
    return Selection(
        layers=layers,
        cost=float(_exact_fraction(chosen_units, total, by)),
        budget=budget,
        by=by,
        method=method,
        scores=values,
        costs={c.name: float(_exact_fraction(units[c.name], total, by)) for c in cands},
        sizes={c.name: {"params": c.params, "macs": c.macs} for c in cands},
        details=dict(details or {}),
    )


# ============================================================================ model surgery
def _consumers(config) -> dict:
    out: dict = {}
    for layer in config["layers"]:
        for node in layer.get("inbound_nodes", ()):
            for inbound in node:
                out.setdefault(inbound[0], []).append(layer["name"])
    return out


def _clone(model, config, extra_objects=None):
    with tf.keras.utils.custom_object_scope({**models.custom_objects(), **(extra_objects or {})}):
        return model.__class__.from_config(config)


def _real_conv_config(conf: dict) -> None:
    conf.update(input_quantizer=None, kernel_quantizer=None, kernel_constraint=None,
                pad_values=0.0, lce_check=False)


def with_real_layers(model: tf.keras.Model, real_layers) -> tf.keras.Model:
    """The same network and weights with ``real_layers`` switched to real-valued convs.

    Changes only those convolutions' configs (no quantizers, zero padding, no clip), as
    ``glt_net(real_layers=...)`` does for a real layer that feeds a binary one; it adds no
    ReLU between two consecutive real layers (build those with ``glt_net``).
    """
    cands = candidates(model)
    convs = {c.conv for c in cands if c.name in set(resolve_layers(cands, real_layers))}
    config = model.get_config()
    for layer in config["layers"]:
        if layer["name"] in convs:
            _real_conv_config(layer["config"])
    clone = _clone(model, config)
    clone.set_weights(model.get_weights())
    return clone


@tf.keras.utils.register_keras_serializable(package="glt_keras")
class MixBinGatedConv2D(BinaryConv2D):
    """A conv that is binary and real at once, from one latent kernel, mixed by a learned gate.

    ``y = g * BN_real(conv(x, W)) + (1 - g) * BN_bin(conv(sign(x), sign(W)))`` with
    ``g = sigmoid(gate_logit)``; ``W`` is the shared latent kernel (clipped to [-1, 1]),
    the binary path pads with +1 and the real path with 0, as the two precisions do in
    ``glt_net``. Each path has its own BatchNorm, so both are normalised before mixing
    (their raw scales differ by orders of magnitude). ``force_gate(v)`` pins ``g`` to
    ``v`` (``None``: the learned value) without retracing.
    """

    def __init__(self, *args, gate_init: float = 0.5, bn_momentum: float = 0.9, bn_epsilon: float = 1e-5,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.gate_init = float(gate_init)
        self.bn_momentum = float(bn_momentum)
        self.bn_epsilon = float(bn_epsilon)
        self.bn_binary = tf.keras.layers.BatchNormalization(momentum=bn_momentum, epsilon=bn_epsilon,
                                                            name="bn_binary")
        self.bn_real = tf.keras.layers.BatchNormalization(momentum=bn_momentum, epsilon=bn_epsilon,
                                                          name="bn_real")

    def build(self, input_shape):
        super().build(input_shape)
        g = min(max(self.gate_init, 1e-3), 1 - 1e-3)
        self.gate_logit = self.add_weight(
            name="gate_logit", shape=(), initializer=tf.keras.initializers.Constant(np.log(g / (1 - g))),
            trainable=True)
        self.gate_forced = self.add_weight(
            name="gate_forced", shape=(), initializer=tf.keras.initializers.Constant(-1.0), trainable=False)
        out_shape = self.compute_output_shape(input_shape)
        self.bn_binary.build(out_shape)
        self.bn_real.build(out_shape)

    def gate(self):
        return tf.where(self.gate_forced >= 0.0, self.gate_forced, tf.sigmoid(self.gate_logit))

    def force_gate(self, value: Optional[float]) -> None:
        self.gate_forced.assign(-1.0 if value is None else float(value))

    def paths(self, inputs):
        """The two convolutions before their BatchNorms: ``(binary, real)``."""
        y_binary = super().call(inputs)  # sign(x), sign(W), +1 padding
        with lq.context.quantized_scope(False):  # the latent W, the real x, zero padding
            y_real = tf.keras.layers.Conv2D.call(self, inputs)
        return y_binary, y_real

    def call(self, inputs, training=None):
        y_binary, y_real = self.paths(inputs)
        g = tf.cast(self.gate(), y_real.dtype)
        return (g * self.bn_real(y_real, training=training)
                + (1.0 - g) * self.bn_binary(y_binary, training=training))

    def get_config(self):
        return {**super().get_config(), "gate_init": self.gate_init, "bn_momentum": self.bn_momentum,
                "bn_epsilon": self.bn_epsilon}


def gated_model(model: tf.keras.Model, *, gate_init: float = 0.5, layers=None) -> tf.keras.Model:
    """The network with each candidate ``conv -> BN`` replaced by a :class:`MixBinGatedConv2D`.

    The BatchNorm layer becomes an identity (its job moves inside the gated conv: one BN per
    path); weights are copied (the conv kernel to the shared kernel, the BN to both paths).
    ``layers``: the candidates to gate (default all).
    """
    cands = candidates(model)
    names = set(resolve_layers(cands, layers)) if layers is not None else {c.name for c in cands}
    convs = {c.conv: c for c in cands if c.name in names}
    config = model.get_config()
    consumers = _consumers(config)
    by_name = {layer["name"]: layer for layer in config["layers"]}
    bn_of = {}
    for conv in convs:
        after = consumers.get(conv, [])
        if len(after) != 1 or by_name[after[0]]["class_name"] != "BatchNormalization":
            raise ValueError(f"{conv}: a gated layer needs the conv to feed exactly one BatchNormalization.")
        bn = by_name[after[0]]
        bn_of[conv] = bn["name"]
        conf = by_name[conv]
        conf["class_name"] = "MixBinGatedConv2D"
        conf["registered_name"] = "glt_keras>MixBinGatedConv2D"
        conf["config"].update(gate_init=float(gate_init), bn_momentum=float(bn["config"].get("momentum", 0.9)),
                              bn_epsilon=float(bn["config"].get("epsilon", 1e-5)))
        conf["config"].pop("build_config", None)
        bn.update(class_name="Activation", module="keras.layers", registered_name=None,
                  config={"name": bn["name"], "trainable": True, "dtype": bn["config"].get("dtype", "float32"),
                          "activation": "linear"})
        bn.pop("build_config", None)
    gated = _clone(model, config, {"glt_keras>MixBinGatedConv2D": MixBinGatedConv2D})
    for layer in model.layers:
        target = gated.get_layer(layer.name)
        if layer.name in convs:
            target.kernel.assign(layer.kernel)
        elif layer.name in bn_of.values():
            continue
        elif layer.weights:
            target.set_weights(layer.get_weights())
    for conv, bn in bn_of.items():
        target = gated.get_layer(conv)
        target.bn_binary.set_weights(model.get_layer(bn).get_weights())
        target.bn_real.set_weights(model.get_layer(bn).get_weights())
    return gated


# ============================================================================ int8 real layers (export)
@tf.keras.utils.register_keras_serializable(package="glt_keras")
class Int8FoldedConv2D(BinaryConv2D):
    """Export form of a real layer: BatchNorm folded into the conv, 8-bit fake quantization.

    ``fq8(conv(fq8(x; input_range), fq8_per_channel(W')) + b'; output_range)`` with ``W'``, ``b'``
    the BN-folded kernel and bias; the weights are symmetric per output channel (narrow
    range). LCE's converter turns the fake-quant nodes into an int8 ``CONV_2D`` (int8
    weights, int32 bias) with a ``QUANTIZE`` before it; the binary layers stay ``LceBconv2d``.
    """

    def __init__(self, *args, input_range=(-1.0, 1.0), output_range=(-1.0, 1.0), **kwargs):
        kwargs.update(input_quantizer=None, kernel_quantizer=None, kernel_constraint=None, use_bias=True,
                      lce_check=False)
        kwargs.setdefault("pad_values", 0.0)
        super().__init__(*args, **kwargs)
        self.input_range = tuple(float(v) for v in input_range)
        self.output_range = tuple(float(v) for v in output_range)

    def call(self, inputs):
        lo, hi = self.input_range
        x = tf.quantization.fake_quant_with_min_max_args(inputs, min=lo, max=hi, num_bits=8)
        bound = tf.maximum(tf.reduce_max(tf.abs(self.kernel), axis=[0, 1, 2]), 1e-8)
        w = tf.quantization.fake_quant_with_min_max_vars_per_channel(self.kernel, -bound, bound, num_bits=8,
                                                                     narrow_range=True)
        y = self._jit_compiled_convolution_op(x, w) if self.groups > 1 else self.convolution_op(x, w)
        y = tf.nn.bias_add(y, self.bias)
        lo, hi = self.output_range
        return tf.quantization.fake_quant_with_min_max_args(y, min=lo, max=hi, num_bits=8)

    def get_config(self):
        config = super().get_config()
        for key in ("input_quantizer", "kernel_quantizer", "kernel_constraint", "use_bias", "lce_check"):
            config.pop(key, None)
        return {**config, "input_range": list(self.input_range), "output_range": list(self.output_range)}


def _int8_range(values, headroom: float = 1.0) -> tuple:
    lo = min(0.0, float(np.min(values)) * headroom)
    hi = max(0.0, float(np.max(values)) * headroom)
    if hi - lo < 1e-6:
        hi = lo + 1e-3
    return lo, hi


def int8_real_export(model: tf.keras.Model, calibration_images) -> tf.keras.Model:
    """The export form of a mixed model whose real layers convert to int8 ``CONV_2D``.

    Every real conv (no quantizers) that feeds one BatchNorm becomes an
    :class:`Int8FoldedConv2D` with the BN folded in and input / output ranges calibrated as
    min / max over ``calibration_images`` (raw pixels); native grouped convolutions
    (:func:`glt_keras.models.for_export`). Binary layers are unchanged.
    """
    model = models.for_export(model)
    config = model.get_config()
    consumers = _consumers(config)
    by_name = {layer["name"]: layer for layer in config["layers"]}
    folds = {}
    for layer in model.layers:
        if not isinstance(layer, tf.keras.layers.Conv2D) or getattr(layer, "kernel_quantizer", 1) is not None \
                or getattr(layer, "input_quantizer", 1) is not None:
            continue
        after = consumers.get(layer.name, [])
        if len(after) != 1 or not isinstance(model.get_layer(after[0]), tf.keras.layers.BatchNormalization):
            continue
        folds[layer.name] = after[0]
    if not folds:
        return model
    x = np.asarray(calibration_images, np.float32)
    probe = tf.keras.Model(model.inputs, [t for conv, bn in folds.items()
                                          for t in (model.get_layer(conv).input, model.get_layer(bn).output)])
    outs = probe.predict(x, batch_size=64, verbose=0)
    ranges = {conv: (_int8_range(outs[2 * i]), _int8_range(outs[2 * i + 1])) for i, conv in enumerate(folds)}
    for conv, bn in folds.items():
        conf = by_name[conv]
        conf["class_name"] = "Int8FoldedConv2D"
        conf["registered_name"] = "glt_keras>Int8FoldedConv2D"
        for key in ("input_quantizer", "kernel_quantizer", "kernel_constraint", "use_bias", "lce_check"):
            conf["config"].pop(key, None)
        conf["config"].update(input_range=list(ranges[conv][0]), output_range=list(ranges[conv][1]))
        conf["config"].pop("build_config", None)
        bn_conf = by_name[bn]
        bn_conf.update(class_name="Activation", module="keras.layers", registered_name=None,
                       config={"name": bn, "trainable": True, "dtype": "float32", "activation": "linear"})
        bn_conf.pop("build_config", None)
    exported = _clone(model, config, {"glt_keras>Int8FoldedConv2D": Int8FoldedConv2D})
    for layer in model.layers:
        if layer.name in folds.values() or not layer.weights:
            continue
        target = exported.get_layer(layer.name)
        if layer.name in folds:
            bn = model.get_layer(folds[layer.name])
            gamma, beta, mean, var = (w.numpy() for w in (bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance))
            scale = gamma / np.sqrt(var + bn.epsilon)
            target.kernel.assign(layer.kernel.numpy() * scale)
            target.bias.assign(beta - mean * scale)
        else:
            target.set_weights(layer.get_weights())
    return exported


# ============================================================================ data and training helpers
def _prepare_data(model_or_recipe, data, val_data, *, subset, data_dir, seed):
    """(train arrays, held-out arrays, recipe or None)."""
    recipe = None
    if not isinstance(model_or_recipe, (tf.keras.Model, dict)):
        recipe = _as_recipe(model_or_recipe)
    if data is None:
        if recipe is None:
            raise ValueError("method needs data: pass data=(x, y) (uint8 images, int labels).")
        from .splits import load_splits

        splits = load_splits(recipe, data_dir=data_dir, subset=subset)
        data = splits.train
        if val_data is None and splits.val is not None:
            val_data = splits.val
    x, y = (np.asarray(a) for a in data)
    if val_data is None:  # hold out a quarter of the images
        rng = np.random.default_rng(seed)
        idx = rng.permutation(len(y))
        cut = max(1, len(y) // 4)
        val_data = (x[idx[:cut]], y[idx[:cut]])
        x, y = x[idx[cut:]], y[idx[cut:]]
    return (x, y), tuple(np.asarray(a) for a in val_data), recipe


def _train_stream(train, recipe, batch_size, seed):
    from ..data import make_dataset

    x, y = train
    if recipe is not None:
        from .splits import make_train_dataset

        ds = make_train_dataset(recipe, x, y, batch_size=min(batch_size, len(y)))
    else:
        ds = make_dataset(x.astype(np.uint8), y, batch_size=min(batch_size, len(y)), training=True, seed=seed,
                          drop_remainder=True)
    return iter(ds.repeat())


def _is_gate(variable) -> bool:
    return "gate_logit" in variable.name


def _optimizer(variables, lr: float, gate_lr: float):
    """Adam on the latent binary weights, on the gate logits (``gate_lr``) and on the rest."""
    pairs = []
    if any(lq.optimizers.Bop.is_binary_variable(v) for v in variables):
        pairs.append((lq.optimizers.Bop.is_binary_variable, tf.keras.optimizers.legacy.Adam(lr)))
    if any(_is_gate(v) for v in variables):
        pairs.append((_is_gate, tf.keras.optimizers.legacy.Adam(gate_lr)))
    return lq.optimizers.CaseOptimizer(*pairs, default_optimizer=tf.keras.optimizers.legacy.Adam(lr))


def _ce(y, logits):
    return tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(
        tf.cast(tf.reshape(y, [-1]), tf.int32), tf.cast(logits, tf.float32), from_logits=True))


def _fit(model, stream, steps: int, *, lr: float, gate_lr: float = 0.0, penalty=None) -> list:
    """``steps`` Adam steps on cross-entropy (+ ``penalty()``); returns the loss per step."""
    variables = model.trainable_variables
    optimizer = _optimizer(variables, lr, gate_lr)

    def step(x, y):
        with tf.GradientTape() as tape:
            loss = _ce(y, model(x, training=True))
            total = loss + (penalty() if penalty is not None else 0.0)
        optimizer.apply_gradients(zip(tape.gradient(total, variables), variables))
        return loss

    if steps >= 20:  # tracing costs more than a few eager steps
        step = tf.function(step)
    return [float(step(*next(stream))) for _ in range(int(steps))]


def _mean_loss(model, x, y, batch_size: int = 128) -> float:
    total = 0.0
    for start in range(0, len(y), batch_size):
        xb = tf.constant(x[start:start + batch_size], tf.float32)
        total += float(_ce(y[start:start + batch_size], model(xb, training=False))) * len(xb)
    return total / len(y)


def _at_size(images, size_hw) -> np.ndarray:
    """Raw pixels as float32 at ``size_hw`` (training images may be stored larger)."""
    images = np.asarray(images)
    if tuple(images.shape[1:3]) == tuple(size_hw):
        return images.astype(np.float32)
    return tf.image.resize(images, tuple(size_hw), antialias=True).numpy()


def _bn_after(model, conv_name: str, consumers: Optional[dict] = None):
    """The BatchNormalization layer that alone consumes ``conv_name``'s output, else None."""
    after = (consumers if consumers is not None else _consumers(model.get_config())).get(conv_name, [])
    bn = model.get_layer(after[0]) if len(after) == 1 else None
    return bn if isinstance(bn, tf.keras.layers.BatchNormalization) else None


def _recalibrate_bn(model, conv_name: str, x) -> None:
    """Set the moving statistics of the BatchNorm after ``conv_name`` to those of ``x``."""
    bn = _bn_after(model, conv_name)
    if bn is None:
        return
    probe = tf.keras.Model(model.inputs, model.get_layer(conv_name).output)
    out = tf.concat([probe(tf.constant(x[i:i + 64], tf.float32), training=False)
                     for i in range(0, len(x), 64)], axis=0)
    mean, var = tf.nn.moments(out, axes=[0, 1, 2])
    bn.moving_mean.assign(mean)
    bn.moving_variance.assign(var)


def _batchnorms(model) -> list:
    found = []
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            found.append(layer)
        found += [bn for bn in (getattr(layer, "bn_binary", None), getattr(layer, "bn_real", None)) if bn is not None]
    return found


def _recalibrate_all(model, x, batch_size: int = 256) -> None:
    """Every BatchNorm's moving statistics := those of ``x`` through the network as it now is.

    One forward pass in training mode with momentum 0: each BatchNorm normalises with, and
    stores, its batch statistics, which is what recalibrating the layers one by one in
    network order on the same batch gives, at the cost of one pass instead of one per
    layer. ``x``: at most ``batch_size`` images are used (one batch).
    """
    bns = _batchnorms(model)
    saved = [bn.momentum for bn in bns]
    try:
        for bn in bns:
            bn.momentum = 0.0
        model(tf.constant(np.asarray(x[:batch_size]), tf.float32), training=True)
    finally:
        for bn, momentum in zip(bns, saved):
            bn.momentum = momentum


def _expected_cost(gated, cands: list[Candidate], by: str):
    """E[cost fraction](gates), differentiable (the cost model with each layer weighted by g)."""
    units = _unit_costs(cands, by)
    total = float(sum(units.values()))
    expected = tf.add_n([gated.get_layer(c.conv).gate() * float(units[c.name]) for c in cands])
    if by == "macs":
        return expected / total
    return REAL_BITS * expected / ((REAL_BITS - 1) * expected + total)


# ============================================================================ scoring
def gated_scores(model, train, val, *, budget: float, by: str = "macs", steps: int = 200,
                 batch_size: int = 64, lr: float = 2e-3, gate_lr: float = 0.02, penalty_weight: float = 1.0,
                 recipe=None, seed: int = 0, eval_images: int = 512,
                 calibrate_images: int = 256, real_from_binary: bool = False) -> tuple[dict, dict]:
    """Joint gated training under the budget penalty, then per-layer toggled-loss scores.

    Each toggle (``g_l`` forced to 0, then 1) re-estimates every BatchNorm's statistics on
    ``calibrate_images`` training images first, so that the loss measures the network
    with that layer binary / real rather than a BatchNorm mismatch. ``real_from_binary``
    (for a trained binary ``model``): each shared kernel starts as ``alpha * sign(W)``, so
    every real path starts as its binary path instead of from unused latent weights.
    """
    tf.keras.utils.set_random_seed(seed)
    cands = candidates(model)
    gated = gated_model(model, gate_init=min(max(budget, 0.02), 0.98))
    if real_from_binary:  # a trained binary network: each real path starts as its binary path
        for c in cands:
            layer = gated.get_layer(c.conv)
            _binarize_kernel(layer, layer.bn_real)
    scale = 1.0 / max(budget, 0.01)

    def penalty():
        return penalty_weight * scale * tf.nn.relu(_expected_cost(gated, cands, by) - budget)

    stream = _train_stream(train, recipe, batch_size, seed)
    losses = _fit(gated, stream, steps, lr=lr, gate_lr=gate_lr, penalty=penalty)
    gates = {c.name: float(gated.get_layer(c.conv).gate()) for c in cands}
    xv, yv = random_subset(eval_images, *val, seed=seed)
    x_cal = _at_size(random_subset(calibrate_images, train[0], seed=seed), xv.shape[1:3])

    def recalibrate():  # BatchNorm statistics of the network as it now is
        _recalibrate_all(gated, x_cal, batch_size=calibrate_images)

    scores, toggled = {}, {}
    for c in cands:
        layer = gated.get_layer(c.conv)
        losses_at = {}
        for value in (0.0, 1.0):
            layer.force_gate(value)
            recalibrate()
            losses_at[value] = _mean_loss(gated, xv, yv)
        layer.force_gate(None)
        scores[c.name] = losses_at[0.0] - losses_at[1.0]
        toggled[c.name] = {"loss_binary": losses_at[0.0], "loss_real": losses_at[1.0]}
    recalibrate()
    details = {
        "gates": gates,
        "expected_cost": float(_expected_cost(gated, cands, by)),
        "loss_soft": _mean_loss(gated, xv, yv),
        "toggled": toggled,
        "train_loss_first": float(np.mean(losses[:10])) if losses else None,
        "train_loss_last": float(np.mean(losses[-10:])) if losses else None,
        "steps": int(steps),
    }
    return scores, details


def greedy_scores(model, train, val, *, steps: int = 200, finetune_steps: Optional[int] = None,
                  batch_size: int = 64, lr: float = 2e-3, recipe=None, seed: int = 0,
                  eval_images: int = 512, real_from_binary: bool = False) -> tuple[dict, dict]:
    """Held-out loss drop of each single-layer-real variant after the same brief fine-tuning.

    The binary network trains ``steps`` steps; each variant (and the binary reference)
    starts from there, re-estimates the switched layer's BatchNorm statistics, fine-tunes
    ``finetune_steps`` on the same batches, re-estimates every BatchNorm and is scored on
    ``eval_images`` held-out images. ``real_from_binary``: the switched layer starts as
    ``alpha * sign(W)`` (:func:`binary_start`) rather than from its latent weights.
    """
    finetune_steps = int(max(1, steps // 2) if finetune_steps is None else finetune_steps)
    tf.keras.utils.set_random_seed(seed)
    cands = candidates(model)
    base = with_real_layers(model, ())  # a private copy
    _fit(base, _train_stream(train, recipe, batch_size, seed), steps, lr=lr)
    start = base.get_weights()
    xv, yv = random_subset(eval_images, *val, seed=seed)
    x_calibrate = _at_size(random_subset(256, train[0], seed=seed), val[0].shape[1:3])

    def tuned_loss(real):
        variant = with_real_layers(base, real)
        variant.set_weights(start)
        # The switched layer's BatchNorm statistics were the binary conv's: re-estimate them.
        for name in resolve_layers(cands, real):
            conv = next(c.conv for c in cands if c.name == name)
            if real_from_binary:
                _binarize_kernel(variant.get_layer(conv))
            _recalibrate_bn(variant, conv, x_calibrate)
        tf.keras.utils.set_random_seed(seed + 1)  # the same batches for every variant
        _fit(variant, _train_stream(train, recipe, batch_size, seed + 1), finetune_steps, lr=lr)
        _recalibrate_all(variant, x_calibrate)  # every BatchNorm's statistics for the network as tuned
        return _mean_loss(variant, xv, yv)

    reference = tuned_loss(())
    losses = {c.name: tuned_loss([c.name]) for c in cands}
    scores = {name: reference - loss for name, loss in losses.items()}
    return scores, {"loss_binary": reference, "loss_single_real": losses, "steps": int(steps),
                    "finetune_steps": finetune_steps}


def select_layers(model_or_recipe, budget: float, *, by: str = "macs", method: str = "gated", data=None,
                  val_data=None, steps: int = 200, finetune_steps: Optional[int] = None,
                  batch_size: Optional[int] = None, lr: Optional[float] = None, gate_lr: float = 0.02,
                  penalty_weight: float = 1.0, subset: Optional[int] = None, data_dir=None,
                  seed: int = 0, eval_images: int = 512, init_weights=None) -> Selection:
    """Choose the layers to keep real-valued within ``budget`` (see the module docstring).

    Args:
        model_or_recipe: the fully binary network: a Keras model (``glt_net``), a Recipe,
            a recipe name / path, or glt_net kwargs.
        budget: the largest fraction of MACs (``by="macs"``) or of int8-counted weight bytes
            (``by="bytes"``) that may be real-valued; never exceeded; 0 = fully binary.
        method: ``"gated"`` (learned gates + knapsack), ``"greedy"`` (single-layer
            fine-tuning sensitivity, greedy by score per cost), ``"first_last"``, ``"random"``.
        data: ``(x, y)`` uint8 images and integer labels for ``gated`` / ``greedy``; with a
            recipe and no data, the recipe's training split (at most ``subset`` images).
        val_data: held-out ``(x, y)`` for the scores; default the recipe's validation split,
            else a quarter of ``data``.
        steps: training steps of the gated network (``gated``) or of the shared binary start
            (``greedy``, whose variants then fine-tune ``finetune_steps``, default steps / 2).
        seed: seeds the training and the ``random`` method.
        init_weights: weights of the trained fully binary network (a weight file or a run
            folder) to start the search from, instead of a fresh initialisation: the scores
            then measure that network's layers (see :func:`train_selection`'s same option).

    Returns:
        :class:`Selection` (``layers`` for ``glt_net(real_layers=...)``, ``cost``, ``scores``).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    by = _check_by(by)
    budget = _check_budget(budget)
    model = _as_model(model_or_recipe)
    if model.layers and model.layers[-1].name == "predictions":
        model = models.with_logits(model)
    if init_weights is not None:
        from .pruning import resolve_init_weights

        path = resolve_init_weights(init_weights, key="init_weights")
        if model is model_or_recipe:  # never overwrite the caller's model
            model = with_real_layers(model, ())
        models.load_weights(model, path)
    cands = candidates(model)
    units = _unit_costs(cands, by)
    total = sum(units.values())
    affordable = [c.name for c in cands if _fits(units[c.name], total, by, budget)]
    details: dict = {}
    rule = "knapsack"
    if method == "first_last":
        scores = {c.name: (1.0 if c.index in (0, len(cands) - 1) else 0.0) for c in cands}
    elif method == "random":
        rng = np.random.default_rng(seed)
        scores = {c.name: float(v) for c, v in zip(cands, rng.uniform(0.0, 1.0, len(cands)))}
    elif not affordable:  # nothing fits: no need to train anything
        scores = {c.name: 0.0 for c in cands}
        details["note"] = "no single layer fits the budget: the fully binary network"
    else:
        train, val, recipe = _prepare_data(model_or_recipe, data, val_data, subset=subset, data_dir=data_dir,
                                           seed=seed)
        cfg = recipe.training if recipe is not None else {}
        batch_size = int(batch_size or cfg.get("batch_size", 64))
        lr = float(lr or cfg.get("real_lr", 2e-3))
        common = dict(steps=steps, batch_size=batch_size, lr=lr, recipe=recipe, seed=seed, eval_images=eval_images)
        common["real_from_binary"] = init_weights is not None
        if method == "gated":
            scores, details = gated_scores(model, train, val, budget=budget, by=by, gate_lr=gate_lr,
                                           penalty_weight=penalty_weight, **common)
        else:
            if init_weights is not None:  # already trained: the variants fine-tune from it directly
                finetune_steps = int(finetune_steps or max(1, steps // 2))
                common["steps"] = 0
            scores, details = greedy_scores(model, train, val, finetune_steps=finetune_steps, **common)
            rule = "greedy"
    details["rule"] = rule
    return select_from_scores(cands, scores, budget, by=by, rule=rule, method=method, details=details)


# ============================================================================ training the choice
def variant_name(recipe: Recipe, selection: Selection) -> str:
    return f"{recipe.name}_mixbin_{selection.method}_{selection.by}{selection.budget:g}"


def variant_recipe(recipe, layers, *, name: Optional[str] = None) -> Recipe:
    """The recipe with ``model.real_layers`` set (``layers``: names or a :class:`Selection`)."""
    recipe = _as_recipe(recipe)
    layers = list(layers.layers if isinstance(layers, Selection) else layers)
    return recipe.with_changes(name=name or recipe.name, model={"real_layers": layers})


def evaluate_variant(recipe: Recipe, run_dir, *, images=None, convert: bool = True, verify_images: int = 8,
                     int8: bool = True, calibration=None, data_dir=None, subset: Optional[int] = None) -> dict:
    """Held-out accuracy of a trained variant's best weights, its .tflite bytes and op census.

    ``model.tflite``: real layers in float32, verified against Keras (``verification``).
    With ``int8`` and real layers, also ``model_int8.tflite`` (:func:`int8_real_export`,
    ranges calibrated on ``calibration`` images, default 256 training images): its bytes,
    its accuracy in the LCE interpreter and its top-1 agreement with the float Keras model.
    """
    from ..convert import to_tflite
    from ..convert.verify import VerificationError
    from .evaluation import evaluate
    from .splits import load_splits

    run_dir = Path(run_dir)
    model = recipe.build_model(classifier_activation=None)
    models.load_weights(model, run_dir / "best_weights.h5")
    real_layers = recipe.model.get("real_layers") or ()
    splits = None
    if images is None or (convert and int8 and real_layers and calibration is None):
        splits = load_splits(recipe, data_dir=data_dir, subset=subset)
    if images is None:
        images = splits.test if splits.test is not None else splits.val
    x, y = images
    result = {"eval_images": int(len(y))}
    metrics = evaluate(model, x, y, class_names=recipe.classes, image_size=recipe.input_shape[:2])
    result.update(accuracy=metrics["accuracy"], loss=metrics["loss"])
    result.update(cost_summary(model, real_layers))
    if not convert:
        return result
    size = tuple(recipe.input_shape[:2])

    def at_size(a):
        a = np.asarray(a)
        return a.astype(np.float32) if tuple(a.shape[1:3]) == size else tf.image.resize(a, size).numpy()

    pixels = at_size(x[:verify_images])
    try:
        conv = to_tflite(model, run_dir / "model.tflite", verify=True, verify_images=pixels)
        result["verification"] = conv.verification.message
    except VerificationError as err:
        conv = err.conversion
        result["verification"] = f"FAILED: {err}"
    report = conv.report
    result.update(tflite_bytes=report.flatbuffer_bytes, lce_bconv2d=report.binary_convs,
                  float_convs=[c.layer or c.op for c in report.float_convs], op_counts=dict(report.op_counts))
    if int8:
        if not real_layers:  # nothing to quantize: the same flatbuffer
            result.update(int8_tflite_bytes=report.flatbuffer_bytes, int8_accuracy=result["accuracy"],
                          int8_agreement=1.0)
            return result
        if calibration is None:
            calibration = random_subset(256, splits.train[0])
        exported = int8_real_export(model, at_size(calibration))
        fb = to_tflite(exported, run_dir / "model_int8.tflite", verify=False).flatbuffer
        xs = at_size(x)
        keras_top = _predict_top1(model, xs)
        from ..convert.verify import lce_interpreter, run_interpreter

        interpreter = lce_interpreter(fb)
        top = np.concatenate([run_interpreter(interpreter, xs[i:i + 64])[0].reshape(len(xs[i:i + 64]), -1).argmax(-1)
                              for i in range(0, len(xs), 64)])
        result.update(int8_tflite_bytes=len(fb), int8_accuracy=float((top == np.asarray(y)).mean()),
                      int8_agreement=float((top == keras_top).mean()))
    return result


def _predict_top1(model, images, batch_size: int = 128) -> np.ndarray:
    return np.concatenate([np.asarray(model(images[i:i + batch_size], training=False)).argmax(-1)
                           for i in range(0, len(images), batch_size)])


def _binarize_kernel(conv, bn=None) -> None:
    """``conv.kernel := alpha * sign(W)`` (``alpha``: mean ``|W|`` per output channel) and
    the BatchNorm ``bn`` after it (if any) rescaled to match, so that a real path started this way
    computes what the binary conv does (exactly, for +-1 inputs). The binary function of
    the layer is unchanged: ``sign(alpha * sign(W)) == sign(W)``."""
    w = conv.kernel.numpy()
    alpha = np.mean(np.abs(w), axis=tuple(range(w.ndim - 1)))
    conv.kernel.assign(np.where(w >= 0, 1.0, -1.0).astype(w.dtype) * alpha)
    if bn is not None:  # the conv's output is now alpha times as large
        bn.moving_mean.assign(bn.moving_mean * alpha)
        eps = bn.epsilon  # alpha * sqrt(var + eps) == sqrt(new_var + eps)
        bn.moving_variance.assign(tf.maximum(alpha ** 2 * (bn.moving_variance + eps) - eps, 0.0))


def binary_start(recipe, layers, binary_weights, out_path, *, calibration=None) -> Path:
    """A weight file for the variant with real ``layers``, started from a trained binary network.

    Every weight is copied from ``binary_weights`` (the fully binary network of ``recipe``);
    each real layer's kernel becomes ``alpha * sign(W)``, ``alpha`` the mean ``|W|`` of each
    output channel (XNOR-Net's scaling): the real layer starts as the binary conv it replaces,
    not from latent weights the binary network never used, and the BatchNorm after it is
    rescaled to match: a real layer whose input is +-1 (``block1``, fed by the thermometer)
    then computes exactly what the binary one did. Other real layers see the real input
    instead of its sign; with ``calibration`` images (uint8 / float pixels) the BatchNorm
    after each real layer is re-estimated on them, in network order. Written to
    ``out_path`` (temp file, then rename).
    """
    recipe = _as_recipe(recipe)
    binary = recipe.with_changes(model={"real_layers": []}).build_model(classifier_activation=None)
    models.load_weights(binary, binary_weights)
    variant = variant_recipe(recipe, layers).build_model(classifier_activation=None)
    for layer in binary.layers:
        if layer.weights:
            variant.get_layer(layer.name).set_weights(layer.get_weights())
    cands = candidates(variant)
    real_convs = [c.conv for c in cands if c.name in set(resolve_layers(cands, layers))]
    consumers = _consumers(variant.get_config())
    for conv in real_convs:
        _binarize_kernel(variant.get_layer(conv), _bn_after(variant, conv, consumers))
    if calibration is not None:
        x = _at_size(calibration, recipe.input_shape[:2])
        for conv in real_convs:
            _recalibrate_bn(variant, conv, x)
    return models.save_weights(variant, out_path)


def train_selection(recipe, selection, *, out_dir, epochs: Optional[int] = None, subset: Optional[int] = None,
                    steps_per_epoch: Optional[int] = None, teacher=None, data_dir=None, convert: bool = True,
                    verify_images: int = 8, resume: bool = False, verbose: int = 0, name: Optional[str] = None,
                    eval_images=None, int8: bool = True, calibration=None, init_weights=None,
                    training: Optional[dict] = None) -> dict:
    """Train the recipe with the selection's real layers; evaluate, convert, and summarise.

    ``teacher``: a run folder with ``best_weights.h5`` of the real-valued twin, or a Keras
    model (logits), for knowledge distillation with the recipe's ``kd`` settings.
    ``init_weights``: the trained fully binary network (file or run folder) to fine-tune
    from instead of training from scratch (recipe keys ``training.init_weights`` and
    ``training.real_from_binary``: ``train`` starts the real layers with
    :func:`binary_start`, BatchNorms re-estimated on 256 training images), so that the run's
    ``recipe.yaml`` reproduces it; ``training``: overrides of the recipe's training settings
    (for example a fine-tuning learning rate).
    ``eval_images``: ``(x, y)`` for the accuracy (default the recipe's test split, else
    validation); ``int8`` / ``calibration``: see :func:`evaluate_variant`. Writes
    ``mixbin.json`` into ``out_dir`` and returns the same dict.
    """
    from .run import train

    recipe = _as_recipe(recipe)
    layers = selection.layers if isinstance(selection, Selection) else list(selection)
    if name is None:
        name = variant_name(recipe, selection) if isinstance(selection, Selection) else recipe.name
    variant = variant_recipe(recipe, layers, name=name)
    if training:
        variant = variant.with_changes(training=dict(training))
    if init_weights is not None:  # train() builds the start (binary_start) on 256 training images
        from .pruning import resolve_init_weights

        path = resolve_init_weights(init_weights, key="init_weights").resolve()
        root = ZOO_DIR.parent.resolve()  # recipes name project files relative to the root
        variant = variant.with_changes(training={
            "init_weights": str(path.relative_to(root) if path.is_relative_to(root) else path),
            "real_from_binary": True})
    teacher_model = None
    if isinstance(teacher, tf.keras.Model):
        teacher_model = teacher
    elif teacher is not None:
        variant = variant.with_changes(kd={"teacher": str(teacher)})
    summary = train(variant, out_dir=out_dir, epochs=epochs, subset=subset, steps_per_epoch=steps_per_epoch,
                    teacher_model=teacher_model, data_dir=data_dir, resume=resume, verbose=verbose)
    result = {"name": name, "real_layers": list(layers), "run_dir": str(out_dir),
              "init_weights": None if init_weights is None else str(init_weights),
              "best_val_accuracy": summary.get("best_val_accuracy", summary.get("best_accuracy")),
              "train_seconds": summary.get("train_seconds"), "epochs": summary.get("epochs")}
    result.update(evaluate_variant(variant, out_dir, images=eval_images, convert=convert,
                                   verify_images=verify_images, int8=int8, calibration=calibration,
                                   data_dir=data_dir, subset=subset))
    if isinstance(selection, Selection):
        result["selection"] = selection.to_dict()
    Path(out_dir, "mixbin.json").write_text(json.dumps(_json_safe(result), indent=2))
    return result


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value
