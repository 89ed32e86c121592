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

The package, one module per step
--------------------------------
- :mod:`.structure`: :func:`block_structure`, :class:`BlockStructure` (the pruning rule above).
- :mod:`.scores`: block scores, :func:`select_masks`, :func:`masks_from_model`, :func:`apply_masks`.
- :mod:`.schedule`: the :class:`BlockPruning` callback, :func:`make_schedule`, :func:`pruning_callback`.
- :mod:`.shrinking`: :func:`shrink`, :func:`pruning_report`.
- :mod:`.recipes`: :func:`pruning_settings`, :func:`training_recipe`, :func:`shrunk_recipe`,
  :func:`export_shrunk` (a pruning run's shrunk network).
"""
from __future__ import annotations

from ..checkpoints import resolve_init_weights
from .recipes import (
    PRUNING_DEFAULTS,
    copy_model_block,
    export_shrunk,
    pruning_settings,
    resolved_architecture,
    shrunk_recipe,
    training_recipe,
)
from .schedule import BlockPruning, make_schedule, optimizer_iterations, pruning_callback
from .scores import SCORES, apply_masks, bn_scale_scores, masks_from_model, pruned_fraction, select_masks, weight_l1_scores
from .shrinking import pruning_report, shrink
from .structure import MASK_BETA, MASK_GAMMA, BlockStructure, block_structure

__all__ = [
    "BlockPruning",
    "BlockStructure",
    "MASK_BETA",
    "MASK_GAMMA",
    "PRUNING_DEFAULTS",
    "SCORES",
    "apply_masks",
    "block_structure",
    "bn_scale_scores",
    "copy_model_block",
    "export_shrunk",
    "make_schedule",
    "masks_from_model",
    "optimizer_iterations",
    "pruned_fraction",
    "pruning_callback",
    "pruning_report",
    "pruning_settings",
    "resolve_init_weights",
    "resolved_architecture",
    "select_masks",
    "shrink",
    "shrunk_recipe",
    "training_recipe",
    "weight_l1_scores",
]
