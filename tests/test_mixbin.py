"""MixBin-style partial binarization: precision switch, cost model, budgeted selection, LCE."""
import itertools
import json

import numpy as np
import pytest
import tensorflow as tf
import yaml

from glt_keras import models
from glt_keras.models import glt_net
from glt_keras.training import mixbin
from glt_keras.training.mixbin import surgery
from conftest import load_benchmark

SHAPE = (16, 16, 3)
TINY = dict(input_shape=SHAPE, num_classes=2, topology="tiny", widths=(64, 64), groups=(1, 2),
            classifier_activation=None)
BUDGETS = (0.0, 0.0004, 0.001, 0.01, 0.05, 0.1, 0.2, 0.26, 0.5, 0.75, 0.8, 1.0)


def tiny(**kwargs):
    return glt_net(**{**TINY, **kwargs})


def _normalised(layer_config):
    """A layer config without the auto-generated quantizer names."""
    conf = json.loads(json.dumps(layer_config, default=str))
    conf.pop("build_config", None)  # present after building, absent after from_config
    for key in ("input_quantizer", "kernel_quantizer"):
        q = conf.get("config", {}).get(key)
        if isinstance(q, dict):
            q.get("config", {}).pop("name", None)
            q.pop("build_config", None)
    return conf


def _configs(model):
    return {layer["name"]: _normalised(layer) for layer in model.get_config()["layers"]}


@pytest.fixture(scope="module")
def easy_data():
    """Dark vs bright 16x16 images: 48 per class."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.integers(0, 110, (48,) + SHAPE), rng.integers(145, 256, (48,) + SHAPE)])
    y = np.array([0] * 48 + [1] * 48)
    return x.astype(np.uint8), y


# ----------------------------------------------------------------------------- precision switch
def test_switching_a_layer_changes_exactly_that_layer():
    binary, mixed = _configs(tiny()), _configs(tiny(real_layers=["block2"]))
    assert set(binary) == set(mixed)  # same layers: a real block feeding a binary one gets no ReLU
    changed = [name for name in binary if binary[name] != mixed[name]]
    assert changed == ["block2_conv"]
    conf = mixed["block2_conv"]["config"]
    assert conf["input_quantizer"] is None and conf["kernel_quantizer"] is None
    assert conf["kernel_constraint"] is None and conf["pad_values"] == 0.0
    assert binary["block2_conv"]["config"]["kernel_quantizer"]["class_name"] == "SteSign"
    # Two real layers in a row: the first keeps its ReLU (it feeds a real layer).
    two = _configs(tiny(real_layers=["block2", "head"]))
    assert "block2_relu" in two and "block1_relu" not in two
    assert two["block1_conv"] == binary["block1_conv"]


def test_real_layer_output_reaches_the_next_binary_layer():
    # sign(ReLU(.)) would be +1 everywhere: the next binary layer must see both signs.
    model = tiny(real_layers=["block1"])
    probe = tf.keras.Model(model.inputs, model.get_layer("block2_conv").input)
    x = np.random.default_rng(2).uniform(0, 255, (4,) + SHAPE).astype("float32")
    features = probe(x).numpy()
    assert (features < 0).mean() > 0.05 and (features >= 0).mean() > 0.05
    assert np.std(model(x).numpy(), axis=0).max() > 0  # the output depends on the input


def test_surgery_matches_the_builder_and_keeps_every_other_weight():
    tf.keras.utils.set_random_seed(3)
    binary = tiny()
    switched = mixbin.with_real_layers(binary, ["block1"])
    assert _configs(switched) == _configs(tiny(real_layers=["block1"]))
    for a, b in zip(binary.layers, switched.layers):
        for wa, wb in zip(a.get_weights(), b.get_weights()):
            np.testing.assert_array_equal(wa, wb)
        if a.name != "block1_conv" and isinstance(a, tf.keras.layers.Conv2D):
            assert type(a.kernel_quantizer) is type(b.kernel_quantizer)
            assert type(a.input_quantizer) is type(b.input_quantizer)


# ----------------------------------------------------------------------------- cost model
def test_bytes_and_macs_match_a_hand_count():
    model = tiny()
    # 8 thermometer levels x 3 channels = 24 input planes; 16x16 -> pool -> 8x8 -> pool -> 4x4.
    want = {
        "block1": (3 * 3 * 24 * 64, 3 * 3 * 24 * 64 * 16 * 16),
        "block2": (3 * 3 * 32 * 64, 3 * 3 * 32 * 64 * 8 * 8),  # groups=2: 32 inputs per group
        "head": (64 * 2, 64 * 2 * 4 * 4),
    }
    cands = mixbin.candidates(model)
    assert {c.name: (c.params, c.macs) for c in cands} == want
    params = sum(p for p, _ in want.values())
    macs = sum(m for _, m in want.values())
    real = want["block2"][0]
    assert mixbin.budget_cost(model, ["block2"], by="macs") == pytest.approx(want["block2"][1] / macs)
    # bytes: real weights at 1 byte, binary at 1/8 byte.
    assert mixbin.budget_cost(model, ["block2"], by="bytes") == pytest.approx(real / (real + (params - real) / 8))
    assert mixbin.budget_cost(model, [], by="bytes") == 0.0
    assert mixbin.budget_cost(model, ["block1", "block2", "head"], by="macs") == 1.0
    summary = mixbin.cost_summary(model, ["block2"])
    binary_bytes = (params - real + 7) // 8
    assert summary["weight_bytes_int8"] == real + binary_bytes
    assert summary["weight_bytes_float32"] == 4 * real + binary_bytes
    assert summary["macs"] == macs and summary["real_macs"] == want["block2"][1]
    # models.model_summary of the built mixed model agrees.
    built = models.model_summary(tiny(real_layers=["block2"]))
    assert built["real_conv_weight_bytes_int8"] == real
    assert built["binary_weight_bytes"] == binary_bytes
    assert built["real_macs"] == want["block2"][1] and built["macs"] == macs
    # Indices and conv names name the same layers.
    assert mixbin.budget_cost(model, [1], by="macs") == mixbin.budget_cost(model, ["block2_conv"], by="macs")
    with pytest.raises(ValueError, match="Unknown layer"):
        mixbin.budget_cost(model, ["block9"])


# ----------------------------------------------------------------------------- selection
def test_knapsack_is_exact_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(1, 8))
        costs = {f"l{i}": int(c) for i, c in enumerate(rng.integers(1, 100, n))}
        values = {k: float(v) for k, v in zip(costs, rng.normal(0.5, 1.0, n))}
        cap = int(rng.integers(0, 250))
        got = mixbin.knapsack(costs, values, lambda t: t <= cap)
        assert sum(costs[k] for k in got) <= cap
        best = max(sum(max(values[k], 0) for k in s)
                   for r in range(n + 1) for s in itertools.combinations(costs, r)
                   if sum(costs[k] for k in s) <= cap)
        assert sum(values[k] for k in got) == pytest.approx(best)


def _check_within_budget(model, scores, rule):
    for by in mixbin.BY:
        for budget in BUDGETS:
            sel = mixbin.select_from_scores(model, scores, budget, by=by, rule=rule)
            assert sel.cost <= budget
            assert sel.cost == mixbin.budget_cost(model, sel.layers, by=by)
            if budget == 0.0:
                assert sel.layers == []


def test_cheap_methods_never_exceed_the_budget():
    model = tiny()
    for method, by, budget, seed in itertools.product(("first_last", "random"), mixbin.BY, BUDGETS, (0, 1, 2)):
        sel = mixbin.select_layers(model, budget, by=by, method=method, seed=seed)
        assert sel.cost <= budget and sel.cost == mixbin.budget_cost(model, sel.layers, by=by)
        assert set(sel.layers) <= {"block1", "block2", "head"}
        if budget == 0.0:
            assert sel.layers == []
    # first_last takes both ends when they fit, and never a middle layer.
    assert mixbin.select_layers(model, 1.0, method="first_last").layers == ["block1", "head"]
    assert mixbin.select_layers(model, 0.01, method="first_last").layers == ["head"]
    # random is seeded.
    a = mixbin.select_layers(model, 0.5, method="random", seed=7)
    assert a.layers == mixbin.select_layers(model, 0.5, method="random", seed=7).layers


def test_gated_selection_trains_gates_and_respects_the_budget(easy_data):
    model = tiny()
    sel = mixbin.select_layers(model, 0.3, by="macs", method="gated", data=easy_data, steps=6, batch_size=16,
                               eval_images=32)
    assert sel.cost <= 0.3 and sel.method == "gated"
    assert set(sel.details["gates"]) == {"block1", "block2", "head"}
    assert all(0.0 < g < 1.0 for g in sel.details["gates"].values())
    assert all(np.isfinite(v) for v in sel.scores.values())
    _check_within_budget(model, sel.scores, "knapsack")
    # Nothing affordable: no training, the binary network.
    zero = mixbin.select_layers(model, 0.0, method="gated", data=easy_data)
    assert zero.layers == [] and zero.cost == 0.0


def test_gated_layer_is_both_precisions_from_one_kernel():
    tf.keras.utils.set_random_seed(4)
    binary = tiny()
    gated = mixbin.gated_model(binary)
    x = np.random.default_rng(5).uniform(0, 255, (3,) + SHAPE).astype("float32")
    convs = [c.conv for c in mixbin.candidates(binary)]
    for value, reference in ((0.0, binary), (1.0, mixbin.with_real_layers(binary, convs))):
        for conv in convs:
            gated.get_layer(conv).force_gate(value)
        np.testing.assert_allclose(gated(x).numpy(), reference(x).numpy(), atol=1e-5)


def test_greedy_selection_respects_the_budget(easy_data):
    model = tiny()
    sel = mixbin.select_layers(model, 0.9, by="bytes", method="greedy", data=easy_data, steps=2,
                               finetune_steps=1, batch_size=16, eval_images=32)
    assert sel.cost <= 0.9 and sel.details["rule"] == "greedy"
    assert set(sel.details["loss_single_real"]) == {"block1", "block2", "head"}
    _check_within_budget(model, sel.scores, "greedy")


# ----------------------------------------------------------------------------- LCE conversion
def test_mixed_model_converts_runs_and_matches_keras(tmp_path):
    from glt_keras.convert import to_tflite

    tf.keras.utils.set_random_seed(0)
    model = glt_net(input_shape=(32, 32, 3), num_classes=10, topology="tiny", widths=(64, 64, 64),
                    groups=(1, 2, 2), pools=(True, True, False), real_layers=["block2"],
                    classifier_activation=None)
    images = np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3)).astype(np.uint8)
    result = to_tflite(model, tmp_path / "mixed.tflite", verify=True, verify_images=images)
    report, check = result.report, result.verification
    assert report.op_counts["LceBconv2d"] == 3  # block1, block3 and the head
    assert report.op_counts["CONV_2D"] == 1 and report.binary_convs == 3
    assert [c.layer for c in report.float_convs] == ["block2_conv"]
    assert check.passed and check.argmax_agreement == 1.0 and check.max_abs_diff < 1e-3
    keras_out = model(images.astype("float32")).numpy()
    assert np.std(keras_out, axis=0).max() > 0.5  # the logits depend on the image: the match above means something
    assert (tmp_path / "mixed.tflite").stat().st_size == report.flatbuffer_bytes


# ----------------------------------------------------------------------------- CLI
def test_cli_selects_without_training(tmp_path, capsys):
    from glt_keras.cli import main

    recipe = {"name": "tiny_mixbin", "input_shape": list(SHAPE), "classes": ["a", "b"],
              "model": {"topology": "tiny"}, "data": {"train": {"folder": str(tmp_path)}}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out_json = tmp_path / "sel.json"
    assert main(["mixbin", str(path), "--budget", "0.01", "--by", "macs", "--method", "first_last",
                 "--json", str(out_json)]) == 0
    assert "real layers ['head']" in capsys.readouterr().out
    saved = json.loads(out_json.read_text())["selection"]
    assert saved["layers"] == ["head"] and saved["cost"] <= 0.01
    assert main(["mixbin", str(path), "--budget", "1.5"]) == 2  # a clear error, not a traceback


def test_int8_export_makes_real_layers_int8_conv2d(tmp_path):
    from glt_keras.convert import to_tflite
    from glt_keras.convert.verify import lce_interpreter, run_interpreter

    tf.keras.utils.set_random_seed(1)
    model = tiny(real_layers=["block1"])
    images = np.random.default_rng(6).integers(0, 256, (16,) + SHAPE).astype(np.float32)
    exported = mixbin.int8_real_export(model, images)
    assert isinstance(exported.get_layer("block1_conv"), mixbin.Int8FoldedConv2D)
    assert exported.get_layer("block1_conv").input_range == (-1.0, 1.0)  # the thermometer's +-1
    result = to_tflite(exported, tmp_path / "int8.tflite", verify=False)
    report = result.report
    assert report.op_counts["CONV_2D"] == 1 and report.binary_convs == 2
    weights = [b for b in report.largest_buffers if b.consumers == ["CONV_2D[1]"]]
    assert weights and weights[0].dtype == "int8" and weights[0].bytes == 3 * 3 * 24 * 64
    out, _ = run_interpreter(lce_interpreter(result.flatbuffer), images)
    float_top = model(images).numpy().argmax(-1)
    assert (out.argmax(-1) == float_top).mean() >= 0.75  # post-training int8: near the float model


# ----------------------------------------------------------------------------- fine-tuning from the binary network
def _tiny_recipe(folder=None, **training):
    from glt_keras.recipe import Recipe

    return Recipe(name="tiny_mixbin", input_shape=SHAPE, classes=["bright", "dark"],
                  model={"topology": "tiny", "widths": [64, 64], "groups": [1, 2], "num_classes": 2},
                  data={"train": {"folder": str(folder or "unused")}, "holdout": 0.25},
                  training={"epochs": 1, "batch_size": 16, "warmup_epochs": 0, **training})


def _trained_like(model, seed=0):
    """Random latent kernels and BatchNorm statistics (a fresh network's are all alike)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.set_weights([rng.uniform(0.5, 2.0, n), rng.normal(0, 0.5, n), rng.normal(0, 3.0, n),
                               rng.uniform(5.0, 50.0, n)])
        elif getattr(layer, "kernel", None) is not None:
            layer.kernel.assign(rng.uniform(-0.3, 0.3, layer.kernel.shape))
    return model


def test_binary_start_turns_a_binary_layer_into_the_same_real_layer(tmp_path):
    recipe = _tiny_recipe()
    binary = _trained_like(recipe.build_model(classifier_activation=None))
    models.save_weights(binary, tmp_path / "binary_weights.h5")
    x = np.random.default_rng(3).integers(0, 256, (8,) + SHAPE).astype(np.float32)

    start = mixbin.binary_start(recipe, ["block1"], tmp_path / "binary_weights.h5", tmp_path / "start_weights.h5")
    variant = mixbin.variant_recipe(recipe, ["block1"]).build_model(classifier_activation=None)
    models.load_weights(variant, start)
    conv = variant.get_layer("block1_conv")
    assert conv.kernel_quantizer is None and conv.input_quantizer is None  # really real-valued now
    w = binary.get_layer("block1_conv").kernel.numpy()
    alpha = np.abs(w).mean(axis=(0, 1, 2))
    np.testing.assert_allclose(conv.kernel.numpy(), np.sign(w) * alpha, rtol=1e-6)
    for name in ("block2_conv", "head_conv", "block2_bn"):  # every other layer unchanged
        for a, b in zip(variant.get_layer(name).get_weights(), binary.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)
    # block1's input is the thermometer's +-1 planes: the real layer computes what the binary one
    # did (its BatchNorm output), except on the border, which the real conv pads with 0, not +1.
    def block1(model):
        return tf.keras.Model(model.inputs, model.get_layer("block1_bn").output)(x, training=False).numpy()

    np.testing.assert_allclose(block1(variant)[:, 1:-1, 1:-1], block1(binary)[:, 1:-1, 1:-1], atol=1e-4)
    # A start from the untrained network would not: the check above can fail.
    fresh = mixbin.variant_recipe(recipe, ["block1"]).build_model(classifier_activation=None)
    assert np.abs(block1(fresh) - block1(binary))[:, 1:-1, 1:-1].max() > 1e-2


def test_binary_start_recalibrates_the_batchnorm_of_a_real_layer(tmp_path):
    recipe = _tiny_recipe()
    binary = _trained_like(recipe.build_model(classifier_activation=None))
    models.save_weights(binary, tmp_path / "binary_weights.h5")
    calibration = np.random.default_rng(4).integers(0, 256, (32,) + SHAPE).astype(np.uint8)
    start = mixbin.binary_start(recipe, ["block2"], tmp_path / "binary_weights.h5", tmp_path / "start_weights.h5",
                                calibration=calibration)
    variant = mixbin.variant_recipe(recipe, ["block2"]).build_model(classifier_activation=None)
    models.load_weights(variant, start)
    probe = tf.keras.Model(variant.inputs, variant.get_layer("block2_conv").output)
    out = probe(calibration.astype(np.float32), training=False).numpy()
    bn = variant.get_layer("block2_bn")
    np.testing.assert_allclose(bn.moving_mean.numpy(), out.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bn.moving_variance.numpy(), out.var(axis=(0, 1, 2)), rtol=1e-3)


def test_training_init_weights_fine_tunes_from_the_file(tmp_path, image_folder):
    from glt_keras.models import load_weights
    from glt_keras.training.run import train

    base = _trained_like(_tiny_recipe(image_folder).build_model(classifier_activation=None))
    models.save_weights(base, tmp_path / "base_weights.h5")
    recipe = _tiny_recipe(image_folder, init_weights=str(tmp_path / "base_weights.h5"), binary_lr=1e-6,
                          real_lr=1e-6)
    train(recipe, out_dir=tmp_path / "run", verbose=0)
    tuned = recipe.build_model(classifier_activation=None)
    load_weights(tuned, tmp_path / "run" / "best_weights.h5")
    for name in ("block1_conv", "block2_conv", "head_conv"):
        np.testing.assert_allclose(tuned.get_layer(name).kernel.numpy(), base.get_layer(name).kernel.numpy(),
                                   atol=1e-4)
    # A MixBin recipe started from the binary network: its real layer starts as alpha * sign(W).
    mixed = _tiny_recipe(image_folder, init_weights=str(tmp_path / "base_weights.h5"), real_from_binary=True,
                         binary_lr=1e-6, real_lr=1e-6).with_changes(model={"real_layers": ["block2"]})
    train(mixed, out_dir=tmp_path / "mixed", verbose=0)
    assert (tmp_path / "mixed" / "start_weights.h5").exists()
    tuned = mixed.build_model(classifier_activation=None)
    load_weights(tuned, tmp_path / "mixed" / "best_weights.h5")
    w = base.get_layer("block2_conv").kernel.numpy()
    np.testing.assert_allclose(tuned.get_layer("block2_conv").kernel.numpy(),
                               np.sign(w) * np.abs(w).mean(axis=(0, 1, 2)), atol=1e-4)
    np.testing.assert_allclose(tuned.get_layer("block1_conv").kernel.numpy(), base.get_layer("block1_conv").kernel.numpy(),
                               atol=1e-4)
    missing = _tiny_recipe(image_folder, init_weights=str(tmp_path / "nothing_weights.h5"))
    with pytest.raises(FileNotFoundError, match=r"training\.init_weights: .*nothing_weights\.h5"):
        train(missing, out_dir=tmp_path / "run2", verbose=0)


def test_recalibrating_all_batchnorms_at_once_equals_layer_by_layer():
    x = np.random.default_rng(5).integers(0, 256, (64,) + SHAPE).astype(np.float32)
    one_by_one = _trained_like(tiny(widths=(64, 64, 64), groups=(1, 2, 2), pools=(True, True, False)))
    at_once = mixbin.with_real_layers(one_by_one, ["block2"])
    one_by_one = mixbin.with_real_layers(one_by_one, ["block2"])
    for c in mixbin.candidates(one_by_one):
        surgery._recalibrate_bn(one_by_one, c.conv, x)
    before = at_once(x).numpy()
    surgery._recalibrate_all(at_once, x)
    for c in mixbin.candidates(one_by_one):
        bn = c.conv.replace("_conv", "_bn")
        np.testing.assert_allclose(at_once.get_layer(bn).moving_mean.numpy(),
                                   one_by_one.get_layer(bn).moving_mean.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(at_once.get_layer(bn).moving_variance.numpy(),
                                   one_by_one.get_layer(bn).moving_variance.numpy(), rtol=1e-3, atol=1e-4)
        assert at_once.get_layer(bn).momentum == one_by_one.get_layer(bn).momentum  # restored
    # (Outputs are not compared: the fused kernel's n / (n - 1) variance correction, 6e-5 here,
    # flips the sign of a few near-zero inputs of the next binary layer.)
    assert np.abs(before - at_once(x).numpy()).max() > 1e-3  # the statistics did change


def test_a_real_path_started_from_the_binary_one_computes_the_same_on_pm1_inputs():
    gated = mixbin.gated_model(_trained_like(tiny()), gate_init=0.5)
    layer = gated.get_layer("block2_conv")
    x = tf.constant(np.where(np.random.default_rng(6).random((4, 8, 8, 64)) < 0.5, -1.0, 1.0), tf.float32)

    def both():
        y_binary, y_real = layer.paths(x)
        return (layer.bn_binary(y_binary, training=False).numpy()[:, 1:-1, 1:-1],
                layer.bn_real(y_real, training=False).numpy()[:, 1:-1, 1:-1])

    binary_before, real_before = both()
    assert np.abs(binary_before - real_before).max() > 1e-2  # latent weights: a different function
    surgery._binarize_kernel(layer, layer.bn_real)
    binary_after, real_after = both()
    np.testing.assert_allclose(binary_after, binary_before, atol=1e-5)  # the binary path is unchanged
    np.testing.assert_allclose(real_after, binary_after, atol=1e-3)  # interior: same padding-free sums


def test_table_report_from_saved_results(tmp_path, capsys):
    table = load_benchmark("mixbin_table")
    done = {"accuracy": 0.62, "best_val_accuracy": 0.63, "tflite_bytes": 121600, "int8_tflite_bytes": 121600,
            "int8_accuracy": 0.62, "verification": "verification passed: ...", "lce_bconv2d": 9, "float_convs": [],
            "macs": 100, "real_macs": 0, "weight_bytes_int8": 96112}
    state = {"meta": {"recipe": "demo", "by": "macs", "epochs": 1, "search_steps": 4, "seed": 0},
             "selections": {"gated/0": {"budget": 0.0, "method": "gated", "layers": [], "cost": 0.0},
                            "gated/0.1": {"budget": 0.1, "method": "gated", "layers": ["block7"], "cost": 0.03}},
             "trained": {"": done}}
    (tmp_path / "results.json").write_text(json.dumps(state))
    assert table.main(["--out", str(tmp_path), "--report-only"]) == 0
    rows = [line for line in (tmp_path / "table.md").read_text().splitlines() if line.startswith("| 0")]
    assert rows[0].startswith("| 0 | gated | (binary) | 0.0000 | 0.6200 | 0.6300 | 121600 |") and rows[0].endswith("| yes |")
    assert "block7" in rows[1] and "(not trained yet)" in rows[1] and not rows[1].endswith("NO |")
    assert (tmp_path / "accuracy_vs_bytes.png").stat().st_size > 1000
    assert table.main(["--out", str(tmp_path / "nothing"), "--report-only"]) == 2
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- mixbin-demo:start -->\nold\n<!-- mixbin-demo:end -->\nrest\n")
    assert table.main(["--out", str(tmp_path), "--report-only", "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("rest\n")
    assert "| 0 | all | (fully binary) | 62.0% |  | 62.0% | 121,600 | 0.0% |" in text
