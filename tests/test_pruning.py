"""Structured block pruning: structure rule, scores, schedule, exact masks, shrink, LCE export."""
from pathlib import Path

import numpy as np
import pytest

import tensorflow as tf
import tensorflow_model_optimization as tfmot

from glt_keras.models import for_export, glt_net, load_weights, model_summary
from glt_keras.training import pruning as P

SPEC = dict(widths=(64, 128, 128), groups=(1, 2, 2), pools=(True, True, True), shuffle=True)


def _model():
    return glt_net(input_shape=(32, 32, 3), num_classes=10, topology=None, classifier_activation=None, **SPEC)


def _randomise(model, seed=0):
    """Non-trivial BN statistics and gammas (some negative), latent weights in [-1, 1]."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.gamma.assign(rng.normal(0.0, 1.0, n))
            layer.beta.assign(rng.normal(0.0, 0.5, n))
            layer.moving_mean.assign(rng.normal(0.0, 5.0, n))
            layer.moving_variance.assign(rng.uniform(5.0, 50.0, n))
        elif isinstance(layer, tf.keras.layers.Conv2D):
            layer.kernel.assign(rng.uniform(-1.0, 1.0, layer.kernel.shape))
    return model


def _data(n=64, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 255, (n, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, n)
    return x, y


def _op_census(flatbuffer: bytes) -> dict:
    """Operator counts of a flatbuffer (the convert room's census), which must be fully binary."""
    from glt_keras.convert.inspect import inspect_flatbuffer

    report = inspect_flatbuffer(flatbuffer)
    assert report.all_binary, report.float_convs
    return dict(report.op_counts)


@pytest.fixture(scope="module", autouse=True)
def _no_autograph_of_tf_keras():
    """TensorFlow's autograph skips the ``keras`` package but not ``tf_keras``: the first
    traced fit / conversion in a process then spends about a minute transpiling tf_keras
    internals (7 s instead of 70 s here). Skip it for this module, as for Keras 2."""
    from tensorflow.python.autograph.core import config

    rules = config.CONVERSION_RULES
    config.CONVERSION_RULES = rules + (config.DoNotConvert("tf_keras"),)
    yield
    config.CONVERSION_RULES = rules


@pytest.fixture(scope="module")
def trained():
    """A small model pruned to 50% of its blocks during a short fit on random data."""
    tf.keras.utils.set_random_seed(0)
    model = _randomise(_model())
    model.compile(
        tf.keras.optimizers.Adam(1e-2),
        tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    # Updates at steps 0 and 4 (frequency), and at the end step 6 (catch-up).
    schedule = tfmot.sparsity.keras.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=6, frequency=4)
    pruning = P.BlockPruning(model, 0.5, schedule=schedule, score="bn")
    x, y = _data()
    before = [w.copy() for w in model.get_weights()]
    model.fit(x, y, batch_size=16, epochs=2, callbacks=[pruning], verbose=0)
    assert any(np.abs(a - b).max() > 0 for a, b in zip(before, model.get_weights()))
    return model, pruning


def test_structure_of_the_test_model():
    structures = {s.name: s for s in P.block_structure(_model())}
    assert not structures["block1"].prunable  # block2_conv has 2 groups of 32 inputs: minimum
    assert "minimum input width" in structures["block1"].reason
    b2, b3 = structures["block2"], structures["block3"]
    # block2: 2 groups -> shuffle -> 2 groups: 4 cells of 32, blocks of 16 (2 per cell).
    assert (b2.prunable, b2.n_cells, b2.block, b2.blocks_per_cell) == (True, 4, 16, 2)
    # Through the shuffle, a cell holds channels of one producer group at stride 1 whose
    # shuffled positions fall in one consumer group.
    for cell in b2.cells:
        assert len(set(cell // 64)) == 1 and len(set(b2.position[cell] // 64)) == 1
    # block3 -> head (1 group): cells = the 2 producer groups, blocks of 16 (4 per cell).
    assert (b3.prunable, b3.n_cells, b3.block, b3.blocks_per_cell) == (True, 2, 16, 4)
    assert not structures["head"].prunable
    with pytest.raises(ValueError, match="cannot be pruned"):
        P.BlockPruning(_model(), 0.5, layers=["block1"])


def test_structure_is_the_same_under_mixed_bfloat16():
    """The channel order through pools and shuffles is probed with the channel numbers as values;
    bfloat16 holds integers exactly only up to 256, so a 384-channel block must be probed in float32."""
    def describe():
        model = glt_net(input_shape=(16, 16, 3), topology=None, widths=(64, 384, 64), groups=(1, 2, 2),
                        pools=(True, True, True), shuffle=True, num_classes=2, levels=2)
        return [s.describe() for s in P.block_structure(model)]

    expected = describe()
    assert any(d.startswith("block2: 384 channels") for d in expected), expected
    tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        assert describe() == expected
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")


def test_schedule_reaches_target_at_end_step_and_never_exceeds(trained):
    _, pruning = trained
    steps = [h[0] for h in pruning.history]
    assert steps == [0, 4, 6]
    fractions = [h[2] for h in pruning.history]
    assert all(h[1] <= 0.5 + 1e-9 and h[2] <= 0.5 + 1e-9 for h in pruning.history)
    assert fractions == sorted(fractions)  # masks only grow
    assert 0.0 < fractions[1] < 0.5  # gradual
    assert fractions[-1] == pytest.approx(0.5)
    assert pruning.pruned_fraction == pytest.approx(0.5)


def test_schedule_without_fit_constant_and_catch_up():
    model = _randomise(_model())
    schedule = tfmot.sparsity.keras.PolynomialDecay(0.0, 0.5, begin_step=2, end_step=9, frequency=3)
    pruning = P.BlockPruning(model, 0.5, schedule=schedule)
    fractions = []
    for step in range(15):
        pruning.maybe_update(step)
        fractions.append(pruning.pruned_fraction)
    assert max(fractions) <= 0.5 and fractions[9] == pytest.approx(0.5)  # 9 - 2 is not a multiple of 3
    assert fractions[8] < 0.5 and fractions == sorted(fractions)
    with pytest.raises(ValueError, match="ends at sparsity"):
        P.BlockPruning(model, 0.25, schedule=schedule)
    constant = P.BlockPruning(_model(), schedule=tfmot.sparsity.keras.ConstantSparsity(0.25, 0, frequency=1))
    constant.maybe_update(0)
    assert constant.target_ratio == 0.25 and constant.pruned_fraction <= 0.25


def test_masks_hold_through_training(trained):
    model, pruning = trained
    for name, masked in pruning.masks.items():
        bn = model.get_layer(name)
        assert np.all(bn.gamma.numpy()[masked] == 0) and np.all(bn.beta.numpy()[masked] == 1)
    read = P.masks_from_model(model)
    assert set(read) == {n for n, m in pruning.masks.items() if m.any()}
    for name, masked in read.items():
        np.testing.assert_array_equal(masked, pruning.masks[name])


def test_shrink_equals_masked_model_and_is_smaller(trained):
    model, _ = trained
    x, _ = _data(16, seed=7)
    masked_logits = model(x, training=False).numpy()
    small = P.shrink(model)
    widths = [small.get_layer(f"block{i}_conv").filters for i in (1, 2, 3)]
    assert widths == [64, 64, 64]  # 50% of the blocks of block2 and block3; block1 is fixed
    np.testing.assert_allclose(small(x, training=False).numpy(), masked_logits, atol=1e-4, rtol=0)
    assert np.abs(masked_logits).max() > 0.1  # non-trivial logits
    # The rebuilt model is the glt_net of the new widths, and the accounting follows.
    reference = glt_net(
        input_shape=(32, 32, 3), num_classes=10, topology=None, classifier_activation=None, **{**SPEC, "widths": (64, 64, 64)}
    )
    assert model_summary(small) == model_summary(reference)
    report = P.pruning_report(model, small)
    before, after = report["before"], report["after"]
    assert after["params"] < before["params"] and after["macs"] < before["macs"]
    # Kernels (3, 3, cin / groups, cout): encoding 24 planes -> 64 -> 128 (2 groups) -> 128
    # (2 groups) -> 10 classes before; 64 -> 64 -> 64 after.
    assert before["binary_params"] == 9 * 24 * 64 + 9 * 32 * 128 + 9 * 64 * 128 + 128 * 10
    assert after["binary_params"] == 9 * 24 * 64 + 9 * 32 * 64 + 9 * 32 * 64 + 64 * 10
    assert report["widths"]["block2_conv"] == (128, 64)
    assert "| params |" in report["markdown"]
    # Export form: masks survive for_export, and shrink of it gives the same outputs.
    exported_small = P.shrink(for_export(model))
    np.testing.assert_allclose(exported_small(x, training=False).numpy(), masked_logits, atol=1e-4, rtol=0)


def test_shrunk_model_converts_with_lce(trained):
    lce = pytest.importorskip("larq_compute_engine")
    from larq_compute_engine.tflite.python.interpreter import Interpreter

    model, _ = trained
    small = P.shrink(model)
    flatbuffer = lce.convert_keras_model(for_export(small))
    census = _op_census(flatbuffer)
    assert census.get("LceBconv2d") == 4, census  # 3 blocks + head, all binary
    assert not any(op in census for op in ("CONV_2D", "DEPTHWISE_CONV_2D")), census
    x, _ = _data(4, seed=3)
    lce_logits = Interpreter(flatbuffer, num_threads=1, use_indirect_bgemm=True).predict(x)
    np.testing.assert_allclose(lce_logits, model(x, training=False).numpy(), atol=1e-3, rtol=1e-4)


def _block(structure, cell, index):
    return structure.blocks()[cell, index]


def test_bn_score_prunes_near_zero_gamma_first():
    model = _model()
    s = {b.name: b for b in P.block_structure(model)}["block3"]
    bn = model.get_layer("block3_bn")
    rng = np.random.default_rng(0)
    gamma = rng.uniform(1.0, 2.0, 128) * rng.choice([-1.0, 1.0], 128)
    weak = np.concatenate([_block(s, 0, 2), _block(s, 1, 1)])
    gamma[weak] = 1e-4
    bn.gamma.assign(gamma)
    masks = P.select_masks(model, [s], 0.25, "bn")
    np.testing.assert_array_equal(np.flatnonzero(masks["block3_bn"]), np.sort(weak))


def test_l1_score_prunes_small_weights_first():
    model = _model()
    s = {b.name: b for b in P.block_structure(model)}["block2"]
    conv = model.get_layer("block2_conv")
    kernel = np.random.default_rng(0).uniform(0.5, 1.0, conv.kernel.shape)
    weak = np.concatenate([_block(s, c, c % 2) for c in range(s.n_cells)])
    kernel[..., weak] *= 0.01
    conv.kernel.assign(kernel)
    masks = P.select_masks(model, [s], 0.5, "l1")
    np.testing.assert_array_equal(np.flatnonzero(masks["block2_bn"]), np.sort(weak))


def test_global_allocation_and_invalid_masks():
    model = _randomise(_model(), seed=3)
    structures = [s for s in P.block_structure(model) if s.prunable]
    masks = P.select_masks(model, structures, 0.3, "bn", allocation="global")
    assert 0 < P.pruned_fraction(structures, masks) <= 0.3
    P.apply_masks(model, masks)
    x, _ = _data(8, seed=5)
    np.testing.assert_allclose(
        P.shrink(model)(x, training=False).numpy(), model(x, training=False).numpy(), atol=1e-4, rtol=0
    )
    # A mask that removes channels from one cell only would break the groups.
    s = {b.name: b for b in structures}["block2"]
    uneven = np.zeros(128, bool)
    uneven[_block(s, 0, 0)] = True
    with pytest.raises(ValueError, match="same number"):
        P.shrink(_model(), {"block2_bn": uneven})


# ----------------------------------------------------------------------------- step counting
def test_step_count_from_epoch_and_batch_and_case_optimizer():
    import larq as lq

    pruning = P.BlockPruning(_model(), 0.5)
    pruning.set_params({"steps": 5, "epochs": 4})
    pruning.on_epoch_begin(3)
    assert pruning._step(2) == 17  # epoch 3 of 5 steps, batch 2: resume-safe, optimizer-free
    # Without a known epoch length: larq's CaseOptimizer counts in its inner optimizers only.
    inner = [tf.keras.optimizers.legacy.Adam(), tf.keras.optimizers.legacy.Adam()]
    case = lq.optimizers.CaseOptimizer((lq.optimizers.Bop.is_binary_variable, inner[0]), default_optimizer=inner[1])
    inner[0].iterations.assign(7)
    inner[1].iterations.assign(7)
    assert int(case.iterations.numpy()) == 0 and P.optimizer_iterations(case) == 7


def test_resume_mid_schedule_re_derives_the_ratio():
    model = _randomise(_model())
    schedule = tfmot.sparsity.keras.PolynomialDecay(0.0, 0.5, begin_step=2, end_step=10, frequency=4)
    first = P.BlockPruning(model, 0.5, schedule=schedule, allocation="global")
    for step in range(8):  # updates at 2 and 6, "killed" after step 7
        first.maybe_update(step)
    masks = {k: v.copy() for k, v in first.masks.items()}
    # A new process: the callback finds the masks in the model and the ratio from the schedule.
    resumed = P.BlockPruning(model, 0.5, schedule=schedule, allocation="global")
    resumed.on_train_begin()
    resumed.maybe_update(8)
    assert resumed.ratio == pytest.approx(first.ratio) and 0 < resumed.ratio < 0.5
    for name, masked in masks.items():
        np.testing.assert_array_equal(resumed.masks[name], masked)
    assert not resumed.at_target
    resumed.maybe_update(10)
    assert resumed.at_target and resumed.pruned_fraction == pytest.approx(0.5)


# ----------------------------------------------------------------------------- through train()


TINY_MODEL = {"topology": None, "widths": [64, 128], "groups": [1, 2], "pools": [True, True], "shuffle": True,
              "levels": 4}


def _tiny_recipe(folder, name="tiny_pruned", pruning=None, epochs=3):
    from glt_keras.recipe import Recipe

    return Recipe(
        name=name,
        input_shape=(16, 16, 3),
        classes=["bright", "dark"],
        model=dict(TINY_MODEL),
        data={"train": {"folder": str(folder)}, "holdout": 0.25},
        training={"epochs": epochs, "batch_size": 16, "binary_lr": 1e-2, "real_lr": 1e-2, "warmup_epochs": 0},
        pruning=pruning,
    )


# 72 training images / 16 = 4 steps per epoch: the ratio grows from step 0 to step 4 (the first
# step of epoch index 1); masks are updated at steps 0, 2 and 4; epochs 2 and 3 (1-based) end at
# the target, epoch 1 at 0.5 * (1 - 0.5 ** 3).
PRUNING = {"target_ratio": 0.5, "score": "bn", "allocation": "global", "start_epoch": 0, "end_epoch": 1,
           "frequency_steps": 2}


def _rows(run_dir):
    import csv

    with open(run_dir / "history.csv") as f:
        return [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def _init_kernel(shape):
    """Latent weights of magnitude 0.9 with a fixed sign pattern: recognisable after fine-tuning."""
    return 0.9 * np.where(np.random.default_rng(42).random(shape) < 0.5, -1.0, 1.0)


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory, image_folder):
    """A 3-epoch pruning fine-tune via train(), initialised from saved weights (a run folder:
    ``base/best_weights.h5`` in the legacy HDF5 layout, as RunLogger and zoo publish write it)."""
    import os

    from glt_keras.training.run import train

    root = tmp_path_factory.mktemp("runs")
    recipe = _tiny_recipe(image_folder, pruning={**PRUNING, "init_weights": str(root / "base")})
    base = recipe.build_model(classifier_activation=None)
    for name in ("block1_conv", "block2_conv"):
        kernel = base.get_layer(name).kernel
        kernel.assign(_init_kernel(kernel.shape))
    (root / "base").mkdir()
    base.save_weights(str(root / "base" / "best.tmp.h5"))
    os.replace(root / "base" / "best.tmp.h5", root / "base" / "best_weights.h5")
    summary = train(recipe, out_dir=root / "pruned", verbose=0)
    return recipe, root / "pruned", summary


def test_train_with_pruning_block(pruned_run):
    recipe, run, summary = pruned_run
    rows = _rows(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r["pruning_ratio"] for r in rows] == pytest.approx([0.5 * (1 - 0.5**3), 0.5, 0.5])
    fractions = [r["pruned_fraction"] for r in rows]
    assert fractions == sorted(fractions) and 0 < fractions[0] < 0.5 and fractions[-1] == pytest.approx(0.5)
    for name in ("pruning.png", "best_weights.h5", "shrunk_weights.h5", "shrunk_recipe.yaml", "shrunk_model.json",
                 "shrunk/recipe.yaml", "shrunk/best_weights.h5", "shrunk/history.csv"):
        assert (run / name).exists(), name
    # The best weights come from an epoch at the target only.
    eligible = [r["val_accuracy"] for r in rows if r["pruning_ratio"] >= 0.5]
    assert summary["best_val_accuracy"] == pytest.approx(max(eligible))
    # Fine-tuned from init_weights: the latent weights still carry their sign pattern.
    final = recipe.build_model(classifier_activation=None)
    load_weights(final, run / "best_weights.h5")
    kernel = final.get_layer("block1_conv").kernel.numpy()
    assert np.mean(np.sign(kernel) == np.sign(_init_kernel(kernel.shape))) > 0.9


def test_shrunk_recipe_builds_the_shrunk_model_with_equal_outputs(pruned_run, image_folder):
    import json

    from glt_keras.recipe import load_recipe
    from glt_keras.training.splits import load_splits, make_eval_dataset

    recipe, run, _ = pruned_run
    info = json.loads((run / "shrunk_model.json").read_text())
    assert info["widths"] == [64, 64]  # block1 feeds 2 groups of 32: fixed; block2 halves
    assert info["max_abs_difference"] < 1e-3 and info["source"] == "best_weights.h5"
    assert info["report"]["after"]["params"] < info["report"]["before"]["params"]
    assert "markdown" not in info["report"]

    small_recipe = load_recipe(run / "shrunk_recipe.yaml")
    assert small_recipe.model["widths"] == [64, 64] and small_recipe.model["topology"] is None
    small = small_recipe.build_model(classifier_activation=None)
    small.load_weights(str(run / "shrunk_weights.h5"))
    masked = recipe.build_model(classifier_activation=None)
    load_weights(masked, run / "best_weights.h5")
    assert small.count_params() < masked.count_params()
    splits = load_splits(recipe)
    x = next(iter(make_eval_dataset(recipe, *splits.val, batch_size=32)))[0]
    masked_logits = masked(x, training=False).numpy()
    np.testing.assert_allclose(small(x, training=False).numpy(), masked_logits, atol=1e-3, rtol=0)
    assert np.abs(masked_logits).max() > 0.1
    # The publishable folder: the shrunk recipe with the shrunk weights as best weights.
    publish = load_recipe(run / "shrunk" / "recipe.yaml").build_model()
    publish.load_weights(str(run / "shrunk" / "best_weights.h5"))
    # The shrunk recipe still trains the full-width network with the same pruning.
    full = P.training_recipe(small_recipe)
    assert full.model == recipe.model and full.pruning == {k: v for k, v in recipe.pruning.items()}
    assert P.shrunk_recipe(recipe, [64, 64], reproducible=False).pruning is None


def test_resumed_pruning_run_follows_the_same_schedule(tmp_path, pruned_run):
    """Resume a copy of the reference run from its epoch-2 checkpoint: the step count comes
    from the epoch index (larq's CaseOptimizer.iterations stays 0), the masks from the
    checkpoint, and the shrunk artifacts are written at the end (also when a finished
    run was killed before writing them)."""
    import json
    import shutil

    from glt_keras.training.run import train

    recipe, reference, _ = pruned_run
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    for name in ("shrunk_weights.h5", "shrunk_recipe.yaml", "shrunk_model.json"):
        (run / name).unlink()
    shutil.rmtree(run / "shrunk")
    (run / "checkpoints" / "last.json").write_text(json.dumps({"epoch": 2, "path": "epoch_2"}))
    masks_at_start = {}

    class ReadMasks(tf.keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            masks_at_start.update(P.masks_from_model(self.model))

    train(recipe, out_dir=run, verbose=0, resume=True, callbacks=[ReadMasks()])
    # Pruning ended in epoch 1: the resumed network starts with the reference's final masks
    # (a fresh network would have none).
    final = recipe.build_model(classifier_activation=None)
    load_weights(final, reference / "best_weights.h5")
    expected_masks = P.masks_from_model(final)
    assert expected_masks and sorted(masks_at_start) == sorted(expected_masks)
    for name, mask in expected_masks.items():
        np.testing.assert_array_equal(masks_at_start[name], mask, err_msg=name)
    rows, expected = _rows(run), _rows(reference)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[:2] == expected[:2]  # the epochs before the resume point are kept as they were
    for key in ("pruning_ratio", "pruned_fraction"):
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in expected]), key
    widths = json.loads((reference / "shrunk_model.json").read_text())["widths"]
    assert json.loads((run / "shrunk_model.json").read_text())["widths"] == widths
    (run / "shrunk_model.json").unlink()
    train(recipe, out_dir=run, verbose=0, resume=True)  # already trained: only the export
    assert json.loads((run / "shrunk_model.json").read_text())["widths"] == widths


def test_missing_init_weights_names_the_file_and_command(tmp_path, image_folder):
    from glt_keras.training.run import train

    recipe = _tiny_recipe(image_folder, pruning={**PRUNING, "init_weights": "zoo/no_such_base/no_such_base_weights.h5"})
    with pytest.raises(FileNotFoundError, match=r"no_such_base_weights\.h5(.|\n)*glt-keras train no_such_base"):
        train(recipe, out_dir=tmp_path / "run", verbose=0)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=r"pruning\.target is not a known key \(did you mean .target_ratio.\?"):
        train(_tiny_recipe(image_folder, pruning={"target": 0.5}), out_dir=tmp_path / "run2", verbose=0)


def test_shipped_pruned_recipes():
    from glt_keras.recipe import load_recipe

    for name, base in (("vww_binary_pruned", "vww_binary"), ("cifar10_binary_pruned", "cifar10_binary")):
        recipe, base_recipe = load_recipe(name), load_recipe(base)
        settings = P.pruning_settings(recipe)
        assert settings["target_ratio"] == 0.5 and settings["allocation"] in ("global", "layer")
        assert recipe.classes == base_recipe.classes
        # Once published, `model` is the shrunk network and `pruning.full_model` the one trained.
        full_model = (recipe.pruning or {}).get("full_model", recipe.model)
        init = Path(settings["init_weights"])
        if init.exists():  # the weights it fine-tunes from fit the network it trains
            full = glt_net(**{**full_model, "input_shape": recipe.input_shape})
            load_weights(full, init)
            if settings["layers"]:  # the layers it names can be pruned in that network
                P.BlockPruning(full, settings["target_ratio"], layers=settings["layers"],
                               block_size=settings["block_size"])
        else:  # not trained yet: it starts from its base model once that is published
            assert settings["init_weights"] == f"zoo/{base}/{base}_weights.h5"
            assert full_model == base_recipe.model
        assert settings["end_epoch"] < recipe.training["epochs"]
