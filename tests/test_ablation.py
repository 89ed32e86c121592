"""benchmarks/ablation_encoding.py: one network, one change of input encoding per row."""
import json

import pytest

from glt_keras.recipe import load_recipe
from conftest import load_benchmark


@pytest.fixture
def ablation():
    return load_benchmark("ablation_encoding")


def test_ablation_trains_each_encoding_then_gathers_them_without_retraining(ablation, tmp_path, image_folder):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "name: toy\ninput_shape: [16, 16, 3]\nclasses: [bright, dark]\nmodel: {topology: tiny, levels: 8}\n"  # 8 planes each: levels = bits
        f"data: {{train: {{folder: {image_folder}}}, holdout: 0.25, extra_eval: [{{folder: {image_folder}}}]}}\n"
        "training: {batch_size: 16, binary_lr: 0.01, real_lr: 0.01}\n")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- ablation-toy:start -->\nold\n<!-- ablation-toy:end -->\nrest\n")
    out = tmp_path / "out"
    for variants in (["binary_planes"], ["fixed"]):  # two processes, one folder
        assert ablation.main([str(recipe), "--epochs", "1", "--variants", *variants, "--out", str(out)]) == 0
    seconds = {v: json.loads((out / f"toy_{v}" / "summary.json").read_text())["train_seconds"]
               for v in ("binary_planes", "fixed")}

    assert ablation.main([str(recipe), "--epochs", "1", "--variants", "binary_planes", "fixed",
                          "--out", str(out), "--readme", str(readme)]) == 0
    rows = json.loads((out / "toy_ablation.json").read_text())["rows"]
    assert [(r["variant"], r["encoding"]) for r in rows] == [("binary_planes", "binary_planes"), ("fixed", "fixed")]
    for r in rows:
        assert r["train_seconds"] == seconds[r["variant"]]  # gathered, not trained again
        assert 0.0 <= r["val_accuracy"] <= 1.0 and 0.0 <= r[f"{image_folder.name}_mean_per_class_accuracy"] <= 1.0
        assert r["binary_weight_bytes"] == rows[0]["binary_weight_bytes"]  # same network and budget
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("rest\n")
    assert "| binary_planes | 0 | binary_planes | False | 1 |" in text and "--readme" in text

    # Another seed is another run, beside the recipe's seed (0 by default).
    readme.write_text(text + "<!-- ablation-toy-seeds-0-1:start -->\n<!-- ablation-toy-seeds-0-1:end -->\n")
    assert ablation.main([str(recipe), "--epochs", "1", "--variants", "fixed", "--seeds", "0", "1",
                          "--out", str(out), "--readme", str(readme)]) == 0
    assert len(json.loads((out / "toy_ablation.json").read_text())["rows"]) == 2  # its own table, beside
    rows = json.loads((out / "toy_ablation_seeds_0_1.json").read_text())["rows"]
    seeds_table = readme.read_text().split("<!-- ablation-toy-seeds-0-1:start -->")[1]
    assert "| fixed | 1 | fixed |" in seeds_table and "binary_planes" not in seeds_table
    assert [(r["variant"], r["seed"]) for r in rows] == [("fixed", 0), ("fixed", 1)]
    assert rows[0]["train_seconds"] == seconds["fixed"] and (out / "toy_fixed_seed1" / "best_weights.h5").exists()
    assert load_recipe(out / "toy_fixed_seed1" / "recipe.yaml").training["seed"] == 1


def test_teacher_variants_change_only_the_teaching(ablation):
    base = load_recipe("vww_binary")
    none = base.with_changes(**ablation.VARIANTS["no_teacher"](base))
    assert not none.kd["teachers"] and none.data["balance"] is True
    sources = none.data["train"]
    assert not any(s.get("labels") == "teacher" for s in sources)  # nothing is left unlabelled
    assert all(s["paste"]["label"] == "person" for s in sources if "paste" in s)
    teacher_only = [s for s in base.data["train"] if s.get("labels") == "teacher"]
    assert teacher_only and len(sources) == len(base.data["train"]) - len(teacher_only)  # only those are dropped
    # Nothing left that only a teacher can label: no cached teacher views, no blends.
    assert not none.kd.get("view_cache") and not {"mixup", "mosaic"} & set(none.data["augment"])
    assert none.data["augment"]["crop"] == base.data["augment"]["crop"]
    one = base.with_changes(**ablation.VARIANTS["first_teacher"](base))
    assert one.kd["teachers"] == base.kd["teachers"][:1] and one.data == base.data
    assert base.with_changes(**ablation.VARIANTS["teachers"](base)).to_dict() == base.to_dict()
    assert one.model == none.model == base.model  # the same network


def test_a_second_ablation_of_a_recipe_gets_its_own_table(ablation, tmp_path, image_folder):
    """--table names the files and README markers, so a teacher ablation of vww_binary does not
    overwrite its encoding table; --precision reaches every variant's run."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "name: toy\ninput_shape: [16, 16, 3]\nclasses: [bright, dark]\nmodel: {topology: tiny, levels: 8}\n"
        f"data: {{train: {{folder: {image_folder}}}, holdout: 0.25}}\n"
        "training: {batch_size: 16, binary_lr: 0.01, real_lr: 0.01}\n")
    readme = tmp_path / "README.md"
    encoding_table = "<!-- ablation-toy:start -->\nencodings\n<!-- ablation-toy:end -->\n"
    readme.write_text(encoding_table + "<!-- ablation-toy_second:start -->\n<!-- ablation-toy_second:end -->\n")
    out = tmp_path / "out"
    assert ablation.main([str(recipe), "--epochs", "1", "--variants", "fixed", "--out", str(out),
                          "--precision", "float32", "--table", "toy_second", "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith(encoding_table)  # untouched
    assert "| fixed | 0 | fixed | False | 1 |" in text.split("ablation-toy_second:start")[1]
    assert (out / "toy_second.json").exists() and not (out / "toy_ablation.json").exists()
    assert load_recipe(out / "toy_fixed" / "recipe.yaml").training["precision"] == "float32"
