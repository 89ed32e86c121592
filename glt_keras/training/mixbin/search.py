"""The searches that score layers (the gated network under a budget penalty, one-at-a-time
fine-tuning) and :func:`select_layers`, which turns their scores into a :class:`Selection`."""
from __future__ import annotations

from typing import Optional

import numpy as np
import larq as lq
import tensorflow as tf

from ... import models
from ...data.augment import random_subset
from .costs import (METHODS, REAL_BITS, Candidate, _as_model, _as_recipe, _check_budget, _check_by, _fits,
                    _unit_costs, candidates, resolve_layers)
from .selection import Selection, select_from_scores
from .surgery import _at_size, _binarize_kernel, _recalibrate_all, _recalibrate_bn, gated_model, with_real_layers


def _prepare_data(model_or_recipe, data, val_data, *, subset, data_dir, seed):
    """(train arrays, held-out arrays, recipe or None)."""
    recipe = None
    if not isinstance(model_or_recipe, (tf.keras.Model, dict)):
        recipe = _as_recipe(model_or_recipe)
    if data is None:
        if recipe is None:
            raise ValueError("method needs data: pass data=(x, y) (uint8 images, int labels).")
        from ..splits import load_splits

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
    from ...data import make_dataset

    x, y = train
    if recipe is not None:
        from ..splits import make_train_dataset

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
        from ..checkpoints import resolve_init_weights

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

