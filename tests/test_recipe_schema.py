"""Recipes are validated once, at load time: one-line errors naming the key (issues 15 and 20)."""
import glob
import os

import pytest
import yaml

from glt_keras import cli
from glt_keras.recipe import Recipe, RecipeError, load_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _recipe_file(tmp_path, change=None, text=None):
    data = yaml.safe_load(open(os.path.join(ROOT, "zoo/cifar10_binary/recipe.yaml")))
    if change:
        change(data)
    path = tmp_path / "r.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("change, message", [
    (lambda d: d["training"].update(epoch=1), r"training\.epoch is not a known key \(did you mean 'epochs'\?"),
    (lambda d: d["data"].update(holdoot=0.25), r"data\.holdoot is not a known key \(did you mean 'holdout'\?"),
    (lambda d: d["data"]["augment"].update(fllip=True), r"data\.augment\.fllip .*did you mean 'flip'"),
    (lambda d: d["data"]["train"].update(spilt="train"), r"data\.train\.spilt .*did you mean 'split'"),
    (lambda d: d.update(clases=d["classes"]), r"clases is not a known key \(did you mean 'classes'"),
    (lambda d: d["training"].update(epochs="ten"), r"training\.epochs must be an integer >= 1, got 'ten'"),
    (lambda d: d["training"].update(epochs=0), r"training\.epochs must be an integer >= 1, got 0"),
    (lambda d: d["training"].update(epochs=-2), r"training\.epochs must be an integer >= 1, got -2"),
    (lambda d: d["training"].update(binary_lr=0), r"training\.binary_lr must be a number > 0"),
    (lambda d: d["model"].update(topology="glt33"), r"model\.topology must be one of .*'glt32'.*got 'glt33'"),
    (lambda d: d["model"].update(encoding="thermo"), r"model\.encoding must be one of"),
    (lambda d: d["data"].update(holdout=1.5), r"data\.holdout must be a number > 0 and < 1"),
    (lambda d: d["data"]["train"].update(dataset="cifar100"), r"data\.train\.dataset must be one of .*'cifar10'"),
    (lambda d: d["data"]["train"].pop("split"), r"data\.train needs a split"),
    (lambda d: d["data"]["train"].update(label_map={"cat": "kitty", "*": None}),
     r"label_map\.cat: 'kitty' is not one of the recipe's classes"),
    (lambda d: d.update(input_shape=[32, 32]), r"input_shape must have 3 entries"),
    (lambda d: d.pop("classes"), r"needs classes"),
    (lambda d: d["kd"].update(teachers=[{"path": "t.h5", "output": "logit"}]),
     r"kd\.teachers\[0\]\.output must be one of 'probabilities', 'logits' \(did you mean 'logits'\?\)"),
    (lambda d: d.update(pruning={"start_epoch": 3, "end_epoch": 1}), r"pruning needs start_epoch <= end_epoch"),
])
def test_bad_recipe_is_a_one_line_error_naming_the_key(tmp_path, change, message):
    path = _recipe_file(tmp_path, change)
    with pytest.raises(RecipeError, match=message) as info:
        load_recipe(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_malformed_yaml_is_a_one_line_error(tmp_path):
    path = _recipe_file(tmp_path, text="name: x\nmodel: {topology: tiny\ninput_shape: [1, 2, 3]\n")
    with pytest.raises(RecipeError, match=r"not valid YAML at line 3, column \d+") as info:
        load_recipe(path)
    assert "\n" not in str(info.value)
    with pytest.raises(RecipeError, match="not a YAML mapping"):
        load_recipe(_recipe_file(tmp_path, text="- just\n- a list\n"))


def test_recipe_objects_are_validated_too():
    """Recipes built in code (tests, with_changes, the CLI's --epochs) pass the same checks."""
    base = Recipe(name="t", model={"topology": "tiny"}, input_shape=(16, 16, 3), classes=["a", "b"])
    with pytest.raises(RecipeError, match=r"training\.epochs must be an integer >= 1, got 0"):
        base.with_changes(training={"epochs": 0})
    with pytest.raises(RecipeError, match=r"training\.epoch is not a known key"):
        Recipe(name="t", model={"topology": "tiny"}, input_shape=(16, 16, 3), classes=["a", "b"],
               training={"epoch": 3})


def test_teacher_and_teacher_labelled_data_keys(tmp_path):
    """Teachers from files, teacher-labelled sources, cut-out pastes, balance on teacher labels."""
    def change(d):
        d["data"]["balance"] = "teacher"
        d["training"]["select_smoothing"] = 3
        d["kd"].update(alpha=0.3, teachers=[
            {"path": "teachers/a.h5", "input_range": [0, 1], "output": "probabilities",
             "classes": ["cat", "dog"], "weight": 2.0},
            {"path": "teachers/b.h5", "input_range": [-1, 1], "output": "logits"}])
        d["data"]["train"] = [
            {"dataset": "cifar10", "split": "train"},
            {"dataset": "imagenette", "split": "train", "labels": "teacher"},
            {"dataset": "pennfudan", "split": "train", "labels": "teacher"},
            {"dataset": "coco128", "split": "train", "labels": "teacher"},
            {"folder": "my_photos", "labels": "teacher"},
            {"paste": {"scenes": {"dataset": "imagenette", "split": "train"},
                       "persons": {"dataset": "pennfudan", "masks": True}, "n": 100, "label": "teacher"}},
            {"paste": {"scenes": {"dataset": "imagenette", "split": "train"}, "height_range": [0.15, 0.9],
                       "persons": [{"dataset": "pennfudan", "masks": True}, {"dataset": "coco128", "masks": True}],
                       "n": 100, "label": "teacher"}},
        ]
    recipe = load_recipe(_recipe_file(tmp_path, change))
    assert recipe.kd["alpha"] == 0.3 and len(recipe.kd["teachers"]) == 2 and recipe.data["balance"] == "teacher"
    with pytest.raises(RecipeError, match=r"data\.balance"):
        load_recipe(_recipe_file(tmp_path, lambda d: d["data"].update(balance="teachers")))
    with pytest.raises(RecipeError, match=r"height_range"):
        load_recipe(_recipe_file(tmp_path, lambda d: d["data"].update(train=[{"paste": {
            "scenes": {"dataset": "cifar10", "split": "train"}, "persons": {"dataset": "pennfudan", "masks": True},
            "n": 5, "height_range": [0.5]}}])))
    with pytest.raises(RecipeError, match=r"kd\.teachers\[0\]\.weigth is not a known key \(did you mean 'weight'"):
        load_recipe(_recipe_file(tmp_path, lambda d: d["kd"].update(teachers=[{"path": "a", "weigth": 1}])))


def test_every_recipe_in_the_project_loads():
    paths = glob.glob(os.path.join(ROOT, "zoo/*/recipe.yaml")) + glob.glob(os.path.join(ROOT, "runs/**/*.yaml"),
                                                                           recursive=True) + glob.glob(os.path.join(ROOT, "recipes/*.yaml"))
    assert len(paths) >= 6
    for path in paths:
        load_recipe(path)


def test_cli_states_a_bad_recipe_in_one_line(tmp_path, capsys):
    path = _recipe_file(tmp_path, lambda d: d["training"].update(epoch=1))
    assert cli.main(["train", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "training.epoch is not a known key" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, message", [
    (["train", "cifar10_binary", "--threads", "-3"], "--threads: must be >= 0, got -3"),
    (["train", "cifar10_binary", "--epochs", "0"], "--epochs: must be >= 1, got 0"),
    (["train", "cifar10_binary", "--batch-size", "x"], "--batch-size: invalid whole number 'x'"),
    (["eval", "cifar10_binary", "--threads", "-1"], "--threads: must be >= 0, got -1"),
])
def test_bad_numbers_on_the_command_line_are_argparse_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err
