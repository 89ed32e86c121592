"""Training: distillation loss, fit loop, checkpoints and resume, strategies, zoo round trip."""
import csv
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from glt_keras import models
from glt_keras.recipe import Recipe
from glt_keras.training.distill import Distiller, distillation_loss
from glt_keras.training.run import CheckpointError, train

from conftest import checkpoint_optimizer_steps, resume_probe


# ----------------------------------------------------------------------------- KD loss
def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_distillation_loss_matches_hand_computation():
    s = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
    t = np.array([[1.0, 1.5, -0.5], [-2.0, 0.0, 2.0]])
    y = np.array([0, 2])
    alpha, temp = 0.3, 2.5
    ce = -np.log(_softmax(s)[np.arange(2), y])
    pt, ps = _softmax(t / temp), _softmax(s / temp)
    kl = (pt * (np.log(pt) - np.log(ps))).sum(-1)
    want = np.mean(alpha * ce + (1 - alpha) * temp**2 * kl)
    got = distillation_loss(y, s.astype("float32"), t.astype("float32"), alpha=alpha, temperature=temp)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_distillation_loss_with_alpha_one_is_cross_entropy():
    s = np.random.default_rng(0).normal(size=(4, 5)).astype("float32")
    t = np.random.default_rng(1).normal(size=(4, 5)).astype("float32")
    y = np.array([0, 1, 4, 2])
    ce = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(y, s, from_logits=True))
    np.testing.assert_allclose(float(distillation_loss(y, s, t, alpha=1.0)), float(ce), rtol=1e-6)


def test_distiller_trains_student_only():
    student = models.glt_net(input_shape=(16, 16, 3), num_classes=2, topology="tiny", classifier_activation=None)
    teacher = models.glt_net(input_shape=(16, 16, 3), num_classes=2, topology="tiny", teacher=True,
                             classifier_activation=None)
    teacher_before = [w.copy() for w in teacher.get_weights()]
    student_before = [w.copy() for w in student.get_weights()]
    distiller = Distiller(student, teacher, alpha=0.5, temperature=2.0, feature_pairs=[("block2_bn", "block2_bn")])
    distiller.compile(optimizer=tf.keras.optimizers.legacy.Adam(1e-2),
                      metrics=[tf.keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    x = np.random.default_rng(0).uniform(0, 255, (32, 16, 16, 3)).astype("float32")
    y = np.random.default_rng(1).integers(0, 2, 32)
    history = distiller.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert {"loss", "accuracy"} <= set(history.history)
    for a, b in zip(teacher_before, teacher.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(student_before, student.get_weights()))
    assert "accuracy" in distiller.evaluate(x, y, verbose=0, return_dict=True)


# ----------------------------------------------------------------------------- fit loop


def tiny_recipe(folder, **training):
    return Recipe(
        name="tiny_test",
        input_shape=(16, 16, 3),
        classes=["bright", "dark"],
        model={"topology": "tiny", "levels": 4},
        data={"train": {"folder": str(folder)}, "holdout": 0.25, "augment": {"flip": True}},
        training={"epochs": 3, "batch_size": 16, "binary_lr": 1e-2, "real_lr": 1e-2,
                  "threshold_init": "quantiles", **training},
    )


class StopAfter(tf.keras.callbacks.Callback):
    """Simulates a kill right after an epoch's checkpoint was written."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epoch:
            raise KeyboardInterrupt("killed")


def _history(run_dir):
    with open(run_dir / "history.csv") as f:
        return [int(float(r["epoch"])) for r in csv.DictReader(f)]


def test_tiny_recipe_trains_end_to_end(tmp_path, image_folder):
    summary = train(tiny_recipe(image_folder, epochs=4), out_dir=tmp_path / "run", verbose=0)
    run = tmp_path / "run"
    for name in ("best_weights.h5", "history.csv", "curves.png", "thermometer.png", "thresholds.png",
                 "summary.json", "recipe.yaml", "checkpoints/last.json"):
        assert (run / name).exists(), name
    assert _history(run) == [1, 2, 3, 4]
    assert summary["epochs"] == 4
    # Dark vs bright is easy for a thermometer: the network must beat chance clearly.
    assert summary["best_val_accuracy"] >= 0.75, summary
    assert len(json.loads((run / "thresholds.json").read_text())) == 4


def test_resume_after_kill_continues_without_gaps(tmp_path, image_folder):
    run = tmp_path / "run"
    recipe = tiny_recipe(image_folder, epochs=3)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, out_dir=run, verbose=0, callbacks=[StopAfter(2)])
    assert json.loads((run / "checkpoints/last.json").read_text())["epoch"] == 2
    assert _history(run) == [1, 2]
    assert json.loads((run / "summary.json").read_text())["sessions"] == 1  # the killed session counts
    with pytest.raises(FileExistsError, match="--resume"):
        train(recipe, out_dir=run, verbose=0)
    summary = train(recipe, out_dir=run, verbose=0, resume=True)
    assert _history(run) == [1, 2, 3]
    assert summary["epochs"] == 3 and summary["sessions"] == 2
    # The optimizer state came back too: its step counter covers all three epochs.
    assert checkpoint_optimizer_steps(run, 3) == [3 * (72 // 16)] * 2


def test_resume_with_more_epochs_replans_the_rate_and_records_it(tmp_path, image_folder):
    from glt_keras.zoo_cli import training_commands

    run = tmp_path / "run"
    summary = train(tiny_recipe(image_folder, epochs=2), out_dir=run, verbose=0)
    assert summary["schedule"] == [{"first_epoch": 1, "planned_epochs": 2}]
    summary = train(tiny_recipe(image_folder, epochs=4), out_dir=run, verbose=0, resume=True)
    assert _history(run) == [1, 2, 3, 4] and summary["sessions"] == 2
    assert summary["schedule"] == [{"first_epoch": 1, "planned_epochs": 2}, {"first_epoch": 3, "planned_epochs": 4}]
    with open(run / "history.csv") as f:
        lr = [float(r["lr_0"]) for r in csv.DictReader(f)]
    # The 2-epoch cosine had decayed to its floor; re-planned over 4 epochs the rate rises again.
    assert lr[2] > 2 * lr[1] and lr[3] < lr[2]
    text = training_commands({"command": "glt-keras train tiny_test", "schedule": summary["schedule"]})
    assert "`glt-keras train tiny_test --epochs 2`" in text
    assert "`glt-keras train tiny_test --resume --epochs 4` (from epoch 3" in text
    assert training_commands({"command": "glt-keras train x", "schedule": summary["schedule"][:1]}) == \
        "`glt-keras train x`"


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, image_folder, capsys):
    run = tmp_path / "run"
    recipe = tiny_recipe(image_folder, epochs=3)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, out_dir=run, verbose=0, callbacks=[StopAfter(2)])
    # A partial write (the temp folder of an interrupted save) is never the pointer's target.
    assert json.loads((run / "checkpoints/last.json").read_text())["path"] == "epoch_2"
    data_file = next((run / "checkpoints/epoch_2").glob("ckpt.data-*"))
    data_file.write_bytes(data_file.read_bytes()[:100])  # truncated
    probe = resume_probe()
    summary = train(recipe, out_dir=run, verbose=0, resume=True, callbacks=[probe])
    err = capsys.readouterr().err
    assert "epoch_2 is damaged or corrupt" in err and "resuming from the intact epoch_1 (epoch 1)" in err
    assert _history(run) == [1, 2, 3] and summary["epochs"] == 3
    # It went on from epoch 1's optimizer state: two epochs' steps by the end of epoch 2.
    assert probe.first_epoch == 2 and probe.optimizer_steps == [2 * (72 // 16)] * 2


def test_every_checkpoint_damaged_is_a_clear_error(tmp_path, image_folder):
    run = tmp_path / "run"
    recipe = tiny_recipe(image_folder, epochs=3)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, out_dir=run, verbose=0, callbacks=[StopAfter(2)])
    for data_file in (run / "checkpoints").glob("epoch_*/ckpt.data-*"):
        data_file.write_bytes(data_file.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"epoch_2.*corrupt.*every earlier one"):
        train(recipe, out_dir=run, verbose=0, resume=True)
    assert (run / "checkpoints/epoch_1/ckpt.index").exists()


def test_mirrored_strategy_on_two_logical_cpus(tmp_path, image_folder):
    script = textwrap.dedent(f"""
        import glt_keras, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import sys; sys.path.insert(0, {str(os.path.dirname(__file__))!r})
        from test_training import tiny_recipe
        from glt_keras.training.run import train
        import pathlib
        s = train(tiny_recipe(pathlib.Path({str(image_folder)!r}), epochs=1), out_dir={str(tmp_path / 'run')!r},
                  strategy="mirrored", verbose=0)
        print("REPLICAS", tf.distribute.MirroredStrategy().num_replicas_in_sync, "EPOCHS", s["epochs"])
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "REPLICAS 2 EPOCHS 1" in out.stdout


def test_unknown_strategy_is_a_clear_error():
    from glt_keras.training.run import get_strategy

    with pytest.raises(ValueError, match="multiworker"):
        get_strategy("tpu")


def test_kd_with_a_real_valued_twin_teacher(tmp_path, image_folder):
    """kd: {teacher: twin} trains the real-valued twin first (cached beside the run), then
    distils it into the binary student."""
    recipe = tiny_recipe(image_folder, epochs=1).with_changes(kd={"teacher": "twin", "teacher_epochs": 1})
    summary = train(recipe, out_dir=tmp_path / "student", verbose=0)
    teacher_dir = tmp_path / "tiny_test_teacher"
    assert (teacher_dir / "best_weights.h5").exists()
    assert _history(teacher_dir) == [1] and summary["epochs"] == 1
    assert (tmp_path / "student" / "best_weights.h5").exists()


class FirstThresholds(tf.keras.callbacks.Callback):
    """Records the thermometer's thresholds before the first step."""

    def on_train_begin(self, logs=None):
        from glt_keras.layers.encoding import LearnedThermometer

        layer = next(l for l in self.model.layers if isinstance(l, LearnedThermometer))
        self.thresholds = layer.thresholds()


def test_quantile_init_also_on_a_fresh_run_started_with_resume(tmp_path, image_folder):
    """--resume in an empty folder starts the run: it must start it like a plain fresh run,
    thresholds at the data quantiles (not left at the uniform initialisation)."""
    recipe = tiny_recipe(image_folder, epochs=1)
    plain, resumed = FirstThresholds(), FirstThresholds()
    train(recipe, out_dir=tmp_path / "plain", verbose=0, callbacks=[plain])
    train(recipe, out_dir=tmp_path / "resumed", verbose=0, resume=True, callbacks=[resumed])
    uniform = tiny_recipe(image_folder, epochs=1, threshold_init="uniform")
    fixed = FirstThresholds()
    train(uniform, out_dir=tmp_path / "uniform", verbose=0, callbacks=[fixed])
    np.testing.assert_allclose(resumed.thresholds, plain.thresholds)
    assert not np.allclose(plain.thresholds, fixed.thresholds)


def test_plots_are_drawn_after_the_first_epoch_then_at_most_once_a_minute_and_at_the_end(
        monkeypatch, tmp_path, image_folder):
    import glt_keras.training.history as history

    drawn = []
    monkeypatch.setattr(history, "plot_run", lambda run_dir, rows, *args: drawn.append(len(rows)))
    train(tiny_recipe(image_folder, epochs=3), out_dir=tmp_path / "run", verbose=0)
    assert drawn == [1, 3]
