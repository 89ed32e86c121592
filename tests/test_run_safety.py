"""A training run is never lost: resume, damaged checkpoints and weights, Ctrl-C (issue 15)."""
import pytest
import tensorflow as tf
import yaml

from glt_keras import cli
from glt_keras.recipe import Recipe

from conftest import checkpoint_optimizer_steps, resume_probe


def _tiny_recipe(folder, **training):
    return Recipe(
        name="tiny_errors", input_shape=(16, 16, 3), classes=["bright", "dark"],
        model={"topology": "tiny", "levels": 4},
        data={"train": {"folder": str(folder)}, "holdout": 0.25},
        training={"epochs": 2, "batch_size": 16, **training},
    )


def _snapshot(run):
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and "tensorboard" not in p.parts}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, image_folder):
    from glt_keras.training.run import train

    run = tmp_path_factory.mktemp("finished") / "run"
    train(_tiny_recipe(image_folder), out_dir=run, verbose=0)
    return run


def _assert_continued_from(probe, run, *, epoch):
    """The resumed session trained epoch ``epoch + 1`` first, on the optimizer state of the
    checkpoint of ``epoch``: its step counters went on from there (a restart, or a fresh
    optimizer, would count only one epoch's steps)."""
    saved = checkpoint_optimizer_steps(run, epoch)
    assert saved and all(s > 0 and s % epoch == 0 for s in saved)
    assert probe.first_epoch == epoch + 1
    assert sorted(probe.optimizer_steps) == [s + s // epoch for s in saved]


def _copy(run, tmp_path):
    import shutil

    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def test_resume_without_last_json_refuses_and_touches_nothing(finished_run, tmp_path, image_folder):
    from glt_keras.training.run import CheckpointError, train

    run = _copy(finished_run, tmp_path)
    import shutil

    shutil.rmtree(run / "checkpoints")
    before = _snapshot(run)
    with pytest.raises(CheckpointError, match=r"cannot resume .*last\.json is missing.*nothing was changed") as info:
        train(_tiny_recipe(image_folder, epochs=3), out_dir=run, verbose=0, resume=True)
    assert "\n" not in str(info.value)
    assert _snapshot(run) == before


def test_resume_with_only_last_json_lost_uses_the_newest_checkpoint(finished_run, tmp_path, image_folder, capsys):
    from glt_keras.training.run import train

    run = _copy(finished_run, tmp_path)
    (run / "checkpoints/last.json").unlink()
    probe = resume_probe()
    summary = train(_tiny_recipe(image_folder, epochs=3), out_dir=run, verbose=0, resume=True, callbacks=[probe])
    assert "resuming from the intact epoch_2 (epoch 2)" in capsys.readouterr().err
    assert summary["epochs"] == 3
    _assert_continued_from(probe, run, epoch=2)


def test_a_fresh_run_never_starts_over_a_previous_one(finished_run, tmp_path, image_folder):
    from glt_keras.training.run import train

    run = _copy(finished_run, tmp_path)
    (run / "checkpoints/last.json").unlink()  # even without the pointer, history is there
    before = _snapshot(run)
    with pytest.raises(FileExistsError, match=r"already holds a run \(.*history\.csv.*--resume.*--overwrite"):
        train(_tiny_recipe(image_folder), out_dir=run, verbose=0)
    assert _snapshot(run) == before
    summary = train(_tiny_recipe(image_folder, epochs=1), out_dir=run, verbose=0, overwrite=True)
    assert summary["epochs"] == 1 and summary["sessions"] == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch_1", "last.json"]


def test_cli_train_over_a_run_is_one_line(finished_run, tmp_path, image_folder, capsys):
    run = _copy(finished_run, tmp_path)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_tiny_recipe(image_folder).to_dict()))
    assert cli.main(["train", str(path), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds a run" in err
    assert cli.main(["train", str(path), "--out", str(run), "--resume", "--overwrite"]) == 2
    assert "pass one of them" in capsys.readouterr().err
    import shutil

    shutil.rmtree(run / "checkpoints")
    assert cli.main(["train", str(path), "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot resume" in err
    (tmp_path / "a_file").write_text("in the way")
    assert cli.main(["train", str(path), "--out", str(tmp_path / "a_file")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file" in err


class _Truncate(tf.keras.callbacks.Callback):
    """Damages best_weights.h5 after it was written (a full disk, a crash of the file system)."""

    def __init__(self, path):
        super().__init__()
        self.path = path

    def on_epoch_end(self, epoch, logs=None):
        if self.path.exists():
            self.path.write_bytes(self.path.read_bytes()[:200])


def test_a_truncated_best_weights_file_is_never_left_in_place(tmp_path, image_folder):
    from glt_keras.training.run import CheckpointError, train

    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match=r"best_weights\.h5 is truncated or corrupt.*Moved to best_weights"):
        train(_tiny_recipe(image_folder, epochs=1), out_dir=run, verbose=0,
              callbacks=[_Truncate(run / "best_weights.h5")])
    assert not (run / "best_weights.h5").exists()
    assert list(run.glob("best_weights.damaged-*.h5"))  # set aside, never deleted


def test_resume_replaces_a_damaged_best_weights_file(finished_run, tmp_path, image_folder, capsys):
    from glt_keras.models import load_weights
    from glt_keras.training.run import train

    run = _copy(finished_run, tmp_path)
    best = run / "best_weights.h5"
    best.write_bytes(best.read_bytes()[:200])
    train(_tiny_recipe(image_folder, epochs=3), out_dir=run, verbose=0, resume=True)
    assert "the next epoch writes new best weights" in capsys.readouterr().err
    load_weights(_tiny_recipe(image_folder).build_model(), best)  # readable again


def test_save_weights_verifies_before_replacing(tmp_path, monkeypatch):
    from glt_keras import models

    model = models.glt_net(input_shape=(16, 16, 3), num_classes=2, topology="tiny")
    path = tmp_path / "best_weights.h5"
    models.save_weights(model, path)
    good = path.read_bytes()

    def short_write(self, filepath, *a, **k):
        with open(filepath, "wb") as f:
            f.write(good[:300])

    monkeypatch.setattr(tf.keras.Model, "save_weights", short_write)
    with pytest.raises(OSError, match="could not be read back"):
        models.save_weights(model, path)
    assert path.read_bytes() == good and not list(tmp_path.glob("*.partial.h5"))


def test_ctrl_c_during_training_says_how_to_resume(tmp_path, image_folder, capsys, monkeypatch):
    from glt_keras.training import run as run_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "train", interrupted)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_tiny_recipe(image_folder).to_dict()))
    out = tmp_path / "run"
    assert cli.main(["train", str(path), "--out", str(out), "--epochs", "5"]) == 130
    err = capsys.readouterr().err
    assert f"Continue with: glt-keras train {path} --resume --out {out} --epochs 5" in err
    assert "Traceback" not in err


def test_a_corrupt_last_json_falls_back_and_says_so(finished_run, tmp_path, image_folder, capsys):
    from glt_keras.training.run import train

    run = _copy(finished_run, tmp_path)
    (run / "checkpoints/last.json").write_text("{not json")
    probe = resume_probe()
    summary = train(_tiny_recipe(image_folder, epochs=3), out_dir=run, verbose=0, resume=True, callbacks=[probe])
    assert "last.json is missing or unreadable); resuming from the intact epoch_2" in capsys.readouterr().err
    assert summary["epochs"] == 3
    _assert_continued_from(probe, run, epoch=2)


def test_finished_run_with_damaged_best_weights_does_not_report_success(finished_run, tmp_path, image_folder):
    from glt_keras.training.run import CheckpointError, train

    run = _copy(finished_run, tmp_path)
    best = run / "best_weights.h5"
    best.write_bytes(best.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        train(_tiny_recipe(image_folder), out_dir=run, verbose=0, resume=True)  # already trained
    assert not best.exists()


def test_permission_errors_are_one_line(tmp_path, image_folder, capsys, monkeypatch):
    from glt_keras.training import run as run_module

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "run"))

    monkeypatch.setattr(run_module, "train", denied)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_tiny_recipe(image_folder).to_dict()))
    assert cli.main(["train", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Permission denied" in err
