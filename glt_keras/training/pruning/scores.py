"""Block scores (BN scale, kernel L1 or a callable) and the masks they select: read a
model's masks, apply them, choose the lowest-scoring blocks layer by layer or globally."""
from __future__ import annotations

import math

import numpy as np

from .structure import MASK_BETA, MASK_GAMMA, BlockStructure, block_structure


def bn_scale_scores(model, s: BlockStructure) -> np.ndarray:
    """``|gamma| / sqrt(moving_variance + eps)`` per output channel of ``s``'s BN."""
    bn = model.get_layer(s.bn)
    gamma = bn.gamma.numpy()
    var = bn.moving_variance.numpy()
    return np.abs(gamma) / np.sqrt(var + bn.epsilon)


def weight_l1_scores(model, s: BlockStructure) -> np.ndarray:
    """L1 norm of each output channel's latent kernel weights in ``s``'s conv."""
    kernel = model.get_layer(s.conv).kernel.numpy()
    return np.abs(kernel).reshape(-1, kernel.shape[-1]).sum(0)


SCORES = {"bn": bn_scale_scores, "l1": weight_l1_scores}


def _score_fn(score):
    if callable(score):
        return score
    if score not in SCORES:
        raise ValueError(f"score must be one of {sorted(SCORES)} or a callable, got {score!r}.")
    return SCORES[score]


# ============================================================================ masks
def masks_from_model(model, structures=None) -> dict:
    """``{bn_name: bool array, True = masked}`` read from the BN marker (gamma 0, beta 1)."""
    structures = structures if structures is not None else block_structure(model)
    masks = {}
    for s in structures:
        bn = model.get_layer(s.bn)
        masked = (bn.gamma.numpy() == MASK_GAMMA) & (bn.beta.numpy() == MASK_BETA)
        if masked.any():
            masks[s.bn] = masked
    return masks


def apply_masks(model, masks: dict) -> None:
    """Make every masked channel output exactly +1 at its BN (``gamma = 0``, ``beta = 1``)."""
    for bn_name, masked in masks.items():
        if not np.any(masked):
            continue
        bn = model.get_layer(bn_name)
        for var, value in ((bn.gamma, MASK_GAMMA), (bn.beta, MASK_BETA)):
            current = var.numpy()
            var.assign(np.where(masked, np.asarray(value, current.dtype), current))


def _removed_per_cell(s: BlockStructure, masked: np.ndarray | None) -> int:
    if masked is None or not masked.any():
        return 0
    per_block = masked[s.blocks()].all(-1)  # (cells, blocks)
    counts = per_block.sum(-1)
    return int(counts.max())


def select_masks(
    model,
    structures,
    ratio: float,
    score="bn",
    *,
    allocation: str = "layer",
    previous: dict | None = None,
) -> dict:
    """Masks that remove the lowest-scoring blocks, ``ratio`` of them at most.

    ``allocation="layer"``: every block in ``structures`` loses
    ``floor(ratio * blocks_per_cell)`` blocks in each of its cells (the ratio exactly
    wherever the granularity allows it, never more). ``allocation="global"``: a
    greedy choice across layers of "one more block from every cell of layer L", by
    the lowest mean block score normalised by the layer's mean channel score, while the
    removed channels stay within ``floor(ratio * channels of all pruned layers)``.

    In both, each cell loses its lowest-scoring blocks, the last block of a cell is
    never removed, and blocks masked in ``previous`` stay masked.

    Example:
        >>> masks = select_masks(model, block_structure(model), 0.5)  # doctest: +SKIP
        >>> {name: int(m.sum()) for name, m in masks.items()}  # doctest: +SKIP
        {'block2_bn': 64, 'block3_bn': 64}
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}.")
    previous = previous or {}
    fn = _score_fn(score)
    block_scores, removed_before = {}, {}
    for s in structures:
        channel_scores = np.asarray(fn(model, s), dtype=np.float64).reshape(-1)
        if channel_scores.shape[0] != s.channels:
            raise ValueError(f"score for {s.name} has {channel_scores.shape[0]} values, expected {s.channels}.")
        prev = previous.get(s.bn)
        live = np.ones(s.channels, bool) if prev is None else ~prev
        norm = channel_scores[live].mean() if live.any() else 1.0
        norm = norm if norm > 0 else 1.0
        b = (channel_scores / norm)[s.blocks()].mean(-1)  # (cells, blocks), mean channel score
        if prev is not None:
            b = np.where(prev[s.blocks()].all(-1), -np.inf, b)  # already masked: first
        block_scores[s.bn] = b
        removed_before[s.bn] = _removed_per_cell(s, prev)

    counts = {}
    if allocation == "layer":
        for s in structures:
            target = int(math.floor(ratio * s.blocks_per_cell + 1e-9))
            counts[s.bn] = min(max(target, removed_before[s.bn]), s.blocks_per_cell - 1)
    elif allocation == "global":
        total = sum(s.channels for s in structures)
        budget = int(math.floor(ratio * total + 1e-9))
        counts = dict(removed_before)
        used = sum(counts[s.bn] * s.unit_channels for s in structures)
        ordered = {s.bn: np.sort(block_scores[s.bn], axis=-1) for s in structures}
        while True:
            best, best_cost = None, np.inf
            for s in structures:
                k = counts[s.bn]
                if k >= s.blocks_per_cell - 1 or used + s.unit_channels > budget:
                    continue
                cost = ordered[s.bn][:, k].mean()
                if cost < best_cost:
                    best, best_cost = s, cost
            if best is None:
                break
            counts[best.bn] += 1
            used += best.unit_channels
    else:
        raise ValueError(f"allocation must be 'layer' or 'global', got {allocation!r}.")

    masks = {}
    for s in structures:
        k = counts[s.bn]
        masked = np.zeros(s.channels, bool)
        if k:
            lowest = np.argsort(block_scores[s.bn], axis=-1, kind="stable")[:, :k]
            blocks = s.blocks()
            for cell in range(s.n_cells):
                masked[blocks[cell, lowest[cell]].ravel()] = True
        prev = previous.get(s.bn)
        if prev is not None:
            masked |= prev
        masks[s.bn] = masked
    return masks


def pruned_fraction(structures, masks: dict) -> float:
    """Removed channels / channels of the blocks in ``structures``."""
    total = sum(s.channels for s in structures)
    removed = sum(int(np.sum(masks.get(s.bn, 0))) for s in structures)
    return removed / total if total else 0.0

