"""Structured block pruning for fully binarized GLT networks: scores, masks, schedule, shrink.

Binary weights cannot be sparsified usefully: a zeroed latent weight re-binarizes to
+1, and Larq Compute Engine has no sparse kernels. What does save bits and time is
removing whole output channels of a block's convolution and rebuilding the network
smaller. This module does that in three steps:

1. :func:`block_structure` finds, for every ``conv -> BatchNorm -> [pool] -> [shuffle]
   -> next conv`` chain, which sets of output channels can be removed together
   without breaking the group structure, the channel shuffle or LCE's rules.
2. :class:`BlockPruning` (a Keras callback) masks the lowest-scoring blocks during
   training, gradually, on a tfmot pruning schedule.
3. :func:`shrink` rebuilds a physically smaller model that computes *exactly* what
   the masked model computes; :func:`pruning_report` compares the two.

The pruning rule (what a block is)
----------------------------------
Take a block's conv with ``C`` output channels in ``g`` groups (each group's
``C / g`` outputs contiguous), followed by BN, maybe a max-pool, maybe a
``ChannelShuffle(g)``, and then the *consumer*: the next conv (or the head) with
``h`` groups, whose input position ``p`` belongs to its group ``p // (C / h)``.

Every output channel ``c`` therefore has a *cell*: (its producer group, the consumer
group its shuffled position falls into). A shrunk network keeps its group counts, so
every producer group and every consumer group must lose the same number of channels
and each channel must stay in the same consumer group after the shrunk shuffle.
Both hold when **every cell loses the same number of channels** and the cells tile
the channels evenly (equal sizes, the same number of cells per producer group and
per consumer group): :func:`block_structure` checks this (and simulates the shrunk
shuffle to be sure) and otherwise marks the layer not prunable, with the reason.

Inside a cell, a **block** is ``u`` consecutive output channels, with ``u`` the
smallest number such that removing one block from every cell removes a multiple of
``block_size`` (32: LCE packs 32 input channels per word and binarizes a grouped
conv only when each group has a multiple of 32 inputs) from every consumer group:
``u = block_size / gcd(cells per consumer group, block_size)``. The pruned fraction
of a layer is the fraction of its blocks removed, always the same number per cell,
never the last block of a cell.

Example, the ``glt96`` topology as of this writing (widths 32 64 128 128 256 256 512
512, groups 1 1 2 2 4 4 8 8, a shuffle after every grouped block but the last):

=====  ===  ===  ===  ===============================  ===  ==============
block  C    g    h    cells                            u    blocks / cell
=====  ===  ===  ===  ===============================  ===  ==============
1      32   1    1    1 of 32                          32   1 (fixed)
2      64   1    2    2 of 32                          32   1 (fixed)
3      128  2    2    4 of 32 (through the shuffle)    16   2
4      128  2    4    8 of 16                          16   1 (fixed)
5      256  4    4    16 of 16                         8    2
6      256  4    8    32 of 8                          8    1 (fixed)
7      512  8    8    64 of 8                          4    2
8      512  8    1    8 of 64 (feeds the head)         4    16
=====  ===  ===  ===  ===============================  ===  ==============

"Fixed" blocks feed convs whose groups already read only 32 channels: they cannot be
narrowed. At a ratio of 0.5 (``allocation="layer"``) blocks 3, 5, 7 and 8 halve;
at 0.25 only block 8 can lose a quarter (512 -> 384), while ``allocation="global"``
spends the same channel budget where the scores are lowest.

Masking scheme (exact)
----------------------
A masked channel is made to output the constant **+1** at its BatchNorm: the
callback sets ``gamma = 0`` and ``beta = +1`` for it (in training and inference mode
alike, BN then outputs exactly ``beta``), and re-applies this after every optimizer
step, so the model keeps its topology and every layer its type. +1 survives
max-pooling and the shuffle, and the consumer's sign maps it to +1. LCE pads binary
convs with +1 too (``pad_values=1``), so a removed input channel adds, at every
output position (border included), the constant
``c_o = sum over kh, kw and removed inputs of sign(W[kh, kw, i, o])`` to output
channel ``o``'s pre-BN sum. :func:`shrink` deletes the channel and folds ``c_o`` into
the consumer's BN: ``moving_mean_new = moving_mean - c_o``, so the shrunk model's
outputs equal the masked model's (to float rounding). The pair ``gamma == 0 and
beta == 1`` is also the marker :func:`masks_from_model` reads back, so a masked model
saved, reloaded, converted with :func:`glt_keras.models.for_export` or resumed from a
checkpoint still knows its masks.

Scores (per output channel, summed over a block)
------------------------------------------------
- ``"bn"``: the BN scale ``|gamma| / sqrt(moving_variance + eps)`` (network-slimming
  style). A channel whose BN scale is ~0 is a constant after the sign.
- ``"l1"``: the L1 norm of the channel's latent (real-valued) kernel weights.
- or a callable ``score(model, structure) -> np.ndarray`` of one score per channel.

Blocks already masked always stay masked (masks only grow), since their BN
parameters are overwritten.

Example::

    model = glt_net(input_shape=(32, 32, 3), num_classes=10, topology=None, widths=(64, 128, 128),
                    groups=(1, 2, 2), pools=(True,) * 3, shuffle=True, classifier_activation=None)
    model.compile("adam", tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    schedule = tfmot.sparsity.keras.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=400,
                                                    frequency=50)
    model.fit(x, y, epochs=3, callbacks=[BlockPruning(model, 0.5, schedule=schedule)])
    small = shrink(model)        # block2 128 -> 64, block3 128 -> 64 channels
    print(pruning_report(model, small)["markdown"])
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

__all__ = [
    "BlockPruning",
    "BlockStructure",
    "apply_masks",
    "block_structure",
    "bn_scale_scores",
    "export_shrunk",
    "make_schedule",
    "masks_from_model",
    "optimizer_iterations",
    "pruned_fraction",
    "pruning_callback",
    "pruning_report",
    "pruning_settings",
    "resolve_init_weights",
    "select_masks",
    "shrink",
    "shrunk_recipe",
    "training_recipe",
    "weight_l1_scores",
]

#: The values a masked channel's BatchNorm gets (its output is then exactly +1).
MASK_GAMMA = 0.0
MASK_BETA = 1.0

#: Layers allowed between a block's BN and the consumer conv: they map a channel that
#: is +1 everywhere to +1 everywhere and only move channels around.
_PASS_THROUGH = (
    "MaxPooling2D",
    "MaxPool2D",
    "AveragePooling2D",
    "AvgPool2D",
    "ReLU",
    "ChannelShuffle",
)


# ============================================================================ structure
@dataclass
class BlockStructure:
    """How one block's output channels may be removed.

    Attributes:
        name: the block's name (the BN layer name without ``_bn``, e.g. ``"block3"``).
        conv, bn, consumer: layer names of the producing conv, its BatchNorm and the
            conv that reads the block's output (the next block's conv or ``head_conv``).
        consumer_bn: the BatchNorm after the consumer (receives the folded constant),
            or ``None`` when the consumer has a bias instead.
        path: layer names between ``bn`` and ``consumer`` (pool, shuffle, ...).
        channels, groups, consumer_groups: ``C``, ``g`` and ``h``.
        position: ``position[c]`` = the consumer input position of output channel ``c``.
        cells: ``(n_cells, cell_size)`` channel indices, in channel order.
        block: channels per block inside a cell (``u``).
        cells_per_consumer_group: number of cells feeding one consumer group.
        prunable: whether the rule allows removing anything; ``reason`` says why not.
    """

    name: str
    conv: str
    bn: str
    consumer: str | None = None
    consumer_bn: str | None = None
    path: list = field(default_factory=list)
    channels: int = 0
    groups: int = 1
    consumer_groups: int = 1
    position: np.ndarray | None = None
    cells: np.ndarray | None = None
    block: int = 0
    cells_per_consumer_group: int = 0
    prunable: bool = False
    reason: str = ""

    @property
    def blocks_per_cell(self) -> int:
        return 0 if self.cells is None or not self.block else self.cells.shape[1] // self.block

    @property
    def n_cells(self) -> int:
        return 0 if self.cells is None else self.cells.shape[0]

    @property
    def unit_channels(self) -> int:
        """Channels removed by taking one block out of every cell."""
        return self.n_cells * self.block

    def blocks(self) -> np.ndarray:
        """``(n_cells, blocks_per_cell, block)`` channel indices."""
        return self.cells.reshape(self.n_cells, self.blocks_per_cell, self.block)

    def describe(self) -> str:
        if not self.prunable:
            return f"{self.name}: not prunable ({self.reason})"
        return (
            f"{self.name}: {self.channels} channels, groups {self.groups} -> {self.consumer} "
            f"groups {self.consumer_groups}: {self.n_cells} cells x {self.blocks_per_cell} "
            f"blocks of {self.block} channels"
        )


def _graph(model):
    """(layer config by name, consumers by name) of a functional model."""
    config = model.get_config()
    if "layers" not in config:
        raise ValueError("block pruning needs a functional Keras model.")
    by_name, consumers = {}, {}
    for layer in config["layers"]:
        by_name[layer["name"]] = layer
        consumers.setdefault(layer["name"], [])
    for layer in config["layers"]:
        for node in layer.get("inbound_nodes") or []:
            entries = node if isinstance(node, list) else node.get("args", [])
            for entry in entries:
                if isinstance(entry, (list, tuple)) and entry and isinstance(entry[0], str):
                    consumers.setdefault(entry[0], []).append(layer["name"])
    outputs = {o[0] for o in config.get("output_layers", [])}
    return by_name, consumers, outputs


def _is_conv(layer) -> bool:
    return isinstance(layer, tf.keras.layers.Conv2D) and not isinstance(
        layer, (tf.keras.layers.Conv2DTranspose, tf.keras.layers.DepthwiseConv2D)
    )


def _channel_permutation(layers, channels: int, spatial) -> np.ndarray | None:
    """``source[p]``: which input channel lands at output position ``p`` through ``layers``."""
    h, w = spatial
    values = tf.range(1, channels + 1, dtype=tf.float32)
    x = tf.broadcast_to(tf.reshape(values, (1, 1, 1, channels)), (1, h, w, channels))
    for layer in layers:
        x = layer(x, training=False)
    if x.shape[-1] != channels:
        return None
    source = np.rint(x.numpy()[0, 0, 0]).astype(np.int64) - 1
    if sorted(source.tolist()) != list(range(channels)):
        return None
    return source


def _spatial(layer):
    """A spatial size for probing channel permutations (unknown sizes: 4, enough to pool)."""
    return tuple(int(v) if v else 4 for v in layer.output_shape[1:3])


def _fresh(layer):
    return layer.__class__.from_config(layer.get_config())


def _consumer_constant_ok(consumer) -> tuple[bool, str]:
    """A +1 channel contributes a constant to the consumer only if padding adds the same value."""
    quantizer = getattr(consumer, "input_quantizer", None)
    one = float(quantizer(tf.ones(())).numpy()) if quantizer is not None else 1.0
    kernel_1x1 = all(k == 1 for k in consumer.kernel_size)
    if consumer.padding == "valid" or kernel_1x1:
        return True, ""
    pad = float(tf.keras.backend.get_value(getattr(consumer, "pad_values", 0.0)))
    if pad == one:
        return True, ""
    return False, (
        f"{consumer.name} pads with {pad} but a removed channel reads {one}: its contribution "
        "would not be constant at the borders"
    )


def block_structure(model: tf.keras.Model, block_size: int = 32) -> list[BlockStructure]:
    """Analyse every ``conv -> BN -> ... -> conv`` chain of ``model`` (see the module docstring).

    Returns one :class:`BlockStructure` per BatchNorm that follows a conv, prunable or not
    (``reason`` says why not).

    Example:
        >>> model = glt_net(input_shape=(32, 32, 3), topology=None, widths=(64, 128, 128),
        ...                 groups=(1, 2, 2), pools=(True,) * 3, shuffle=True, num_classes=10)
        >>> [s.describe() for s in block_structure(model)]  # doctest: +NORMALIZE_WHITESPACE
        ['block1: not prunable (1 blocks per cell: block2_conv already has the minimum input width)',
         'block2: 128 channels, groups 2 -> block3_conv groups 2: 4 cells x 2 blocks of 16 channels',
         'block3: 128 channels, groups 2 -> head_conv groups 1: 2 cells x 4 blocks of 16 channels',
         'head: not prunable (head_bn does not feed exactly one conv through pool / shuffle layers only)']
    """
    by_name, consumers, outputs = _graph(model)
    structures = []
    for bn in model.layers:
        if not isinstance(bn, tf.keras.layers.BatchNormalization):
            continue
        inbound = [n for n, users in consumers.items() if bn.name in users]
        if len(inbound) != 1 or not _is_conv(model.get_layer(inbound[0])):
            continue
        conv = model.get_layer(inbound[0])
        name = bn.name[:-3] if bn.name.endswith("_bn") else bn.name
        s = BlockStructure(name=name, conv=conv.name, bn=bn.name)
        s.channels = int(conv.filters)
        s.groups = int(getattr(conv, "groups", 1) or 1)
        structures.append(s)

        def fail(reason, s=s):
            s.prunable, s.reason = False, reason

        if consumers.get(conv.name) != [bn.name]:
            fail(f"{conv.name} has another consumer than {bn.name}")
            continue
        if not (bn.scale and bn.center) or bn.axis not in ([-1], [3], -1, 3):
            fail(f"{bn.name} needs scale, center and the channel axis last")
            continue
        # Walk to the consumer conv.
        path, current = [], bn.name
        consumer = None
        while True:
            if current in outputs:
                break
            users = consumers.get(current, [])
            if len(users) != 1:
                break
            layer = model.get_layer(users[0])
            if _is_conv(layer):
                consumer = layer
                break
            if by_name[layer.name]["class_name"].split(">")[-1] not in _PASS_THROUGH:
                break
            path.append(layer)
            current = layer.name
        if consumer is None:
            fail(f"{bn.name} does not feed exactly one conv through pool / shuffle layers only")
            continue
        s.consumer, s.path = consumer.name, [layer.name for layer in path]
        s.consumer_groups = int(getattr(consumer, "groups", 1) or 1)
        ok, why = _consumer_constant_ok(consumer)
        if not ok:
            fail(why)
            continue
        after = consumers.get(consumer.name, [])
        if consumer.use_bias:
            s.consumer_bn = None
        elif len(after) == 1 and isinstance(model.get_layer(after[0]), tf.keras.layers.BatchNormalization):
            s.consumer_bn = after[0]
        else:
            fail(f"{consumer.name} has neither a bias nor a single BatchNorm to absorb the constant")
            continue
        spatial = _spatial(bn)
        source = _channel_permutation(path, s.channels, spatial)
        if source is None:
            fail(f"the layers between {bn.name} and {consumer.name} do not just permute channels")
            continue
        position = np.argsort(source)
        s.position = position
        C, g, h = s.channels, s.groups, s.consumer_groups
        per_g, per_h = C // g, C // h
        keys = (np.arange(C) // per_g) * h + position // per_h
        cells = [np.flatnonzero(keys == k) for k in np.unique(keys)]
        sizes = {len(c) for c in cells}
        cells_per_g = {k // h for k in np.unique(keys)}
        count_g = np.bincount(np.unique(keys) // h, minlength=g)
        count_h = np.bincount(np.unique(keys) % h, minlength=h)
        if len(sizes) != 1 or len(set(count_g)) != 1 or len(set(count_h)) != 1 or len(cells_per_g) != g:
            fail(
                f"producer groups ({g}) and {consumer.name}'s groups ({h}) do not tile the "
                f"{C} channels into equal cells"
            )
            continue
        s.cells = np.stack(cells)
        s.cells_per_consumer_group = int(count_h[0])
        cell_size = s.cells.shape[1]
        s.block = block_size // math.gcd(s.cells_per_consumer_group, block_size)
        if cell_size % s.block:
            fail(f"cells of {cell_size} channels do not split into blocks of {s.block}")
            s.block = 0
            continue
        if s.blocks_per_cell < 2:
            fail(
                f"{s.blocks_per_cell} blocks per cell: {consumer.name} already has the minimum "
                "input width"
            )
            continue
        # Simulate two different prunings through fresh copies of the path layers.
        for keep_block in (0, s.blocks_per_cell - 1):
            blocks = s.blocks()
            keep = np.sort(blocks[:, keep_block].ravel())
            try:
                _new_input_order(s, keep, [_fresh(layer) for layer in path], spatial)
            except Exception as err:  # noqa: BLE001 - any failure means "not prunable"
                fail(f"the shrunk shuffle would break the consumer's groups ({err})")
                break
        else:
            s.prunable, s.reason = True, ""
    return structures


def _new_input_order(s: BlockStructure, keep: np.ndarray, path_layers, spatial) -> np.ndarray:
    """For a shrunk block keeping channels ``keep``: the original consumer input position
    of each shrunk consumer input position. Raises if a channel would change consumer group."""
    new_c = len(keep)
    source_new = _channel_permutation(path_layers, new_c, spatial)
    if source_new is None:
        raise ValueError("path layers do not permute the shrunk channels")
    original = s.position[keep[source_new]]
    per_h_old, per_h_new = s.channels // s.consumer_groups, new_c // s.consumer_groups
    if new_c % s.consumer_groups or np.any(original // per_h_old != np.arange(new_c) // per_h_new):
        raise ValueError("a kept channel would move to another consumer group")
    return original


def _select(structures, layers):
    if layers is None:
        return [s for s in structures if s.prunable]
    wanted = {str(x) for x in layers}
    chosen = [s for s in structures if {s.name, s.bn, s.conv} & wanted]
    missing = wanted - {n for s in chosen for n in (s.name, s.bn, s.conv)}
    if missing:
        raise ValueError(f"no block named {sorted(missing)}; blocks: {[s.name for s in structures]}")
    bad = [s.describe() for s in chosen if not s.prunable]
    if bad:
        raise ValueError("these blocks cannot be pruned: " + "; ".join(bad))
    return chosen


# ============================================================================ scores
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


# ============================================================================ callback
def optimizer_iterations(optimizer) -> int | None:
    """An optimizer's step count; for larq's ``CaseOptimizer`` (whose own ``iterations``
    stays 0) the largest count of its inner optimizers."""
    if optimizer is None:
        return None
    inner = [o for o in (getattr(optimizer, "optimizers", None) or []) if o is not None]
    counts = [
        int(tf.keras.backend.get_value(o.iterations)) for o in inner if getattr(o, "iterations", None) is not None
    ]
    if counts:
        return max(counts)
    iterations = getattr(optimizer, "iterations", None)
    return None if iterations is None else int(tf.keras.backend.get_value(iterations))


def _as_float(value) -> float:
    return float(value.numpy()) if hasattr(value, "numpy") else float(value)


class BlockPruning(tf.keras.callbacks.Callback):
    """Gradual structured block pruning with exact +1 masks (see the module docstring).

    Args:
        model: the network to prune (the student, also when ``fit`` runs on a wrapper
            such as a distiller: masks always go to this model).
        target_ratio: fraction of blocks to remove at the end of the schedule: per layer
            with ``allocation="layer"`` (``floor(ratio * blocks_per_cell)`` blocks of every
            cell), of all pruned channels with ``"global"``; never exceeded. ``None`` takes
            the schedule's final sparsity.
        schedule: a tfmot ``PruningSchedule`` (``PolynomialDecay``, ``ConstantSparsity``)
            or any callable ``step -> (should_prune, sparsity)``. The ratio in effect is
            ``min(sparsity, target_ratio)``; masks are recomputed when ``should_prune``
            is true and also at the schedule's ``end_step``, so the target is reached there
            even when ``end_step - begin_step`` is not a multiple of ``frequency``.
            Default: ``ConstantSparsity(target_ratio, begin_step=0, frequency=1)`` on epochs,
            i.e. one-shot pruning at the first epoch, then fine-tuning with the masks.
        score: ``"bn"`` (BN scale), ``"l1"`` (latent weight L1) or a callable
            ``score(model, structure) -> per-channel scores``.
        block_size: the channel multiple kept at every consumer group (32 for LCE).
        layers: block names (``"block3"``), BN or conv names to prune; default every
            prunable block.
        allocation: ``"layer"`` (the same fraction in every layer) or ``"global"``.
        update: ``"batch"`` (schedule steps are training steps) or ``"epoch"`` (schedule
            steps are epoch indices).

    Steps are counted by the callback itself: ``epoch * steps_per_epoch + batch`` from
    ``fit``'s epoch index (``initial_epoch`` on a resume) and ``self.params["steps"]``.
    They do not depend on ``optimizer.iterations``, which larq's ``CaseOptimizer`` never
    increments (its inner optimizers count). Only when ``fit`` does not know the epoch
    length does the callback fall back to the optimizer's step counter (the inner
    optimizers' for a ``CaseOptimizer``), then to its own batch counter.

    Resuming: the masks live in the model (the BN marker), so a checkpoint restores
    them; at the first batch of every ``fit`` the callback re-derives the ratio in
    effect from the schedule (the ratio of its last update step at or before this one)
    and re-establishes the masks at that ratio (a no-op when they came back from a
    checkpoint), so a resumed run prunes exactly like an uninterrupted one. ``ratio`` is
    that ratio in effect; it is logged as ``pruning_ratio``, next to ``pruned_fraction``.

    Masks are applied at each update and again after every training batch (the
    optimizer moves the masked BN parameters), so ``fit`` must run with
    ``steps_per_execution=1``. ``history`` records ``(step, sparsity, fraction)`` at every
    update; ``fraction`` (:func:`pruned_fraction`) is the removed share of the pruned
    blocks' channels; it is also written into the epoch logs as ``pruned_fraction``
    (callbacks listed after this one see it).

    Example:
        >>> schedule = tfmot.sparsity.keras.PolynomialDecay(0.0, 0.5, 0, 1000, frequency=100)
        >>> pruning = BlockPruning(model, 0.5, schedule=schedule, score="bn")  # doctest: +SKIP
        >>> model.fit(x, y, epochs=5, callbacks=[pruning])  # doctest: +SKIP
        >>> small = shrink(model)  # doctest: +SKIP
    """

    def __init__(
        self,
        model,
        target_ratio: float | None = None,
        schedule=None,
        score="bn",
        block_size: int = 32,
        layers=None,
        *,
        allocation: str = "layer",
        update: str = "batch",
        verbose: int = 0,
    ):
        super().__init__()
        final = None
        if schedule is not None:
            final = getattr(schedule, "final_sparsity", getattr(schedule, "target_sparsity", None))
        if target_ratio is None:
            if final is None:
                raise ValueError("give target_ratio, or a schedule with a final sparsity.")
            target_ratio = float(final)
        elif final is not None and abs(float(final) - float(target_ratio)) > 1e-6:
            raise ValueError(
                f"the schedule ends at sparsity {final} but target_ratio is {target_ratio}."
            )
        if not 0.0 <= float(target_ratio) < 1.0:
            raise ValueError(f"target_ratio must be in [0, 1), got {target_ratio}.")
        if update not in ("batch", "epoch"):
            raise ValueError(f"update must be 'batch' or 'epoch', got {update!r}.")
        if schedule is None:
            import tensorflow_model_optimization as tfmot

            schedule = tfmot.sparsity.keras.ConstantSparsity(float(target_ratio), 0, frequency=1)
            update = "epoch" if update == "batch" else update
        self.pruned_model = model
        self.target_ratio = float(target_ratio)
        self.schedule = schedule
        self.score = score
        _score_fn(score)
        self.block_size = int(block_size)
        self.allocation = allocation
        self.update = update
        self.verbose = verbose
        self.structures = _select(block_structure(model, self.block_size), layers)
        self.masks = masks_from_model(model, self.structures)
        self.history: list[tuple[int, float, float]] = []
        self._counter = 0
        self._epoch = None
        self._synced = False
        self._ratio = 0.0

    # -- the schedule -------------------------------------------------------------
    def ratio_at(self, step: int) -> tuple[bool, float]:
        """``(update now?, ratio)`` at ``step``: the schedule's answer, capped at the target."""
        should, sparsity = self.schedule(tf.constant(int(step), tf.int64))
        should = bool(should.numpy()) if hasattr(should, "numpy") else bool(should)
        end = getattr(self.schedule, "end_step", None)
        if end is not None and end >= 0 and int(step) == int(end):
            should = True
        return should, min(_as_float(sparsity), self.target_ratio)

    def last_update_step(self, step: int) -> int | None:
        """The schedule's last update step at or before ``step`` (``None``: none yet).

        Computed from ``begin_step`` / ``end_step`` / ``frequency`` for tfmot schedules,
        by searching backwards (at most 100,000 steps) for any other callable.
        """
        step = int(step)
        begin = getattr(self.schedule, "begin_step", None)
        end = getattr(self.schedule, "end_step", None)
        frequency = getattr(self.schedule, "frequency", None)
        if begin is not None and end is not None and frequency:
            begin, end, frequency = int(begin), int(end), int(frequency)
            if step < begin:
                return None
            if end >= 0 and step >= end:
                return end
            return begin + ((step - begin) // frequency) * frequency
        for candidate in range(step, max(-1, step - 100_000), -1):
            if self.ratio_at(candidate)[0]:
                return candidate
        return None

    def ratio_in_effect(self, step: int) -> float:
        """The ratio the masks have after the schedule's updates up to ``step`` included."""
        last = self.last_update_step(step)
        return 0.0 if last is None else self.ratio_at(last)[1]

    @property
    def ratio(self) -> float:
        """The pruning ratio in effect (the schedule's ratio at the last update)."""
        return self._ratio

    @property
    def at_target(self) -> bool:
        """Whether the schedule has reached ``target_ratio`` (masks are final)."""
        return self._ratio >= self.target_ratio - 1e-6

    def update_masks(self, step: int | None = None, ratio: float | None = None) -> dict:
        """Recompute scores and masks (at ``ratio``, or the schedule's ratio at ``step``) and apply."""
        if ratio is None:
            _, ratio = self.ratio_at(step or 0)
        ratio = min(float(ratio), self.target_ratio)
        self._ratio = max(self._ratio, ratio)
        self.masks = select_masks(
            self.pruned_model,
            self.structures,
            ratio,
            self.score,
            allocation=self.allocation,
            previous=self.masks,
        )
        self.apply_masks()
        fraction = self.pruned_fraction
        self.history.append((int(step if step is not None else -1), ratio, fraction))
        if self.verbose:
            print(f"BlockPruning: step {step}: ratio {ratio:.3f}, pruned {fraction:.3f} of channels")
        return self.masks

    def apply_masks(self) -> None:
        apply_masks(self.pruned_model, self.masks)

    @property
    def pruned_fraction(self) -> float:
        return pruned_fraction(self.structures, self.masks)

    # -- Keras hooks --------------------------------------------------------------
    def _step(self, batch: int) -> int:
        steps = (self.params or {}).get("steps")
        if steps and self._epoch is not None:
            return int(self._epoch) * int(steps) + int(batch)
        for candidate in (self.model, self.pruned_model):
            iterations = optimizer_iterations(getattr(candidate, "optimizer", None))
            if iterations is not None:
                return iterations
        return self._counter

    def on_train_begin(self, logs=None):
        spe = getattr(self.model, "_steps_per_execution", None)
        if spe is not None and int(tf.keras.backend.get_value(spe)) != 1:
            raise ValueError("BlockPruning needs steps_per_execution=1 to re-apply masks every step.")
        # Resume: masks written into the model (BN marker) survive checkpoints.
        found = masks_from_model(self.pruned_model, self.structures)
        for name, masked in found.items():
            self.masks[name] = masked | self.masks.get(name, np.zeros_like(masked))
        self.apply_masks()
        self._synced = False

    def maybe_update(self, step: int) -> bool:
        """What the callback does at a schedule step: update the masks if the schedule says so."""
        should, ratio = self.ratio_at(step)
        if should:
            self.update_masks(step, ratio)
        elif not self._synced:
            # First step of this fit (a fresh start or a resume): the ratio in effect is the
            # one of the schedule's last update; re-establish it (masks only grow, so masks
            # restored from a checkpoint at that ratio stay exactly as they are).
            last = self.last_update_step(step)
            if last is not None:
                ratio = self.ratio_at(last)[1]
                if ratio > 0:
                    self.update_masks(last, ratio)
                self._ratio = max(self._ratio, ratio)
        self._synced = True
        return should

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = int(epoch)
        if self.update == "epoch":
            self.maybe_update(epoch)

    def on_train_batch_begin(self, batch, logs=None):
        if self.update == "batch":
            self.maybe_update(self._step(batch))

    def on_train_batch_end(self, batch, logs=None):
        self._counter += 1
        self.apply_masks()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["pruned_fraction"] = self.pruned_fraction
            logs["pruning_ratio"] = self.ratio

    def on_train_end(self, logs=None):
        self.apply_masks()


# ============================================================================ shrink
def _quantized_kernel(conv) -> np.ndarray:
    kernel = tf.constant(conv.kernel.numpy())
    quantizer = getattr(conv, "kernel_quantizer", None)
    return (quantizer(kernel) if quantizer is not None else kernel).numpy().astype(np.float64)


def _masked_value(conv) -> float:
    quantizer = getattr(conv, "input_quantizer", None)
    return float(quantizer(tf.ones(())).numpy()) if quantizer is not None else 1.0


def _remap_inputs(kernel, groups, original_positions, old_in, new_in):
    """Reorder / slice a (kh, kw, cin/g, cout) kernel's input axis to the shrunk layout."""
    old_per, new_per = old_in // groups, new_in // groups
    cout_per = kernel.shape[-1] // groups
    out = np.empty(kernel.shape[:2] + (new_per, kernel.shape[-1]), kernel.dtype)
    for j in range(groups):
        local = original_positions[j * new_per:(j + 1) * new_per] - j * old_per
        cols = slice(j * cout_per, (j + 1) * cout_per)
        out[:, :, :, cols] = kernel[:, :, local, cols]
    return out


def _constant(kernel_q, groups, removed_positions, old_in, value) -> np.ndarray:
    """Per output channel: the consumer's sum over removed inputs reading ``value``."""
    old_per = old_in // groups
    cout_per = kernel_q.shape[-1] // groups
    c = np.zeros(kernel_q.shape[-1])
    for j in range(groups):
        mine = removed_positions[removed_positions // old_per == j] - j * old_per
        cols = slice(j * cout_per, (j + 1) * cout_per)
        c[cols] = kernel_q[:, :, mine, cols].sum(axis=(0, 1, 2)) * value
    return c


def _strip_build_config(config):
    """Drop recorded input shapes: the widths change, so every layer must infer its own."""
    if isinstance(config, dict):
        return {k: _strip_build_config(v) for k, v in config.items() if k != "build_config"}
    if isinstance(config, list):
        return [_strip_build_config(v) for v in config]
    return config


def shrink(model: tf.keras.Model, masks: dict | None = None, *, channel_multiple: int = 32) -> tf.keras.Model:
    """A physically smaller copy of ``model`` without its masked channels, equal in output.

    ``masks``: ``{bn_name: bool array, True = removed}``; default: read from the model
    (channels whose BN has ``gamma == 0`` and ``beta == 1``, the callback's marker).
    For each block, the conv's output channels and its BN are sliced, the consumer's
    input channels are sliced and reordered through the (shrunk) shuffle, and the
    removed channels' constant contribution (+1 inputs times ``sign(W)``) is folded
    into the consumer's BN ``moving_mean`` (or added to its bias). The rebuilt model has
    the same layers, names, groups and flags (``split_groups``) as the original; only
    ``filters`` change, so it is what :func:`glt_keras.models.glt_net` builds with the
    new widths and :func:`glt_keras.models.for_export` converts as usual.

    Raises ``ValueError`` when a mask does not remove the same number of channels from
    every cell, or leaves a consumer group with a width that is not a multiple of
    ``channel_multiple``.

    Example:
        >>> small = shrink(masked_model)  # doctest: +SKIP
        >>> [l.filters for l in small.layers if hasattr(l, "filters")]  # doctest: +SKIP
        [64, 64, 64, 10]
    """
    structures = block_structure(model)
    if masks is None:
        masks = masks_from_model(model, structures)
    by_bn = {s.bn: s for s in structures}
    unknown = set(masks) - set(by_bn)
    if unknown:
        raise ValueError(f"masks name layers that are not blocks: {sorted(unknown)}.")

    plans = {}  # bn name -> (structure, keep, original input positions of the consumer)
    for bn_name, masked in masks.items():
        masked = np.asarray(masked, bool)
        if not masked.any():
            continue
        s = by_bn[bn_name]
        if s.cells is None or s.consumer is None:
            raise ValueError(f"{s.name} cannot be pruned: {s.reason}")
        per_cell = masked[s.cells].sum(-1)
        if len(set(per_cell.tolist())) != 1:
            raise ValueError(
                f"{s.name}: the mask removes {sorted(set(per_cell.tolist()))} channels from different "
                "cells; every cell (producer group x consumer group) must lose the same number."
            )
        kept_per_consumer_group = (s.cells.shape[1] - per_cell[0]) * s.cells_per_consumer_group
        if kept_per_consumer_group <= 0 or kept_per_consumer_group % channel_multiple:
            raise ValueError(
                f"{s.name}: {s.consumer} would keep {kept_per_consumer_group} inputs per group, "
                f"not a positive multiple of {channel_multiple}."
            )
        keep = np.flatnonzero(~masked)
        spatial = _spatial(model.get_layer(s.bn))
        path = [_fresh(model.get_layer(n)) for n in s.path]
        plans[bn_name] = (s, keep, _new_input_order(s, keep, path, spatial))

    out_keep = {by_bn[b].conv: plan[1] for b, plan in plans.items()}
    in_plan = {plan[0].consumer: plan for plan in plans.values()}

    config = _strip_build_config(model.get_config())
    for layer in config["layers"]:
        if layer["name"] in out_keep:
            layer["config"]["filters"] = int(len(out_keep[layer["name"]]))
    from ..models import custom_objects

    with tf.keras.utils.custom_object_scope(custom_objects()):
        small = model.__class__.from_config(config)

    # Constants folded into the consumers' BN (or bias), indexed by the consumer's original outputs.
    constants = {}
    for conv_name, (s, keep, _) in in_plan.items():
        consumer = model.get_layer(conv_name)
        removed = s.position[np.flatnonzero(~np.isin(np.arange(s.channels), keep))]
        c = _constant(_quantized_kernel(consumer), s.consumer_groups, removed, s.channels, _masked_value(consumer))
        constants[conv_name] = c

    consumer_bn_of = {plan[0].consumer: plan[0].consumer_bn for plan in plans.values()}
    bn_constant = {consumer_bn_of[c]: constants[c] for c in constants if consumer_bn_of[c]}
    bn_keep = {b: plan[1] for b, plan in plans.items()}

    for new in small.layers:
        old = model.get_layer(new.name)
        if not old.weights:
            continue
        if _is_conv(old):
            kernel = old.kernel.numpy()
            bias = old.bias.numpy() if old.use_bias else None
            if old.name in in_plan:
                s, keep, original = in_plan[old.name]
                kernel = _remap_inputs(kernel, s.consumer_groups, original, s.channels, len(keep))
                if bias is not None and s.consumer_bn is None:
                    bias = bias + constants[old.name]
            if old.name in out_keep:
                kernel = kernel[..., out_keep[old.name]]
                bias = bias[out_keep[old.name]] if bias is not None else None
            new.kernel.assign(kernel)
            if bias is not None:
                new.bias.assign(bias)
            extra = [w for w in old.weights if w is not old.kernel and (not old.use_bias or w is not old.bias)]
            if extra:
                raise ValueError(f"{old.name}: unexpected extra conv weights {[w.name for w in extra]}.")
        elif isinstance(old, tf.keras.layers.BatchNormalization):
            values = {
                "gamma": old.gamma.numpy(),
                "beta": old.beta.numpy(),
                "moving_mean": old.moving_mean.numpy().astype(np.float64),
                "moving_variance": old.moving_variance.numpy(),
            }
            if old.name in bn_constant:
                values["moving_mean"] = values["moving_mean"] - bn_constant[old.name]
            keep = bn_keep.get(old.name)
            for key, value in values.items():
                if keep is not None:
                    value = value[keep]
                getattr(new, key).assign(value.astype(np.float32))
        else:
            new.set_weights(old.get_weights())
    return small


# ============================================================================ report
def _summary(model_or_summary) -> dict:
    if isinstance(model_or_summary, dict):
        return dict(model_or_summary)
    from ..models import model_summary

    summary = model_summary(model_or_summary)
    summary["widths"] = {
        layer.name: int(layer.filters)
        for layer in model_or_summary.layers
        if _is_conv(layer)
    }
    return summary


def pruning_report(before, after, *, tflite_bytes=None) -> dict:
    """Parameters, binary-weight bytes and MACs before / after pruning, with a markdown table.

    ``before`` / ``after``: models or :func:`glt_keras.models.model_summary` dicts.
    ``tflite_bytes``: optional ``(before, after)`` flatbuffer sizes (measured by the
    convert room, which training does not import).

    Returns ``{"before": {...}, "after": {...}, "ratio": {metric: after / before},
    "widths": {conv: (before, after)}, "markdown": str}``.

    Example:
        >>> report = pruning_report(model, shrink(model))  # doctest: +SKIP
        >>> print(report["markdown"])  # doctest: +SKIP
        | metric | before | after | after / before |
        ...
    """
    b, a = _summary(before), _summary(after)
    metrics = ["params", "binary_params", "binary_weight_bytes", "real_params", "macs", "binary_macs"]
    if tflite_bytes is not None:
        b["tflite_bytes"], a["tflite_bytes"] = (int(v) for v in tflite_bytes)
        metrics.append("tflite_bytes")
    report = {
        "before": {m: b[m] for m in metrics if m in b},
        "after": {m: a[m] for m in metrics if m in a},
        "ratio": {m: (a[m] / b[m] if b.get(m) else None) for m in metrics if m in a and m in b},
    }
    widths_b, widths_a = b.get("widths", {}), a.get("widths", {})
    report["widths"] = {k: (widths_b[k], widths_a.get(k)) for k in widths_b}
    lines = ["| metric | before | after | after / before |", "|---|---:|---:|---:|"]
    for m in report["before"]:
        ratio = report["ratio"].get(m)
        lines.append(
            f"| {m} | {report['before'][m]:,} | {report['after'][m]:,} | "
            f"{'' if ratio is None else f'{ratio:.3f}'} |"
        )
    changed = [f"{k} {v[0]}->{v[1]}" for k, v in report["widths"].items() if v[0] != v[1]]
    if report["widths"]:
        lines.append("")
        lines.append("Widths: " + (", ".join(changed) if changed else "unchanged"))
    report["markdown"] = "\n".join(lines)
    return report


# ============================================================================ recipes
#: ``pruning:`` keys of a recipe, with their defaults (see :func:`pruning_settings`).
PRUNING_DEFAULTS = {
    "target_ratio": 0.5,
    "score": "bn",
    "allocation": "global",
    "start_epoch": 0,
    "end_epoch": None,
    "frequency_steps": 100,
    "block_size": 32,
    "layers": None,
    "init_weights": None,
    "full_model": None,
}

#: The architecture keys of a recipe's ``model`` block that :func:`shrunk_recipe` makes explicit.
_ARCH_KEYS = ("widths", "groups", "pools", "strides", "kernels", "shuffle")


def pruning_settings(recipe) -> dict | None:
    """A recipe's ``pruning`` block with defaults filled in, or ``None`` without one.

    Keys: ``target_ratio``, ``score`` (``bn`` / ``l1``), ``allocation`` (``global`` /
    ``layer``), ``start_epoch`` and ``end_epoch`` (0-based epoch indices: the ratio
    grows from 0 at the first step of ``start_epoch`` to the target at the first step
    of ``end_epoch``; default ``end_epoch = start_epoch``: one-shot), ``frequency_steps``,
    ``block_size``, ``layers``, ``init_weights`` (weights to fine-tune from) and
    ``full_model`` (see :func:`shrunk_recipe`).
    """
    spec = getattr(recipe, "pruning", None)
    if not spec:
        return None
    unknown = set(spec) - set(PRUNING_DEFAULTS)
    if unknown:
        raise ValueError(
            f"recipe {recipe.name}: unknown pruning keys {sorted(unknown)}; known: {sorted(PRUNING_DEFAULTS)}."
        )
    settings = {**PRUNING_DEFAULTS, **spec}
    if settings["end_epoch"] is None:
        settings["end_epoch"] = settings["start_epoch"]
    if not 0.0 <= float(settings["target_ratio"]) < 1.0:
        raise ValueError(f"recipe {recipe.name}: pruning.target_ratio must be in [0, 1).")
    if not 0 <= int(settings["start_epoch"]) <= int(settings["end_epoch"]):
        raise ValueError(f"recipe {recipe.name}: pruning needs 0 <= start_epoch <= end_epoch.")
    return settings


def training_recipe(recipe):
    """The recipe that is actually trained: for a shrunk recipe (``pruning.full_model``
    set, see :func:`shrunk_recipe`), the full-width network to fine-tune and prune."""
    from ..recipe import Recipe

    settings = pruning_settings(recipe)
    if not settings or not settings.get("full_model"):
        return recipe
    d = recipe.to_dict()
    d["model"] = dict(settings["full_model"])
    d["pruning"] = {k: v for k, v in recipe.pruning.items() if k != "full_model"}
    return Recipe(**d, path=recipe.path)


def resolved_architecture(model_block: dict) -> dict:
    """widths / groups / pools / strides / kernels / shuffle of a recipe ``model`` block,
    with its topology resolved (what :func:`glt_keras.models.glt_net` builds)."""
    from ..models import TOPOLOGIES

    topology = model_block.get("topology", "glt96")
    spec = dict(TOPOLOGIES[topology]) if topology else {}
    for key in _ARCH_KEYS:
        if model_block.get(key) is not None:
            spec[key] = model_block[key]
    widths = [int(w) for w in spec.get("widths", ())]
    n = len(widths)
    return {
        "widths": widths,
        "groups": [int(v) for v in spec.get("groups", [1] * n)],
        "pools": [bool(v) for v in spec.get("pools", [False] * n)],
        "strides": [int(v) for v in spec.get("strides", [1] * n)],
        "kernels": [int(v) for v in spec.get("kernels", [int(model_block.get("kernel_size", 3))] * n)],
        "shuffle": bool(spec.get("shuffle")),
    }


def shrunk_recipe(recipe, widths, *, reproducible: bool = True):
    """The recipe of the physically shrunk network: ``model`` gives the new ``widths``
    explicitly (topology resolved into explicit groups / pools / strides / kernels /
    shuffle, so later changes to a named topology cannot change it), everything else as
    in ``recipe``.

    ``recipe``: the recipe trained with pruning (full-width ``model``). With
    ``reproducible=True`` (default) the pruning block stays, plus
    ``pruning.full_model`` = the full-width ``model`` block: ``Recipe.build_model()`` and
    the zoo build the shrunk network, while :func:`glt_keras.training.run.train`
    trains the full-width one with pruning again (so ``glt-keras train <name>``
    still reproduces the published weights). ``reproducible=False`` drops pruning.

    Example:
        >>> small = shrunk_recipe(recipe, [64, 96, 128])  # doctest: +SKIP
        >>> small.build_model().count_params() < recipe.build_model().count_params()  # doctest: +SKIP
        True
    """
    from ..recipe import Recipe

    recipe = training_recipe(recipe)
    arch = resolved_architecture(recipe.model)
    widths = [int(w) for w in widths]
    if len(widths) != len(arch["widths"]):
        raise ValueError(f"{len(widths)} widths given for a network of {len(arch['widths'])} blocks.")
    model = {k: v for k, v in recipe.model.items() if k not in _ARCH_KEYS and k != "kernel_size"}
    model.update(topology=None, **{**arch, "widths": widths})
    d = recipe.to_dict()
    d["model"] = model
    changed = [f"block{i + 1} {a}->{b}" for i, (a, b) in enumerate(zip(arch["widths"], widths)) if a != b]
    note = f"Shrunk by structured block pruning: {', '.join(changed) or 'no width changed'}."
    if recipe.pruning and reproducible:
        settings = {k: v for k, v in recipe.pruning.items() if k != "full_model"}
        d["pruning"] = {**settings, "full_model": copy_model_block(recipe.model)}
        note += " `pruning.full_model` is the full-width network it was fine-tuned and pruned from."
    else:
        d["pruning"] = None
    kept = [line for line in (recipe.description or "").rstrip().splitlines()
            if not line.startswith("Shrunk by structured block pruning")]
    d["description"] = "\n".join(kept + [note]) if kept else note
    return Recipe(**d, path=None)


def copy_model_block(block: dict) -> dict:
    """A YAML-safe deep copy of a ``model`` block (tuples -> lists)."""
    import copy as _copy

    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, np.generic):
            return v.item()
        return v

    return plain(_copy.deepcopy(block))


def make_schedule(settings: dict, steps_per_epoch: int, epochs: int, *, verbose: int = 1):
    """The tfmot schedule of a recipe's pruning block over ``epochs`` of ``steps_per_epoch``.

    ``PolynomialDecay(0 -> target_ratio)`` from the first step of ``start_epoch`` to the
    first step of ``end_epoch``, updating every ``frequency_steps``; ``ConstantSparsity``
    (one-shot) when they coincide. A schedule that would end after the last step (a
    run shortened with ``--epochs``) is clamped to it, with a warning.
    """
    import tensorflow_model_optimization as tfmot

    n, total = int(steps_per_epoch), int(steps_per_epoch) * int(epochs)
    begin = int(settings["start_epoch"]) * n
    end = int(settings["end_epoch"]) * n
    if end > total - 1:
        clamped_end, clamped_begin = total - 1, min(begin, total - 1)
        if verbose:
            print(
                f"pruning: the schedule (epochs {settings['start_epoch']}..{settings['end_epoch']}, steps "
                f"{begin}..{end}) does not fit {epochs} epochs of {n} steps: clamped to steps "
                f"{clamped_begin}..{clamped_end}."
            )
        begin, end = clamped_begin, clamped_end
    target = float(settings["target_ratio"])
    frequency = max(1, int(settings["frequency_steps"]))
    if end <= begin:
        return tfmot.sparsity.keras.ConstantSparsity(target, begin_step=begin, end_step=begin, frequency=1)
    return tfmot.sparsity.keras.PolynomialDecay(0.0, target, begin_step=begin, end_step=end, frequency=frequency)


def pruning_callback(model, settings: dict, steps_per_epoch: int, epochs: int, *, verbose: int = 1) -> BlockPruning:
    """The :class:`BlockPruning` callback of a recipe's pruning block."""
    return BlockPruning(
        model,
        float(settings["target_ratio"]),
        schedule=make_schedule(settings, steps_per_epoch, epochs, verbose=verbose),
        score=settings["score"],
        block_size=int(settings["block_size"]),
        layers=settings["layers"],
        allocation=settings["allocation"],
        update="batch",
        verbose=1 if verbose and verbose > 1 else 0,
    )


def resolve_init_weights(spec, root=None, *, key="pruning.init_weights"):
    """``pruning.init_weights`` (or ``training.init_weights``) -> an existing weight file (a path relative to the project
    root or absolute; a run folder means its ``best_weights.h5``). Raises a
    FileNotFoundError naming the file and the command that produces it."""
    from pathlib import Path

    from ..recipe import ZOO_DIR

    root = Path(root) if root is not None else ZOO_DIR.parent
    path = Path(spec)
    if not path.is_absolute():
        path = root / path
    if path.is_dir() or (not path.suffix and not path.exists()):
        path = path / "best_weights.h5"
    if path.exists():
        return path
    zoo_dir = ZOO_DIR.resolve()
    if path.parent.parent.resolve() == zoo_dir:
        base = path.parent.name
        how = (
            f"it holds the published {base} zoo model. Produce it with:\n"
            f"  glt-keras train {base} && glt-keras zoo publish runs/{base}"
        )
    elif path.name == "best_weights.h5":
        how = f"it is written by a training run: glt-keras train <recipe> --out {path.parent}"
    else:
        how = "train and save the model it names first"
    raise FileNotFoundError(f"{key}: {path} does not exist; {how}")


def _model_widths(model, n_blocks: int) -> list[int]:
    return [int(model.get_layer(f"block{i + 1}_conv").filters) for i in range(n_blocks)]


def export_shrunk(recipe, masked_model, run_dir, *, check_inputs=None, source="", verbose=1) -> dict:
    """Shrink a trained masked model and write the run's shrunk artifacts.

    Writes into ``run_dir``: ``shrunk_weights.h5`` (the shrunk network's weights),
    ``shrunk_recipe.yaml`` (:func:`shrunk_recipe`), ``shrunk_model.json``
    (``{"widths", "report", "source", "max_abs_difference"}``: the
    :func:`pruning_report` without markdown, the weights shrunk and the largest output
    difference masked vs. shrunk on ``check_inputs``), and ``shrunk/``, a folder that
    ``glt-keras zoo publish`` accepts (``recipe.yaml`` = the shrunk recipe,
    ``best_weights.h5`` = the shrunk weights, copies of the run's logs and plots).
    Prints the markdown report. Returns the ``shrunk_model.json`` dict.
    """
    import json
    import shutil
    from pathlib import Path

    import yaml

    from .._io import atomic_write
    from ..models import save_weights

    run_dir = Path(run_dir)
    recipe = training_recipe(recipe)
    n_blocks = len(resolved_architecture(recipe.model)["widths"])
    small = shrink(masked_model)
    widths = _model_widths(small, n_blocks)
    new_recipe = shrunk_recipe(recipe, widths)
    # Rebuild from the recipe (what the zoo will do) and move the weights in: this fails
    # loudly if the recipe does not describe the shrunk network.
    rebuilt = new_recipe.build_model(classifier_activation=None)
    rebuilt.set_weights(small.get_weights())
    difference = None
    if check_inputs is not None:
        x = tf.convert_to_tensor(check_inputs)
        difference = float(
            np.abs(rebuilt(x, training=False).numpy() - masked_model(x, training=False).numpy()).max()
        )
    report = pruning_report(masked_model, rebuilt)
    if verbose:
        print(f"Pruned {recipe.name}: widths {resolved_architecture(recipe.model)['widths']} -> {widths}")
        print(report["markdown"])
        if difference is not None:
            print(f"largest output difference masked vs. shrunk: {difference:.2e}")
    info = {
        "widths": widths,
        "report": {k: v for k, v in report.items() if k != "markdown"},
        "source": source,
        "max_abs_difference": difference,
    }
    info["report"]["widths"] = {k: list(v) for k, v in info["report"]["widths"].items()}

    recipe_text = yaml.safe_dump(new_recipe.to_dict(), sort_keys=False)
    save_weights(rebuilt, run_dir / "shrunk_weights.h5")
    atomic_write(run_dir / "shrunk_recipe.yaml", recipe_text)
    publish_dir = run_dir / "shrunk"
    publish_dir.mkdir(exist_ok=True)
    atomic_write(publish_dir / "recipe.yaml", recipe_text)
    shutil.copyfile(run_dir / "shrunk_weights.h5", publish_dir / "best_weights.h5")
    for name in ("history.csv", "summary.json", "curves.png", "pruning.png", "thresholds.png", "thresholds.json"):
        if (run_dir / name).exists():
            shutil.copyfile(run_dir / name, publish_dir / name)
    atomic_write(run_dir / "shrunk_model.json", json.dumps(info, indent=2))
    return info
