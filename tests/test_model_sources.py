"""One MODEL argument for ``eval``, ``convert`` and ``export-c``: a run folder of ``glt-keras train``
converts and exports with the run's own weights, no saved-model step in between."""
import numpy as np
import pytest
import yaml

from glt_keras import cli
from glt_keras.recipe import Recipe

from conftest import randomize_batchnorms


def _recipe():
    return Recipe(
        name="tiny_run", input_shape=(16, 16, 3), classes=["bright", "dark"],
        model={"topology": "tiny", "levels": 4},
        data={"train": {"folder": "unused"}, "holdout": 0.25},
        training={"epochs": 1, "batch_size": 16},
    )


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A run folder as ``glt-keras train`` leaves it: recipe.yaml + best_weights.h5, the weights
    far from a fresh network's (random BatchNorm affines), so loading them is observable."""
    import tensorflow as tf

    from glt_keras.models import save_weights

    run = tmp_path_factory.mktemp("runs") / "tiny_run"
    run.mkdir()
    recipe = _recipe()
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    tf.keras.utils.set_random_seed(1)
    model = randomize_batchnorms(recipe.build_model())
    save_weights(model, run / "best_weights.h5")
    return run, model


def _images(n=16):
    return np.random.default_rng(3).integers(0, 256, (n, 16, 16, 3)).astype(np.float32)


def test_convert_takes_a_run_folder_and_uses_its_best_weights(run_folder, tmp_path, capsys):
    from glt_keras.convert.verify import TFLiteModel

    run, trained = run_folder
    out = tmp_path / "run.tflite"
    assert cli.main(["convert", str(run), "-o", str(out), "--strict"]) == 0
    assert "verification passed" in capsys.readouterr().out
    x = _images()
    lite = TFLiteModel(out).predict(x)
    np.testing.assert_allclose(lite, trained.predict(x, verbose=0), atol=1e-5)
    fresh = _recipe().build_model().predict(x, verbose=0)  # the weights, not just the recipe, were used
    assert np.abs(lite - fresh).max() > 1e-3


def test_export_c_loads_a_run_folder_in_its_export_form(run_folder):
    from glt_keras.mcu.cli import load_model

    run, trained = run_folder
    model = load_model(str(run))
    x = _images()
    np.testing.assert_allclose(model.predict(x, verbose=0), trained.predict(x, verbose=0), atol=1e-5)
    assert all(not getattr(layer, "split_groups", False) for layer in model.layers)
    with pytest.raises(ValueError, match="applies to a zoo name"):
        load_model(str(run), weights="none")


@pytest.mark.parametrize("case", ["recipe_without_weights", "tflite", "run_without_weights", "missing_run",
                                  "plain_folder"])
def test_convert_errors_are_one_clear_line(case, run_folder, tmp_path, capsys):
    run, _ = run_folder
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "recipe.yaml").write_text((run / "recipe.yaml").read_text())
    lite = tmp_path / "m.tflite"
    lite.write_bytes(b"TFL3")
    model, expected = {
        "recipe_without_weights": (run / "recipe.yaml", "pass --weights FILE"),
        "tflite": (lite, "already a .tflite"),
        "run_without_weights": (empty, "has no best_weights.h5 yet"),
        "missing_run": (tmp_path / "runs" / "gone", "No such model file, run folder or recipe"),
        "plain_folder": (tmp_path, "folder without recipe.yaml"),
    }[case]
    assert cli.main(["convert", str(model), "-o", str(tmp_path / "out.tflite")]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out.tflite").exists()
