"""``glt-keras eval`` on a folder of images (one sub-folder per class) and on model files."""
import json

import numpy as np
import pytest
from PIL import Image

from glt_keras import cli
from glt_keras.convert import to_tflite
from glt_keras.models import glt_net

from conftest import randomize_batchnorms


@pytest.fixture(scope="module")
def model_files(tmp_path_factory, image_folder):
    import tensorflow as tf

    out = tmp_path_factory.mktemp("eval_models")
    tf.keras.utils.set_random_seed(0)
    model = randomize_batchnorms(glt_net(input_shape=(16, 16, 3), num_classes=2, topology="tiny", levels=4))
    model.save(out / "tiny.h5")
    to_tflite(model, out / "tiny.tflite")
    return out / "tiny.h5", out / "tiny.tflite"


def run_eval(tmp_path, *argv):
    report = tmp_path / "eval.json"
    assert cli.main(["eval", *map(str, argv), "--json", str(report)]) == 0
    return json.loads(report.read_text())


def test_eval_keras_and_tflite_files_on_a_folder_agree(model_files, image_folder, tmp_path, capsys):
    h5, tflite = model_files
    keras = run_eval(tmp_path, h5, "--data", image_folder)
    lite = run_eval(tmp_path, tflite, "--data", image_folder)
    assert keras["images"] == lite["images"] == 96
    assert keras["class_names"] == lite["class_names"] == ["bright", "dark"]  # the sorted folders
    assert keras["confusion"] == lite["confusion"] and keras["accuracy"] == lite["accuracy"]
    assert abs(keras["loss"] - lite["loss"]) < 1e-3
    assert "accuracy" in capsys.readouterr().out


def test_eval_zoo_model_on_a_folder_follows_the_model_class_order(tmp_path):
    from glt_keras import zoo

    classes = zoo.get_recipe("cifar10_binary").classes
    rng = np.random.default_rng(0)
    for name in reversed(classes):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (40, 40, 3)).astype(np.uint8)).save(tmp_path / "imgs" / name / "a.png")
    result = run_eval(tmp_path, "cifar10_binary", "--data", tmp_path / "imgs")
    assert result["images"] == 10 and result["class_names"] == list(classes)
    assert np.array(result["confusion"]).sum(1).tolist() == [1] * 10


@pytest.mark.parametrize("case", ["no_data", "missing_folder", "wrong_classes", "weights_with_file",
                                  "missing_file", "file_as_data"])
def test_eval_errors_are_one_clear_line(case, model_files, image_folder, tmp_path, capsys):
    h5, tflite = model_files
    argv, expected = {
        "no_data": ([tflite], "model file without a recipe: give the images with --data FOLDER"),
        "missing_folder": ([h5, "--data", tmp_path / "nope"], "no such folder"),
        "wrong_classes": (["cifar10_binary", "--data", image_folder],
                          "are not the model's classes"),
        "weights_with_file": ([h5, "--weights", h5, "--data", image_folder], "--weights applies to"),
        "missing_file": ([tmp_path / "gone.tflite", "--data", image_folder], "No such"),
        "file_as_data": ([h5, "--data", h5], "a file; expected a folder"),
    }[case]
    assert cli.main(["eval", *map(str, argv)]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "Traceback" not in err and len(err.splitlines()) == 1, err
