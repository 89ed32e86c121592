"""How the exported network's numbers are laid out: weights packed into uint32 rows, the static
activation arena (two-ended ping-pong, rings and scratch) planned per layer, and the lookup tables
of the bit-sliced kernels and of the first layer (thermometer level -> weight mismatches)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .spec import ConvSpec, EncodingSpec, ModelSpec, UnsupportedLayerError, words_per_group


@dataclass
class LayerPlan:
    name: str
    kind: str  # "conv" or "head"
    in_words: int
    out_words: int
    in_off: int
    out_off: int
    in_what: str
    out_what: str


@dataclass
class MemoryPlan:
    arena_words: int
    pingpong_words: int
    scratch_words: int
    ring_rows: int
    layers: list = field(default_factory=list)
    #: bit-sliced layers on per-word bit lists: their ring of list records (words)
    bs_ring_words: int = 0
    bs_ring_rows: int = 0
    bs_slot_words: int = 0
    bs_pad_words: int = 0
    #: bit-sliced layers whose input bits are flipped (GLT_BS_FLIP): their copy of the
    #: flip masks, padding pixel, weight and threshold planes (words, at the arena's end)
    bs_flip_words: int = 0

    @property
    def peak_ram_bytes(self) -> int:
        return 4 * self.arena_words


def consumer_layout(nxt: ConvSpec | None):
    """(channels per group, words per group, words per pixel) of the next layer's input."""
    cin_g = nxt.cin_g
    wpg = words_per_group(cin_g)
    return cin_g, wpg, wpg * nxt.groups


def _bs_pixel_record_words(conv: ConvSpec) -> int:
    """Words of the list records of one input pixel in the bit-sliced kernel on per-word
    lists: per input group, its set-bit count and 32 plane offsets per word."""
    wpg = words_per_group(conv.cin_g)
    return conv.groups * (1 + 32 * wpg)


def plan_memory(spec: ModelSpec, first_layer_table: bool = False, pixel_lists=()) -> MemoryPlan:
    """``first_layer_table``: the first layer reads the uint8 image through lookup
    tables (no ring of encoded rows, no gather scratch for it). ``pixel_lists``: the
    indices of the layers computed by the bit-sliced kernel on per-word bit lists (no
    gather scratch; a ring of list records instead, see glt_conv_row_px_nb)."""
    convs = spec.convs
    first = convs[0]
    ring_rows = 0 if first_layer_table else (first.ph - 1) * first.sh + first.kh
    sizes = []
    for idx, conv in enumerate(convs):
        in_wpp = words_per_group(conv.cin_g) * conv.groups
        if idx == 0 and first_layer_table:
            in_words = 0
            in_what = "the uint8 image (read through the level and mismatch tables)"
        elif idx == 0:
            in_words = ring_rows * conv.in_w * in_wpp
            in_what = f"ring of {ring_rows} encoded input rows"
        else:
            in_words = conv.in_h * conv.in_w * in_wpp
            in_what = f"{conv.in_h}x{conv.in_w}x{conv.in_c} bits"
        if conv.head:
            out_words, out_what = conv.cout, f"{conv.cout} int32 sums"
        else:
            _, _, out_wpp = consumer_layout(convs[idx + 1])
            out_words = conv.out_h * conv.out_w * out_wpp
            out_what = f"{conv.out_h}x{conv.out_w}x{conv.cout} bits"
        sizes.append((conv, in_words, out_words, in_what, out_what))
    pingpong = max(a + b for _, a, b, _, _ in sizes)
    pixel_lists = set(pixel_lists)
    scratch = max([c.ph * c.pw * c.row_words * c.groups for i, c in enumerate(convs)
                   if not (i == 0 and first_layer_table) and i not in pixel_lists] or [0])
    bs_ring_rows = max([(convs[i].ph - 1) * convs[i].sh + convs[i].kh for i in pixel_lists] or [0])
    bs_pad = max([_bs_pixel_record_words(convs[i]) for i in pixel_lists] or [0])
    bs_slot = max([convs[i].in_w * _bs_pixel_record_words(convs[i]) for i in pixel_lists] or [0])
    # tags, the padding pixel's records, the slots, and 4 words that glt_bs_cat may read past the end
    bs_ring = bs_ring_rows + bs_pad + bs_ring_rows * bs_slot + 4 if pixel_lists else 0
    plan = MemoryPlan(arena_words=pingpong + scratch + bs_ring, pingpong_words=pingpong, scratch_words=scratch,
                      ring_rows=ring_rows, bs_ring_words=bs_ring, bs_ring_rows=bs_ring_rows,
                      bs_slot_words=bs_slot, bs_pad_words=bs_pad)
    low = True  # where the current layer's input lives
    for conv, in_words, out_words, in_what, out_what in sizes:
        in_off = 0 if low else pingpong - in_words
        out_off = pingpong - out_words if low else 0
        plan.layers.append(LayerPlan(conv.name, "head" if conv.head else "conv", in_words, out_words,
                                     in_off, out_off, in_what, out_what))
        low = not low
    return plan


def _pack_bits(bits: np.ndarray, words: int) -> np.ndarray:
    """(rows, n) bools -> (rows, words) uint32, bit i of the stream = bit i % 32 of word i // 32."""
    padded = np.zeros((bits.shape[0], words * 32), dtype=np.uint64)
    padded[:, : bits.shape[1]] = bits
    return (padded.reshape(-1, words, 32) << np.arange(32, dtype=np.uint64)).sum(-1).astype(np.uint32)


def pack_rows(conv: ConvSpec, row_order: np.ndarray) -> np.ndarray:
    """Weights as uint32 words: rows in consumer order, each [ky][kx][word] of its group
    (or, for a dense layer, the [ky][kx][channel] bits as one stream)."""
    wpg = words_per_group(conv.cin_g)
    bits = conv.kernel_bits[..., row_order]  # (kh, kw, cin_g, cout)
    if conv.dense:
        stream = np.moveaxis(bits, -1, 0).reshape(conv.cout, -1)  # (cout, kh*kw*cin_g)
        return _pack_bits(stream, conv.row_words).reshape(-1)
    padded = np.zeros((conv.kh, conv.kw, wpg * 32, conv.cout), dtype=np.uint64)
    padded[:, :, : conv.cin_g, :] = bits
    padded = padded.reshape(conv.kh, conv.kw, wpg, 32, conv.cout)
    weights = (padded << np.arange(32, dtype=np.uint64)[None, None, None, :, None]).sum(axis=3)
    return np.ascontiguousarray(np.moveaxis(weights, -1, 0)).reshape(-1).astype(np.uint32)


def pad_vector(conv: ConvSpec) -> np.ndarray:
    wpg = words_per_group(conv.cin_g)
    bits = np.zeros((conv.groups, wpg * 32), dtype=np.uint64)
    bits[:, : conv.cin_g] = 1
    words = (bits.reshape(conv.groups, wpg, 32) << np.arange(32, dtype=np.uint64)).sum(-1)
    return words.reshape(-1).astype(np.uint32)


def group_formula(groups_of_rows: np.ndarray, groups: int):
    if groups == 1:
        return 1, 1
    j = np.arange(len(groups_of_rows))
    for div in range(1, len(groups_of_rows) + 1):
        if np.array_equal((j // div) % groups, groups_of_rows):
            return div, groups
    return None


#: Bit-sliced kernels need 2^nb > 3 K (see bitslice_tables); larger rows use popcount.
BITSLICE_MAX_NB = 12


def bitslice_nb(k: int) -> int:
    """Planes of the bit-sliced counters / thresholds for a field of k bits."""
    nb = 1
    while (1 << nb) <= 3 * k or (1 << (nb - 1)) < k + 1:
        nb += 1
    return nb


def row_positions(cout: int, out_cpg: int):
    """(word, bit) of each weight row j (consumer order) in an output pixel, as the
    popcount kernel writes them: ceil(out_cpg / 32) words per consumer group."""
    word, bit = np.zeros(cout, dtype=np.int64), np.zeros(cout, dtype=np.int64)
    r = wi = 0
    for j in range(cout):
        word[j], bit[j] = wi, r & 31
        if (r & 31) == 31 or r + 1 == out_cpg:
            wi += 1
        r = r + 1 if r + 1 < out_cpg else 0
    return word, bit


def bitslice_tables(rows: np.ndarray, mism_thr: np.ndarray, groups_of_rows: np.ndarray, out_cpg: int):
    """Bit-sliced form of one layer (the kernel glt_conv_row_bs).

    rows: (cout, row_words) uint32 weight rows (consumer order), mism_thr: bit of row j
    = (mismatches <= mism_thr[j]). The rows of each input group are cut into compute
    words of up to 32 lanes (one row each). Per compute word: K + 1 planes (plane p lane
    b = weight bit i of the lane's row, p = 32 * (i // 32) + 31 - i % 32, so that a clz
    of an activation word indexes its plane; plane K = 0), then 2 * nb threshold planes.
    Per conv position, the kernel lists the set bits of the field (n1 of K), or its clear
    bits when n1 > K / 2 (n = number listed), and counts per lane c = sum of the listed
    planes: set bits -> c = d = #(x & w), mismatches = n1 + P - 2 d; clear bits -> c = e =
    #(~x & w), mismatches = n1 - P + 2 e (P = popcount of the row). Both tests are
    2 c - n - A >= 0 with a per-lane A (clear: the bit is its negation), evaluated as bit
    nb of 2 c + (2^(nb-1) - n) + Z, Z = 2^(nb-1) - A with A clamped (|2 c - n| <= K).
    The bits of a compute word reach the output pixel's words through pieces (runs of
    lanes that land on consecutive bits of one output word).

    The planes are stored per storage word (32 rows, sorted by input group); a storage
    word holding rows of two groups serves two compute words (lane masks).

    Returns (planes (storage, K + 1), z (storage, 2, nb) with z[:, 0] = set-bit planes,
    z[:, 1] = clear-bit planes, compute words [(group, storage word, lane mask)] sorted
    by group, pieces [(compute word, out word, lane mask, shift)], nb)."""
    cout, row_words = rows.shape
    k = 32 * row_words
    nb = bitslice_nb(k)
    word, bit = row_positions(cout, out_cpg)
    stream = ((rows[:, :, None] >> np.arange(32, dtype=np.uint32)) & 1).reshape(cout, k).astype(np.uint64)
    pos = np.arange(k)
    perm = 32 * (pos // 32) + 31 - pos % 32  # plane index of stream bit i
    groups_of_rows = np.asarray(groups_of_rows)
    sorted_rows = np.argsort(groups_of_rows, kind="stable")  # rows by input group
    lanes = [sorted_rows[s0 : s0 + 32] for s0 in range(0, cout, 32)]  # storage words
    nst = len(lanes)
    planes = np.zeros((nst, k + 1), dtype=np.uint64)
    pop = stream.sum(1).astype(np.int64)
    thr = np.asarray(mism_thr, dtype=np.int64)
    a_set = np.clip(pop - thr, -k, k + 1)
    a_clr = np.clip(pop + thr + 1 - k, -k, k + 1)
    z = np.zeros((nst, 2, nb), dtype=np.uint64)
    half = 1 << (nb - 1)
    cws = {}  # (group, storage word) -> lane mask
    for st, chunk in enumerate(lanes):
        for b, j in enumerate(chunk):
            planes[st, perm] |= stream[j] << np.uint64(b)
            for m, a in enumerate((a_set[j], a_clr[j])):
                zv = half - int(a)
                assert 0 <= zv < (1 << nb)
                for lev in range(nb):
                    if (zv >> lev) & 1:
                        z[st, m, lev] |= np.uint64(1) << np.uint64(b)
            key = (int(groups_of_rows[j]), st)
            cws[key] = cws.get(key, 0) | (1 << b)
    cw_info = [(g, st, m) for (g, st), m in sorted(cws.items())]
    pieces = []
    for c, (g, st, m) in enumerate(cw_info):
        run = None
        for b, j in enumerate(lanes[st]):
            if not (m >> b) & 1:
                continue
            w, shift = int(word[j]), int(bit[j]) - b
            if run is not None and run[1] == w and run[3] == shift:
                run[2] |= 1 << b
            else:
                run = [c, w, 1 << b, shift]
                pieces.append(run)
    return planes.astype(np.uint32), z.astype(np.uint32), cw_info, [tuple(p) for p in pieces], nb

def group_contiguous_rows(spec: ModelSpec, producers) -> dict:
    """For each producer layer index i in ``producers`` (bit-sliced), reorder its output
    channels within each of the next layer's input groups so that the channels computed
    from the same input group of layer i are contiguous (the next layer's weights are
    permuted to match: same network). The bit-sliced kernel then writes whole runs of
    lanes instead of single bits. Returns {i: newpos}: output position j of layer i now
    holds the channel Keras puts at position newpos[j]."""
    moved = {}
    for i in producers:
        conv, nxt = spec.convs[i], spec.convs[i + 1]
        grp = conv.perm // (conv.cout // conv.groups)
        cg = nxt.cin_g
        newpos = np.arange(conv.cout)
        for g0 in range(0, conv.cout, cg):
            idx = np.arange(g0, g0 + cg)
            newpos[idx] = idx[np.argsort(grp[idx], kind="stable")]
        if np.array_equal(newpos, np.arange(conv.cout)):
            continue
        conv.perm = conv.perm[newpos]
        moved[i] = newpos
        kb = nxt.kernel_bits
        cout_g = nxt.cout // nxt.groups
        new = np.empty_like(kb)
        for o in range(nxt.cout):
            g0 = (o // cout_g) * cg
            new[:, :, :, o] = kb[:, :, newpos[g0 : g0 + cg] - g0, o]
        nxt.kernel_bits = new
    return moved


def table_words_per_level(conv: ConvSpec) -> int:
    """uint32 words per (tap, level) of the first-layer table: one byte per output row,
    padded to a multiple of 16 rows (the kernel sums blocks of 4 words)."""
    return 4 * -(-conv.cout // 16)


def first_layer_table_bytes(spec: ModelSpec) -> int | None:
    """Flash bytes of the first layer's mismatch table, or None when the encoding is
    not a thermometer (the table is indexed by the thermometer level)."""
    enc, first = spec.encoding, spec.convs[0]
    if enc.kind != "thermometer" or first.head or enc.levels > 255:
        return None
    return 4 * first.kh * first.kw * enc.channels * (enc.levels + 1) * table_words_per_level(first)


def level_table(enc: EncodingSpec) -> np.ndarray:
    """(channels, 256) uint8: thermometer level of every pixel value = the number of
    integer thresholds <= pixel, so planes 0..level-1 of the channel are +1."""
    p = np.arange(256)
    return (p[None, :, None] >= enc.thresholds[:, None, :]).sum(-1).astype(np.uint8)


def first_layer_table_words(spec: ModelSpec, order: np.ndarray) -> np.ndarray:
    """The first layer as a lookup table: byte j of row (tap, level) = the mismatches
    between weight row j (consumer order, negated rows already flipped) and the
    thermometer planes of one pixel channel at level n, over the planes of row j's
    group. tap = (ky * kw + kx) * channels + c; a padded pixel (+1 everywhere) is level
    ``levels``. Returns uint32 words (taps * (levels + 1), words per level)."""
    enc, conv = spec.encoding, spec.convs[0]
    L, C = enc.levels, enc.channels
    bits = conv.kernel_bits[..., order]  # (kh, kw, cin_g, cout), True = +1
    cout_g = conv.cout // conv.groups
    row_group = order // cout_g
    cw = table_words_per_level(conv)
    table = np.zeros((conv.kh, conv.kw, C, L + 1, 4 * cw), dtype=np.int64)
    n = np.arange(L + 1)
    for c in range(C):
        for k in range(L):
            plane = c * L + k
            g, i = divmod(plane, conv.cin_g)
            rows = np.flatnonzero(row_group == g)
            on = n > k  # plane k of channel c is +1 at level n
            w = bits[:, :, i, :][:, :, rows]  # (kh, kw, rows)
            table[:, :, c, :, rows] += (on[None, None, :, None] != w[:, :, None, :]).transpose(3, 0, 1, 2)
    if table.max() > 255:  # pragma: no cover - levels <= 255
        raise UnsupportedLayerError("export_c: first-layer table entry above 255.")
    table = table.reshape(-1, cw, 4).astype(np.uint32)
    words = table[..., 0] | (table[..., 1] << 8) | (table[..., 2] << 16) | (table[..., 3] << 24)
    return words.reshape(-1).astype(np.uint32)
