"""training.ema_momentum: the weight average's arithmetic, its swap, and a run that validates,
selects, saves and resumes the averaged network."""
import csv
import json

import numpy as np
import pytest
import tensorflow as tf

from glt_keras import models
from glt_keras.training.weight_average import WeightAverage
from glt_keras.training.run import train

from test_training import StopAfter, tiny_recipe


def _dense():
    model = tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.Dense(2), tf.keras.layers.BatchNormalization()])
    return model


def test_average_follows_the_ramped_momentum():
    model = _dense()
    average = WeightAverage(model, momentum=0.9)
    start = [w.copy() for w in model.get_weights()]
    expected = [w.copy() for w in start]
    rng = np.random.default_rng(0)
    for n in range(5):
        new = [rng.normal(size=w.shape).astype("float32") for w in start]
        model.set_weights(new)
        average.update()
        m = min(0.9, (1 + n) / (10 + n))
        expected = [m * e + (1 - m) * w for e, w in zip(expected, new)]
    # Every float variable is averaged, BatchNorm's moving statistics included.
    assert len(average.state.averages) == len(model.weights) == 6
    for got, want in zip(average.state.averages, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    assert int(average.state.updates) == 5


def test_applied_swaps_the_average_in_and_restores_the_weights_even_on_error():
    model = _dense()
    average = WeightAverage(model, momentum=0.5)
    own = [w.copy() for w in model.get_weights()]
    model.set_weights([w + 1.0 for w in own])
    average.update()  # first step: m = 0.1, so the average moves most of the way
    trained = [w.copy() for w in model.get_weights()]
    with average.applied():
        inside = model.get_weights()
    for a, w in zip(average.state.averages, inside):
        np.testing.assert_array_equal(a.numpy(), w)
    assert not np.allclose(inside[0], trained[0])
    with pytest.raises(RuntimeError, match="boom"):
        with average.applied():
            raise RuntimeError("boom")
    for a, b in zip(model.get_weights(), trained):
        np.testing.assert_array_equal(a, b)


def test_bad_momentum_is_a_clear_error():
    with pytest.raises(ValueError, match="ema_momentum"):
        WeightAverage(_dense(), momentum=1.0)


def _rows(run):
    with open(run / "history.csv") as f:
        return list(csv.DictReader(f))


class AveragesPerEpoch(tf.keras.callbacks.Callback):
    """The averaged weights of every epoch, read back from the epoch's checkpoint."""

    def __init__(self, run):
        super().__init__()
        self.run, self.epochs = run, {}

    def on_epoch_end(self, epoch, logs=None):
        reader = tf.train.load_checkpoint(str(self.run / "checkpoints" / f"epoch_{epoch + 1}" / "ckpt"))
        keys = [k for k in reader.get_variable_to_shape_map()
                if k.startswith("weight_average/averages/") and k.endswith("VARIABLE_VALUE")]
        self.epochs[epoch + 1] = [reader.get_tensor(k) for k in sorted(keys, key=lambda k: int(k.split("/")[2]))]


def _average_updates(run, epoch):
    """The weight average's update counter in the run's checkpoint of ``epoch``."""
    ckpt = str(run / "checkpoints" / f"epoch_{epoch}" / "ckpt")
    reader = tf.train.load_checkpoint(ckpt)
    return [reader.get_tensor(k) for k, _ in tf.train.list_variables(ckpt) if k.startswith("weight_average/updates")]


def _assert_best_weights_are(recipe, run, expected):
    """best_weights.h5 holds ``expected`` (an epoch's averaged weights); returns what it holds."""
    student = recipe.build_model(classifier_activation=None)
    models.load_weights(student, run / "best_weights.h5")
    saved = [w.numpy() for w in student.weights if w.dtype.is_floating]
    assert len(saved) == len(expected) > 0
    for got, want in zip(saved, expected):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    return saved


def test_run_validates_selects_saves_and_resumes_the_averaged_network(tmp_path, image_folder):
    run = tmp_path / "run"
    recipe = tiny_recipe(image_folder, epochs=3, ema_momentum=0.9, select_smoothing=2)
    averages = AveragesPerEpoch(run)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, out_dir=run, verbose=0, callbacks=[averages, StopAfter(2)])
    steps = 72 // 16
    assert _average_updates(run, 2) == [2 * steps]
    summary = train(recipe, out_dir=run, verbose=0, resume=True, callbacks=[averages])
    assert _average_updates(run, 3) == [3 * steps]  # not 1 * steps: the resumed run continued the average
    rows = _rows(run)
    assert [int(float(r["epoch"])) for r in rows] == [1, 2, 3]
    assert all(r["val_accuracy_ema"] != "" and r["val_accuracy_ema_smooth"] != "" for r in rows)
    best_row = max(rows, key=lambda r: float(r["val_accuracy_ema_smooth"]))
    assert summary["best_val_accuracy_ema_smooth"] == pytest.approx(float(best_row["val_accuracy_ema_smooth"]))
    # best_weights.h5 is the averaged network of the selected epoch, not the raw model.
    saved = _assert_best_weights_are(recipe, run, averages.epochs[int(float(best_row["epoch"]))])
    trained = [w.numpy() for w in _last_model(recipe, run).weights if w.dtype.is_floating]
    assert any(not np.allclose(a, b) for a, b in zip(saved, trained))


def _last_model(recipe, run, epoch=3):
    """The raw (not averaged) network of the run's checkpoint of ``epoch``."""
    model = recipe.build_model(classifier_activation=None)
    tf.train.Checkpoint(model=model).read(str(run / "checkpoints" / f"epoch_{epoch}" / "ckpt")).expect_partial()
    return model


def test_average_of_a_pruning_run_is_a_masked_network_that_shrinks(tmp_path, image_folder):
    """Blocks are masked during the run (epoch 1), so the plain average of their BatchNorm gamma
    and beta mixes trained and masked values; the saved average must carry the masks exactly."""
    from glt_keras.training.pruning import masks_from_model

    run = tmp_path / "run"
    recipe = tiny_recipe(image_folder, epochs=3, ema_momentum=0.9)
    recipe = recipe.with_changes(pruning={"target_ratio": 0.5, "score": "bn", "allocation": "global",
                                          "start_epoch": 0, "end_epoch": 1, "frequency_steps": 1,
                                          "block_size": 32})
    averages = AveragesPerEpoch(run)
    train(recipe, out_dir=run, verbose=0, callbacks=[averages])
    raw = _last_model(recipe, run)
    masks = masks_from_model(raw)
    assert masks and all(m.any() for m in masks.values())
    best = recipe.build_model(classifier_activation=None)
    models.load_weights(best, run / "best_weights.h5")
    saved = masks_from_model(best)
    assert saved.keys() == masks.keys()
    for name in masks:
        np.testing.assert_array_equal(saved[name], masks[name])
    # ... and is still the average, not the raw network, everywhere else.
    eligible = [r for r in _rows(run) if float(r["pruning_ratio"]) >= 0.5]
    epoch = int(float(max(eligible, key=lambda r: float(r["val_accuracy_ema"]))["epoch"]))  # the first best
    kernel = best.get_layer("block1_conv").kernel.numpy()
    np.testing.assert_allclose(kernel, averages.epochs[epoch][_index_of(best, "block1_conv/kernel")], rtol=1e-6)
    assert not np.allclose(kernel, raw.get_layer("block1_conv").kernel.numpy())
    shrunk = json.loads((run / "shrunk_model.json").read_text())
    assert sum(shrunk["widths"]) < sum(models.TOPOLOGIES["tiny"]["widths"])
    assert (run / "shrunk" / "best_weights.h5").exists()


def _index_of(model, name: str) -> int:
    floating = [w for w in model.weights if w.dtype.is_floating]
    return next(i for i, w in enumerate(floating) if w.name.startswith(name))


def test_distilled_run_from_cached_views_averages_too(image_folder, tmp_path):
    """The VWW recipes' shape: teacher files, cached views, mixup, bfloat16, a TargetDistiller validating."""
    from glt_keras.recipe import Recipe
    from test_teachers import CLASSES, _keras_teacher, _write_tflite

    teacher = _write_tflite(_keras_teacher(), tmp_path / "teacher.tflite")
    recipe = Recipe(
        name="tiny_teachers_ema", input_shape=(16, 16, 3), classes=["bright", "dark"],
        model={"topology": "tiny", "levels": 4},
        data={"train": [{"folder": str(image_folder)}, {"folder": str(image_folder), "labels": "teacher"}],
              "holdout": 0.25, "augment": {"crop": "random_resized", "flip": True, "mixup": 0.5}},
        training={"epochs": 1, "batch_size": 16, "select_smoothing": 2, "ema_momentum": 0.9,
                  "precision": "mixed_bfloat16"},
        kd={"teachers": [{"path": str(teacher), "classes": CLASSES}], "alpha": 0.2, "temperature": 1.0,
            "view_cache": 2},
    )
    run = tmp_path / "run"
    averages = AveragesPerEpoch(run)
    summary = train(recipe, out_dir=run, steps_per_epoch=3, verbose=0, view_cache_dir=tmp_path / "views",
                    callbacks=[averages])
    rows = _rows(run)
    assert summary["epochs"] == 1 and [r["val_accuracy_ema"] != "" for r in rows] == [True]
    assert _average_updates(run, 1) == [3]  # every distilled step updated it
    # best_weights.h5 is the student's average (the distiller's inner model), not its raw weights.
    saved = _assert_best_weights_are(recipe, run, averages.epochs[1])
    raw = [w.numpy() for w in _last_model(recipe, run, epoch=1).weights if w.dtype.is_floating]
    assert any(not np.allclose(a, b) for a, b in zip(raw, saved))


def test_adding_the_average_on_resume_is_a_clear_error_and_changes_nothing(tmp_path, image_folder):
    from glt_keras.training.checkpoints import CheckpointError

    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_recipe(image_folder, epochs=3), out_dir=run, verbose=0, callbacks=[StopAfter(1)])
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(CheckpointError, match="holds no weight average.*remove ema_momentum"):
        train(tiny_recipe(image_folder, epochs=3, ema_momentum=0.9), out_dir=run, verbose=0, resume=True)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
