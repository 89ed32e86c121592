"""Microcontroller export (glt_keras.mcu): the C library computes what Keras computes.

Small random models with trained-like, adversarial parameters (negative / zero BN
gammas, zero variances, zero weights, integer thermometer thresholds) are exported,
compiled with the system cc and compared with Keras bit for bit (every layer's
+-1 map and the head's integer sums) and score for score; then cross-compiled for
Cortex-M4 and run under QEMU. glt96 is checked against the flash / SRAM targets.
"""
import re
import subprocess

import numpy as np
import pytest
import tensorflow as tf

from glt_keras.layers.binary import BinaryConv2D, ChannelShuffle
from glt_keras.layers.encoding import BinaryPlanes, FixedThermometer, LearnedThermometer
from glt_keras.mcu import UnsupportedLayerError, export_c, parse_model
from glt_keras.mcu.host import build_host, compile_check, read_macros
from glt_keras.models import glt_net

L = tf.keras.layers
SHAPE = (32, 32, 3)


def randomize(model, seed=0):
    """Trained-like parameters with every edge case the BN + sign fold must handle."""
    rng = np.random.default_rng(seed)
    previous = None
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.Conv2D):
            kernel = rng.uniform(-1, 1, layer.kernel.shape).astype("float32")
            kernel[rng.random(kernel.shape) < 0.02] = 0.0  # larq: sign(0) = +1
            layer.kernel.assign(kernel)
            if getattr(layer, "use_bias", False):
                layer.bias.assign(rng.normal(0, 2, layer.bias.shape))
            previous = layer
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            k = int(np.prod(previous.kernel.shape[:3]))
            head = previous.name == "head_conv"
            gamma = rng.uniform(0.3, 2, c) * rng.choice([-1, 1], c)  # negative gammas
            var = rng.uniform(0.5, 2, c) * k
            if not head:
                gamma[rng.random(c) < 0.1] = 0.0  # constant sign
                var[rng.random(c) < 0.1] = 0.0  # zero variance (eps only)
            mean = rng.normal(0, np.sqrt(k), c)
            mean[::7] = np.round(mean[::7])  # BN(s) == 0 exactly at integer s
            beta = rng.normal(0, 1, c)
            beta[::7] = 0.0
            layer.set_weights([gamma, beta, mean, var])
    enc = model.get_layer("encoding")
    if isinstance(enc, LearnedThermometer) and not isinstance(enc, FixedThermometer):
        channels, levels = enc.thresholds().shape
        base = 2 * np.sort([rng.choice(np.arange(1, 126), levels, replace=False) for _ in range(channels)], axis=1)
        frac = rng.uniform(0.05, 0.95, (channels, levels))  # gaps >= 1.1 pixel
        frac[:, ::3] = 0.0  # (near-)integer thresholds: pixel == t is the edge case
        enc.set_thresholds(base + frac)
    return model


def images_for(shape, n=16, seed=1, thresholds=None):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n,) + tuple(shape), dtype=np.uint8)
    x[0] = 0
    x[1] = 255
    if thresholds is not None:  # pixels exactly at / next to the integer thresholds
        t = np.asarray(thresholds).reshape(-1).astype(int)
        x[2] = np.clip(rng.choice(np.concatenate([t - 1, t, t + 1]), x[2].shape), 0, 255)
    return x


def small_model(**kwargs):
    return glt_net(input_shape=SHAPE, num_classes=10, topology="tiny", classifier_activation=None, **kwargs)


def keras_layer_maps(model):
    """Keras outputs matching the C layers: the last layer of every block, the head conv."""
    spec = parse_model(model)
    names = [l.name for l in model.layers]
    outs = [model.layers[names.index(spec.convs[i + 1].name) - 1].output for i in range(len(spec.convs) - 1)]
    outs.append(model.get_layer(spec.convs[-1].name).output)
    return tf.keras.Model(model.inputs, outs)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = randomize(small_model(), seed=0)
    out = tmp_path_factory.mktemp("tiny_c")
    result = export_c(model, out)
    x = images_for(SHAPE, thresholds=model.get_layer("encoding").thresholds())
    return model, result, out, x


@pytest.fixture(scope="module")
def tiny_host(tiny):
    _, _, out, _ = tiny
    return build_host(out, capture=True)


def test_host_matches_keras(tiny, tiny_host):
    model, _, _, x = tiny
    keras = model(x.astype("float32"), training=False).numpy()
    ours = tiny_host.infer(x)
    np.testing.assert_array_equal(ours.argmax(1), keras.argmax(1))
    np.testing.assert_allclose(ours, keras, rtol=1e-4, atol=1e-4 * np.abs(keras).max())


def test_every_layer_bit_exact(tiny, tiny_host):
    model, _, _, x = tiny
    sub = keras_layer_maps(model)
    spec = parse_model(model)
    for image in x[:4]:
        ours = tiny_host.layer_outputs(image)
        keras = sub(image[None].astype("float32"), training=False)
        for conv, mine, ref in zip(spec.convs, ours, keras):
            ref = ref.numpy()[0]
            if conv.head:
                np.testing.assert_array_equal(mine, ref.sum((0, 1)).round().astype(int), err_msg=conv.name)
            else:
                np.testing.assert_array_equal(mine, np.where(ref >= 0, 1, -1), err_msg=conv.name)
                assert 0.05 < (mine > 0).mean() < 0.95, f"{conv.name}: degenerate test activations"


def test_edge_cases_are_exercised(tiny):
    model, result, _, _ = tiny
    assert sum(layer["negated_rows"] for layer in result.layers) > 0  # negative BN scales folded
    enc = parse_model(model).encoding
    t = model.get_layer("encoding").thresholds()
    t_eff = model.get_layer("encoding").effective_thresholds()  # half-integers
    np.testing.assert_array_equal(enc.thresholds, t_eff + 0.5)  # p >= t_eff  <=>  p >= t_eff + 0.5
    np.testing.assert_array_equal(enc.thresholds, np.floor(t + 2.0 ** -10) + 1)  # p > t + 2**-10
    assert np.any(np.abs(t - np.round(t)) < 1e-3), "no (near-)integer threshold tested"


def test_sources_compile_cleanly(tiny, tmp_path):
    _, _, out, _ = tiny
    assert compile_check(out, flags=("-std=c99", "-O2", "-Wall", "-Wextra", "-pedantic")) == ""
    proc = subprocess.run(f"cc -std=c99 -O2 -c {out}/*.c", shell=True, cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert len(list(tmp_path.glob("*.o"))) >= 2
    assert (out / "README").exists()


def test_peak_ram_macro_matches_plan(tiny, tmp_path):
    _, result, out, _ = tiny
    macros = read_macros(out / "glt_model.h")
    plan = result.plan
    sizes = [(lp.in_words, lp.out_words) for lp in plan.layers]
    assert plan.pingpong_words == max(a + b for a, b in sizes)
    assert macros["GLT_PEAK_RAM_BYTES"] == result.peak_ram_bytes == 4 * (plan.pingpong_words + plan.scratch_words
                                                                          + plan.bs_ring_words + plan.bs_flip_words)
    assert macros["GLT_BS_FLIP_OFFSET"] == plan.arena_words - plan.bs_flip_words
    # ... and it is what the compiled library reserves.
    obj = tmp_path / "data.o"
    subprocess.run(["cc", "-std=c99", "-O2", "-c", str(out / "glt_model_data.c"), "-o", str(obj)], check=True)
    nm = subprocess.run(["nm", "-S", str(obj)], capture_output=True, text=True, check=True).stdout
    size = re.search(r"^[0-9a-f]+ ([0-9a-f]+) [BbCc] glt_arena$", nm, re.M)
    assert size and int(size.group(1), 16) == macros["GLT_PEAK_RAM_BYTES"]
    # The first layer reads a ring of encoded rows, never the full bit planes.
    assert plan.layers[0].in_words < SHAPE[0] * SHAPE[1]


def test_null_and_wrong_shape_rejected(tiny, tiny_host):
    _, _, _, x = tiny
    scores = np.zeros(10, np.float32)
    assert tiny_host.call_raw(None, scores) != 0
    assert tiny_host.call_raw(x[0], None) != 0
    assert tiny_host.call_raw(x[0], scores) == 0
    with pytest.raises(ValueError, match="shape"):
        tiny_host.infer(np.zeros((32, 31, 3), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        tiny_host.infer(np.zeros((2, 32, 32, 1), np.uint8))
    with pytest.raises(ValueError, match="0..255"):
        tiny_host.infer(np.full((32, 32, 3), 0.5, np.float32))


def test_unsupported_layers_raise_clearly(tmp_path):
    teacher = glt_net(input_shape=SHAPE, num_classes=10, topology=None, widths=(32,), groups=(1,),
                      pools=(True,), teacher=True, classifier_activation=None)
    with pytest.raises(UnsupportedLayerError, match=r"'encoding' \(RealInput\)"):
        export_c(teacher, tmp_path / "teacher")
    mixed = glt_net(input_shape=SHAPE, num_classes=10, topology=None, widths=(32, 32), groups=(1, 1),
                    pools=(True, False), real_layers=["block2"], classifier_activation=None)
    with pytest.raises(UnsupportedLayerError, match=r"'block2_conv' \(BinaryConv2D\).*real-valued"):
        export_c(mixed, tmp_path / "mixed")
    inputs = tf.keras.Input(SHAPE)
    x = FixedThermometer(4, name="encoding")(inputs)
    x = BinaryConv2D(32, 3, name="c1")(x)
    x = L.BatchNormalization()(x)
    x = L.Flatten()(x)
    x = L.Dense(10, name="fc")(x)
    with pytest.raises(UnsupportedLayerError, match=r"'flatten.*\(Flatten\)"):
        export_c(tf.keras.Model(inputs, x), tmp_path / "dense")


def odd_model(encoding, softmax, groups):
    """Odd sizes, groups that are not word-aligned (and split the planes of one colour
    channel), strides, 'valid' padding, a rectangular kernel, a conv bias, a shuffle into
    a different group count."""
    inputs = tf.keras.Input((13, 11, 3))
    x = encoding(inputs)
    x = BinaryConv2D(40, 3, groups=groups, lce_check=False, use_bias=True, name="c1")(x)
    x = L.BatchNormalization(name="b1")(x)
    x = L.MaxPool2D(2, name="p1")(x)
    if groups > 1:
        x = ChannelShuffle(groups, name="s1")(x)
    x = BinaryConv2D(40, (3, 5), groups=4, strides=(1, 2), lce_check=False, name="c2")(x)
    x = L.BatchNormalization(name="b2")(x)
    x = ChannelShuffle(5, name="s2")(x)  # not the conv's 4 groups: a row -> group table
    x = BinaryConv2D(30, 2, groups=2, padding="valid", lce_check=False, name="c3")(x)
    x = L.BatchNormalization(name="b3")(x)
    x = BinaryConv2D(7, 1, lce_check=False, name="head_conv")(x)
    x = L.BatchNormalization(name="head_bn")(x)
    x = L.GlobalAveragePooling2D()(x)
    if softmax:
        x = L.Activation("softmax", name="predictions")(x)
    return tf.keras.Model(inputs, x)


@pytest.mark.parametrize("kind", ["learned", "fixed_softmax", "bitplanes"])
def test_odd_shapes_groups_and_encodings(kind, tmp_path):
    encoding, groups = {"learned": (LearnedThermometer(5, name="encoding"), 5),  # 3 planes per group
                        "fixed_softmax": (FixedThermometer(3, name="encoding"), 1),
                        "bitplanes": (BinaryPlanes(name="encoding"), 4)}[kind]  # 6 planes per group
    model = randomize(odd_model(encoding, softmax=kind.endswith("softmax"), groups=groups), seed=3)
    result = export_c(model, tmp_path / kind)
    assert result.softmax == kind.endswith("softmax")
    data = (tmp_path / kind / "glt_model_data.c").read_text()
    assert "glt_l1_grp[" in data  # c2's rows, reordered by s2, need the group table
    assert any(layer["dense_rows"] for layer in result.layers)
    x = images_for((13, 11, 3), n=8, seed=4)
    keras = model(x.astype("float32"), training=False).numpy()
    for builtin in (False, True):
        ours = build_host(tmp_path / kind, builtin_popcount=builtin).infer(x)
        np.testing.assert_array_equal(ours.argmax(1), keras.argmax(1))
        np.testing.assert_allclose(ours, keras, rtol=1e-4, atol=1e-5 * np.abs(keras).max())


def test_cli_export_c(tiny, tmp_path):
    from glt_keras.cli import main

    model, _, _, _ = tiny
    path = tmp_path / "tiny.h5"
    model.save(path)
    assert main(["export-c", str(path), "-o", str(tmp_path / "c"), "--check", "2", "--qemu", "none"]) == 0
    assert (tmp_path / "c" / "glt_model.h").exists()
    assert main(["export-c", str(tmp_path / "missing.h5"), "-o", str(tmp_path / "x")]) == 2


# -- Cortex-M under QEMU ----------------------------------------------------------------
@pytest.fixture(scope="module")
def toolchain():
    from glt_keras.mcu.qemu import ToolchainUnavailable, ensure_toolchain

    try:
        ensure_toolchain(install=True)
    except ToolchainUnavailable as err:
        pytest.skip(f"Cortex-M toolchain / QEMU unavailable: {err}")


def test_qemu_cortex_m4_matches_host(toolchain, tiny, tiny_host, tmp_path):
    from glt_keras.mcu.qemu import build_firmware, run_firmware

    _, result, out, x = tiny
    fw = build_firmware(out, x[:3], cpu="cortex-m4", build_dir=tmp_path)
    run = run_firmware(fw, timeout=300)
    np.testing.assert_array_equal(run.scores, tiny_host.infer(x[:3]))  # bit-identical logits
    assert run.null_rc != 0
    assert fw.library_sizes["bss"] == result.peak_ram_bytes
    assert 0 < max(run.stack_bytes) < 2048
    assert abs(run.instructions_per_tick - round(run.instructions_per_tick)) < 0.01  # icount calibration
    assert run.instructions_per_inference > 0


def test_glt96_within_cortex_m4_budget(toolchain, tmp_path):
    from glt_keras.mcu.qemu import build_firmware, run_firmware

    model = randomize(glt_net(input_shape=(96, 96, 3), num_classes=2, topology="glt96",
                              classifier_activation=None), seed=5)
    result = export_c(model, tmp_path / "glt96")
    x = images_for((96, 96, 3), n=2, seed=6)
    host = build_host(tmp_path / "glt96").infer(x)
    keras = model(x.astype("float32"), training=False).numpy()
    np.testing.assert_array_equal(host.argmax(1), keras.argmax(1))
    np.testing.assert_allclose(host, keras, rtol=1e-4, atol=1e-5 * np.abs(keras).max())
    fw = build_firmware(tmp_path / "glt96", x[:1], cpu="cortex-m4", build_dir=tmp_path / "fw")
    run = run_firmware(fw, timeout=300)
    np.testing.assert_array_equal(run.scores, host[:1])
    sram = fw.library_static_ram_bytes + max(run.stack_bytes)
    print(f"glt96 on Cortex-M4: flash {fw.library_flash_bytes} B, SRAM {sram} B "
          f"(arena {result.peak_ram_bytes} + stack {max(run.stack_bytes)}), "
          f"{run.instructions_per_inference} instructions / inference")
    assert fw.library_flash_bytes <= 128 * 1024
    assert sram <= 64 * 1024


# -- first layer by table lookup, DSP / portable / builtin kernels -------------------------
def test_level_and_first_layer_tables_match_planes():
    """The thermometer level LUT and the first-layer mismatch table reproduce the planes
    XOR weights for all 256 pixel values, thresholds 0 (always +1) and 256 (never)."""
    from glt_keras.mcu.packing import first_layer_table_words, level_table, table_words_per_level
    from glt_keras.mcu.spec import ConvSpec, EncodingSpec, ModelSpec

    rng = np.random.default_rng(7)
    levels, channels = 5, 3
    thr = np.sort(rng.integers(1, 256, (channels, levels)), axis=1)
    thr[0, 0], thr[1, -1], thr[2, :2], thr[2, -1] = 0, 256, 0, 256  # edge thresholds
    thr = np.sort(thr, axis=1)
    enc = EncodingSpec("encoding", "thermometer", channels, levels, thr)
    lv = level_table(enc)
    p = np.arange(256)
    planes = p[None, :, None] >= thr[:, None, :]  # (C, 256, L)
    assert np.array_equal(lv, planes.sum(-1))
    # a level is a prefix of planes (thresholds ascend)
    assert np.array_equal(planes, np.arange(levels)[None, None, :] < lv[..., None])
    for groups in (1, 5):  # 5: 3 planes per group, channels split between groups
        cout, kh, kw = 10, 2, 3
        cin_g = channels * levels // groups
        kernel = rng.random((kh, kw, cin_g, cout)) < 0.5
        conv = ConvSpec(name="c1", bn=None, pool_layer=None, head=False, in_h=4, in_w=4,
                        in_c=channels * levels, groups=groups, kh=kh, kw=kw, sh=1, sw=1, pad_top=0,
                        pad_left=0, conv_h=4, conv_w=4, ph=1, pw=1, out_h=4, out_w=4, cout=cout,
                        kernel_bits=kernel, perm=rng.permutation(cout))
        spec = ModelSpec("m", (4, 4, channels), 2, False, enc, [conv])
        words = first_layer_table_words(spec, conv.perm)
        cw = table_words_per_level(conv)
        table = words.view(np.uint8).reshape(kh, kw, channels, levels + 1, 4 * cw)
        bits = kernel[..., conv.perm]
        for j in range(cout):
            g = conv.perm[j] // (cout // groups)
            for c in range(channels):
                for value in (0, 1, 127, 128, 255, *thr[c].clip(0, 255).tolist()):
                    x = np.zeros(channels * levels, bool)
                    x[c * levels:(c + 1) * levels] = planes[c, value]
                    xg = x[g * cin_g:(g + 1) * cin_g]
                    mask = np.zeros(channels * levels, bool)
                    mask[c * levels:(c + 1) * levels] = True
                    mg = mask[g * cin_g:(g + 1) * cin_g]
                    want = ((xg != bits[:, :, :, j]) & mg).sum((2,))  # (kh, kw)
                    assert np.array_equal(table[:, :, c, lv[c, value], j], want), (groups, j, c, value)
        assert np.all(table[..., cout:] == 0)  # padding rows


def test_first_layer_table_equals_bitplane_path(tmp_path, monkeypatch):
    """Table and encoder + XNOR-popcount first layers give identical scores (host), for
    every pixel value, with integer thresholds 0 and 256 forced into the spec."""
    import glt_keras.mcu.export as ex

    model = randomize(odd_model(LearnedThermometer(5, name="encoding"), softmax=False, groups=5), seed=11)
    real_parse = ex.parse_model

    def parse_with_edges(m):
        spec = real_parse(m)
        if spec.encoding.thresholds is None:
            return spec
        t = spec.encoding.thresholds.copy()
        t[0, 0], t[1, -1], t[2, 0], t[2, -1] = 0, 256, 0, 256
        spec.encoding.thresholds = np.sort(t, axis=1)
        return spec

    monkeypatch.setattr(ex, "parse_model", parse_with_edges)
    table = export_c(model, tmp_path / "table", first_layer_table=True)
    plain = export_c(model, tmp_path / "plain", first_layer_table=False)
    assert table.layers[0]["table"] and not plain.layers[0]["table"]
    assert read_macros(tmp_path / "table" / "glt_model.h")["GLT_L0_TABLE"] == 1
    x = images_for((13, 11, 3), n=6, seed=12)
    x[2] = (np.arange(13 * 11 * 3) % 256).reshape(13, 11, 3)  # every pixel value in every channel
    x[3] = ((np.arange(13 * 11 * 3) + 97) % 256).reshape(13, 11, 3)
    a = build_host(tmp_path / "table", capture=True)
    b = build_host(tmp_path / "plain", capture=True)
    np.testing.assert_array_equal(a.infer(x), b.infer(x))
    for image in x[2:4]:
        for la, lb in zip(a.layer_outputs(image), b.layer_outputs(image)):
            np.testing.assert_array_equal(la, lb)
    assert 0.05 < (a.layer_outputs(x[2])[0] > 0).mean() < 0.95
    with pytest.raises(UnsupportedLayerError, match="thermometer"):
        export_c(odd_model(BinaryPlanes(name="encoding"), softmax=False, groups=4), tmp_path / "bp",
                 first_layer_table=True)


def test_default_export_uses_table_for_thermometers(tiny):
    _, result, out, _ = tiny
    assert result.layers[0]["table"]
    assert read_macros(out / "glt_model.h")["GLT_L0_TABLE"] == 1


def test_qemu_dsp_and_portable_kernels_identical(toolchain, tiny, tiny_host, tmp_path):
    """Cortex-M4, popcount kernels (bitslice=False): the DSP (USADA8) build, the
    portable build (-DGLT_NO_DSP) and the host build (portable and builtin popcount)
    give bit-identical scores, equal to the default (bit-sliced) export's."""
    from glt_keras.mcu.qemu import build_firmware, run_firmware

    model, _, _, x = tiny
    out = tmp_path / "popcount"
    export_c(model, out, bitslice=False)
    host = tiny_host.infer(x[:2])
    for builtin in (False, True):
        np.testing.assert_array_equal(build_host(out, builtin_popcount=builtin).infer(x[:2]), host)
    runs = {}
    for label, flags in (("dsp", ()), ("portable", ("-DGLT_NO_DSP",))):
        fw = build_firmware(out, x[:2], cpu="cortex-m4", build_dir=tmp_path / label, extra_cflags=flags)
        runs[label] = run_firmware(fw, timeout=300)
        np.testing.assert_array_equal(runs[label].scores, host)
    dis = subprocess.run(["arm-none-eabi-objdump", "-d", str(tmp_path / "dsp" / "lib_glt_runtime.o")],
                         capture_output=True, text=True, check=True).stdout
    assert "usada8" in dis
    dis = subprocess.run(["arm-none-eabi-objdump", "-d", str(tmp_path / "portable" / "lib_glt_runtime.o")],
                         capture_output=True, text=True, check=True).stdout
    assert "usada8" not in dis


def _simulate_bitslice(planes, z, cws, pieces, nb, fields, out_words):
    """The bit-sliced kernel in numpy integers (one conv position, no pooling)."""
    k = planes.shape[1] - 1
    lanes = ((planes[:, :, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int64)  # (st, K+1, 32)
    zval = (((z[:, :, :, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int64)
            << np.arange(nb)[None, None, :, None]).sum(2)  # (st, 2, 32)
    acc = []
    for g, st, mask in cws:
        x = fields[g]  # (K,) bits, stream order
        n1 = int(x.sum())
        clear = 2 * n1 > k
        listed = np.flatnonzero(x == (0 if clear else 1))
        planes_of = 32 * (listed // 32) + 31 - listed % 32
        c = lanes[st, planes_of].sum(0)
        n = k - n1 if clear else n1
        s = 2 * c + (1 << (nb - 1)) - n + zval[st, int(clear)]
        bit = ((s >> nb) & 1) ^ int(clear)
        acc.append(int((bit << np.arange(32)).sum()) & mask)
    out = [0] * out_words
    for c, w, mask, shift in pieces:
        v = acc[c] & mask
        out[w] |= (v << shift if shift >= 0 else v >> -shift) & 0xFFFFFFFF
    return out


@pytest.mark.parametrize("row_words,groups,cout,out_cpg", [(3, 3, 120, 40), (9, 2, 64, 32), (2, 1, 45, 45)])
def test_bitslice_tables_match_mismatch_counts(row_words, groups, cout, out_cpg):
    """The bit-sliced tables (transposed planes, threshold planes, compute words and
    pieces) give bit = (mismatches <= thr) for every row, including thresholds at and
    beyond the extremes and fields with few / many set bits."""
    from glt_keras.mcu.packing import bitslice_tables, row_positions

    rng = np.random.default_rng(row_words)
    k = 32 * row_words
    rows = rng.integers(0, 2**32, (cout, row_words), dtype=np.uint64).astype(np.uint32)
    thr = rng.integers(-3, k + 3, cout)
    thr[:4] = [-5, 0, k, k + 7]
    group_of_row = (np.arange(cout) // 5) % groups
    planes, z, cws, pieces, nb = bitslice_tables(rows, thr, group_of_row, out_cpg)
    word, bit = row_positions(cout, out_cpg)
    stream = ((rows[:, :, None] >> np.arange(32, dtype=np.uint32)) & 1).reshape(cout, k)
    for density in (0.0, 0.1, 0.5, 0.5001, 0.9, 1.0):
        fields = (rng.random((groups, k)) < density).astype(np.int64)
        ours = _simulate_bitslice(planes, z, cws, pieces, nb, fields, int(word.max()) + 1)
        mism = (stream != fields[group_of_row]).sum(1)
        expected = [0] * (int(word.max()) + 1)
        for j in range(cout):
            expected[word[j]] |= int(mism[j] <= thr[j]) << int(bit[j])
        assert ours == expected, density


def test_bitslice_and_popcount_exports_identical(tiny, tiny_host, tmp_path):
    """The default bit-sliced export, the popcount export (bitslice=False) and the
    bit-sliced kernel's portable bit listing (-DGLT_NO_CLZ) agree bit for bit, layer by
    layer (layer_outputs maps the reordered channels back to Keras order)."""
    model, result, out, x = tiny
    assert any(layer.get("bitslice") for layer in result.layers)
    assert "glt_conv_row_bs" in (out / "glt_runtime.c").read_text()
    export_c(model, tmp_path / "popcount", bitslice=False)
    popcount = build_host(tmp_path / "popcount", capture=True)
    ref = tiny_host.infer(x)
    np.testing.assert_array_equal(popcount.infer(x).view(np.uint32), ref.view(np.uint32))
    noclz = build_host(out, cflags=("-O2", "-DGLT_NO_CLZ"))
    np.testing.assert_array_equal(noclz.infer(x).view(np.uint32), ref.view(np.uint32))
    for builtin in (False, True):
        np.testing.assert_array_equal(build_host(out, builtin_popcount=builtin).infer(x).view(np.uint32),
                                      ref.view(np.uint32))
    for image in x[:3]:
        for a, b in zip(tiny_host.layer_outputs(image), popcount.layer_outputs(image)):
            np.testing.assert_array_equal(a, b)


def _qemu_words_equal_host(out, x, tmp_path, variants):
    """Every layer's packed words and the scores of Cortex-M4 builds (label, cflags) of
    the export ``out`` equal the portable host build's, bit for bit. Returns the
    disassembly of each build's runtime object."""
    from glt_keras.mcu.qemu import build_firmware, run_firmware

    host = build_host(out, capture=True)
    ref_scores = host.infer(x)
    ref_words = [host.layer_words(image) for image in x]
    dis = {}
    for label, flags in variants:
        fw = build_firmware(out, x, cpu="cortex-m4", build_dir=tmp_path / label, extra_cflags=flags,
                            dump_layers=True)
        run = run_firmware(fw, timeout=300)
        np.testing.assert_array_equal(run.scores.view(np.uint32), ref_scores.view(np.uint32))
        assert run.layer_words is not None and len(run.layer_words) == len(x)
        for ours, ref in zip(run.layer_words, ref_words):
            assert len(ours) == len(ref)
            for a, b in zip(ours, ref):
                np.testing.assert_array_equal(a, b)
        dis[label] = subprocess.run(["arm-none-eabi-objdump", "-d", str(tmp_path / label / "lib_glt_runtime.o")],
                                    capture_output=True, text=True, check=True).stdout
    return dis


def test_qemu_bitslice_asm_and_c_identical_every_layer(toolchain, tiny, tmp_path):
    """Cortex-M4, default (bit-sliced) export: the hand-written Thumb-2 kernels (list
    records, field lists, summation, first-layer sums) and the C code (-DGLT_NO_BS_ASM,
    -DGLT_NO_L0_ASM) give every layer's packed output words and the scores bit for bit
    equal to the portable host build's."""
    _, result, out, x = tiny
    assert any(layer.get("bitslice") for layer in result.layers)
    assert result.layers[0]["table"]
    dis = _qemu_words_equal_host(out, x[:2], tmp_path, (("asm", ()), ("c", ("-DGLT_NO_BS_ASM",)),
                                                          ("c_l0", ("-DGLT_NO_L0_ASM",))))
    l0_asm = read_macros(out / "glt_model.h")["GLT_L0_CW"] == 8  # glt_l0_sum_t2: 32-row first layers
    for label, text in dis.items():
        for fn in ("glt_bs_eval_t2", "glt_bs_field_t2", "glt_bs_records_t2"):
            assert (f"<{fn}>:" in text) == (label != "c"), (label, fn)
        assert ("<glt_l0_sum_t2>:" in text) == (l0_asm and label != "c_l0")


@pytest.mark.parametrize("widths,groups,table", [
    ((32, 64, 64, 128), (1, 1, 1, 2), False),  # 2 words per group (64-entry records), dense first layer
    ((32, 128, 64), (1, 1, 1), True),  # 4 words per group: C lists, 12-plane counters
])
def test_qemu_bitslice_word_groups(toolchain, widths, groups, table, tmp_path):
    """Bit-sliced layers whose input groups are 1, 2 or 4 words per pixel (the Thumb-2
    list copy handles <= 2, the C code the others), with a bit-sliced "dense" first layer
    (gathered fields) or the table first layer: Cortex-M4 words = host words, and the
    host's bit-sliced layers = the popcount export's, channel for channel."""
    model = randomize(glt_net(input_shape=(16, 16, 3), num_classes=4, topology=None, widths=widths,
                              groups=groups, pools=(True,) + (False,) * (len(widths) - 2) + (True,),
                              shuffle=True, classifier_activation=None), seed=7)
    out = tmp_path / "bs"
    result = export_c(model, out, first_layer_table=table)
    macros = read_macros(out / "glt_model.h")
    wpg = max(-(-l["input"][2] // l["groups"] // 32) for l in result.layers[1:-1])
    assert macros["GLT_BS_MAX_WPG"] == wpg and wpg == (2 if not table else 4)
    assert macros["GLT_BS_DENSE"] == int(not table) and macros["GLT_BS_PIX"] == 1
    x = images_for((16, 16, 3), n=2, seed=8)
    dis = _qemu_words_equal_host(out, x, tmp_path, (("asm", ()), ("c", ("-DGLT_NO_BS_ASM", "-DGLT_NO_L0_ASM"))))
    assert ("<glt_bs_field_t2>:" in dis["asm"]) == (wpg <= 2)
    # 32 first-layer rows: the table layer's Thumb-2 sums (windows inside the image; the
    # border ones, with padding, in C)
    assert ("<glt_l0_sum_t2>:" in dis["asm"]) == table and "<glt_l0_sum_t2>:" not in dis["c"]
    export_c(model, tmp_path / "popcount", first_layer_table=table, bitslice=False)
    ours, ref = build_host(out, capture=True), build_host(tmp_path / "popcount", capture=True)
    for image in x:
        for a, b in zip(ours.layer_outputs(image), ref.layer_outputs(image)):
            np.testing.assert_array_equal(a, b)
    keras = model(x.astype("float32"), training=False).numpy()
    np.testing.assert_array_equal(ours.infer(x).argmax(1), keras.argmax(1))


def test_first_layer_swar_thresholds_identical(tiny, tiny_host):
    """Table first layer: the SWAR threshold test (glt_l0_thr2, 16-bit lanes) and the
    per-row comparisons (-DGLT_NO_L0_SWAR) give the same words in every layer."""
    _, result, out, x = tiny
    assert result.layers[0]["table"] and read_macros(out / "glt_model.h")["GLT_L0_THR2"] == 1
    assert "glt_l0_thr2" in (out / "glt_model_data.c").read_text()
    plain = build_host(out, cflags=("-O2", "-DGLT_NO_L0_SWAR"), capture=True)
    np.testing.assert_array_equal(plain.infer(x).view(np.uint32), tiny_host.infer(x).view(np.uint32))
    for image in x[:3]:
        for a, b in zip(tiny_host.layer_words(image), plain.layer_words(image)):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("widths,groups", [
    (None, None),  # the tiny model (1 and 2 words per group)
    ((32, 128, 64), (1, 1, 1)),  # 4 words per group (C lists)
])
def test_bs_flip_identical_every_layer(toolchain, tiny, widths, groups, tmp_path):
    """Input bits flipped to their minority value (GLT_BS_FLIP, every bit-sliced layer):
    complemented weight planes and moved thresholds (including the constant-output lanes
    of zero-gamma channels) give every layer's words equal to the export without flips,
    on the host (portable and -DGLT_NO_CLZ) and on Cortex-M4 (Thumb-2 and C kernels);
    argmax = Keras."""
    if widths is None:
        model, _, _, x = tiny
    else:
        model = randomize(glt_net(input_shape=(16, 16, 3), num_classes=4, topology=None, widths=widths,
                                  groups=groups, pools=(True, False, True), shuffle=True,
                                  classifier_activation=None), seed=9)
        x = images_for((16, 16, 3), n=4, seed=10)
    x = x.copy()
    x[-1] = np.clip(x[-1].astype(int) // 4 + 160, 0, 255)  # a bright image: skewed bits
    export_c(model, tmp_path / "flip", bs_flip=True)
    export_c(model, tmp_path / "plain", bs_flip=False)
    assert read_macros(tmp_path / "flip" / "glt_model.h")["GLT_BS_FLIP"] != 0
    assert read_macros(tmp_path / "plain" / "glt_model.h")["GLT_BS_FLIP"] == 0
    flip, plain = build_host(tmp_path / "flip", capture=True), build_host(tmp_path / "plain", capture=True)
    ref = plain.infer(x)
    np.testing.assert_array_equal(flip.infer(x).view(np.uint32), ref.view(np.uint32))
    noclz = build_host(tmp_path / "flip", cflags=("-O2", "-DGLT_NO_CLZ"))
    np.testing.assert_array_equal(noclz.infer(x).view(np.uint32), ref.view(np.uint32))
    for image in x:
        for a, b in zip(flip.layer_words(image), plain.layer_words(image)):
            np.testing.assert_array_equal(a, b)
    keras = model(x.astype("float32"), training=False).numpy()
    np.testing.assert_array_equal(ref.argmax(1), keras.argmax(1))
    _qemu_words_equal_host(tmp_path / "flip", x[-2:], tmp_path,
                           (("asm", ()), ("c", ("-DGLT_NO_BS_ASM", "-DGLT_NO_L0_ASM"))))
