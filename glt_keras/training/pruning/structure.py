"""The block structure of a network: which sets of output channels can be removed together.

:func:`block_structure` follows every ``conv -> BatchNorm -> [pool] -> [shuffle] -> next conv``
chain and returns one :class:`BlockStructure` per block (cells, block unit, prunable or why
not); see :mod:`glt_keras.training.pruning` for the pruning rule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf


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
        # A float32 copy: under mixed_bfloat16 the channel numbers above 256 would not stay exact.
        x = _fresh(layer, dtype="float32")(x, training=False)
    if x.shape[-1] != channels:
        return None
    source = np.rint(x.numpy()[0, 0, 0]).astype(np.int64) - 1
    if sorted(source.tolist()) != list(range(channels)):
        return None
    return source


def _spatial(layer):
    """A spatial size for probing channel permutations (unknown sizes: 4, enough to pool)."""
    return tuple(int(v) if v else 4 for v in layer.output_shape[1:3])


def _fresh(layer, dtype=None):
    config = layer.get_config()
    if dtype is not None:
        config["dtype"] = dtype
    return layer.__class__.from_config(config)


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
    """Analyse every ``conv -> BN -> ... -> conv`` chain of ``model`` (see :mod:`glt_keras.training.pruning`).

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

