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

The package, one module per concept
-----------------------------------
- :mod:`.costs`: :func:`candidates`, :func:`budget_cost`, :func:`cost_summary` (the cost model).
- :mod:`.selection`: :func:`knapsack`, :func:`greedy_by_ratio`, :class:`Selection`,
  :func:`select_from_scores`.
- :mod:`.surgery`: :func:`with_real_layers`, :class:`MixBinGatedConv2D`, :func:`gated_model`.
- :mod:`.search`: :func:`gated_scores`, :func:`greedy_scores`, :func:`select_layers`.
- :mod:`.int8`: :func:`int8_real_export` (deployment).
- :mod:`.variants`: :func:`variant_recipe`, :func:`binary_start`.

Training and evaluating a selection with the recipe (:func:`train_selection`,
:func:`evaluate_variant`) sits above both this package and :mod:`glt_keras.training.run`,
in :mod:`glt_keras.training.mixbin_run`.
"""
from __future__ import annotations

from .costs import BY, METHODS, REAL_BITS, Candidate, budget_cost, candidates, cost_summary, resolve_layers
from .int8 import Int8FoldedConv2D, int8_real_export
from .search import gated_scores, greedy_scores, select_layers
from .selection import Selection, greedy_by_ratio, knapsack, select_from_scores
from .surgery import MixBinGatedConv2D, gated_model, with_real_layers
from .variants import binary_start, variant_name, variant_recipe

__all__ = [
    "BY",
    "METHODS",
    "REAL_BITS",
    "Candidate",
    "Int8FoldedConv2D",
    "MixBinGatedConv2D",
    "Selection",
    "binary_start",
    "budget_cost",
    "candidates",
    "cost_summary",
    "gated_model",
    "gated_scores",
    "greedy_by_ratio",
    "greedy_scores",
    "int8_real_export",
    "knapsack",
    "resolve_layers",
    "select_from_scores",
    "select_layers",
    "variant_name",
    "variant_recipe",
    "with_real_layers",
]
