"""The encoding study (benchmarks/encoding_study.py) and its pieces: sensor conditions, the
quantile thermometer, natural binary coding with fewer planes, resuming, the table."""
import json

import numpy as np
import pytest

from glt_keras.data.pixel_stats import pixel_histogram, quantile_thresholds
from glt_keras.data.sensor import SENSOR_CONDITIONS, apply_sensor, sensor_lut
from conftest import load_benchmark


@pytest.fixture(scope="module")
def study():
    return load_benchmark("encoding_study")


# ----------------------------------------------------------------------------- sensor
def test_sensor_conditions_map_uint8_to_uint8_as_documented():
    p = np.arange(256, dtype=np.uint8)
    assert (sensor_lut("normal") == p).all()
    under, over, flat = sensor_lut("under_exposed"), sensor_lut("over_exposed"), sensor_lut("low_contrast")
    for lut in (under, over, flat):
        assert lut.dtype == np.uint8 and lut.shape == (256,) and (np.diff(lut.astype(int)) >= 0).all()
    # The module docstring's formulas, rounded half up.
    assert (under == np.floor(p * 2 ** (-3 / 2.2) + 0.5)).all() and (under[[0, 128, 255]] == [0, 50, 99]).all()
    assert (over[:136] == np.floor(p[:136] * 2 ** (2 / 2.2) + 0.5)).all() and (over[136:] == 255).all()
    assert over[135] == 254
    assert (flat == np.floor(127.5 + (p - 127.5) / 4 + 0.5)).all() and (flat.min(), flat.max()) == (96, 159)

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 5, 4, 3), dtype=np.uint8)
    before = images.copy()
    for condition in SENSOR_CONDITIONS:
        out = apply_sensor(images, condition)
        assert out.dtype == np.uint8 and out.shape == images.shape
        assert (out == apply_sensor(images, condition)).all()  # deterministic
        assert (out == sensor_lut(condition)[images]).all()  # pixel by pixel, every channel alike
    assert (images == before).all()  # the input is left alone
    with pytest.raises(TypeError, match="uint8"):
        apply_sensor(images.astype(np.float32), "under_exposed")
    with pytest.raises(ValueError, match="Unknown sensor condition"):
        apply_sensor(images, "dark")


def test_recipe_sensor_condition_applies_to_every_split(image_folder, tmp_path):
    from glt_keras.recipe import load_recipe
    from glt_keras.training.splits import load_splits

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "name: toy\ninput_shape: [16, 16, 3]\nclasses: [bright, dark]\nmodel: {topology: tiny}\n"
        f"data: {{train: {{folder: {image_folder}}}, holdout: 0.25, test: {{folder: {image_folder}}}}}\n")
    plain = load_splits(load_recipe(recipe))
    dark = load_splits(load_recipe(recipe).with_changes(data={"sensor": "under_exposed"}))
    for a, b in ((plain.train, dark.train), (plain.val, dark.val), (plain.test, dark.test)):
        assert (apply_sensor(a[0], "under_exposed") == b[0]).all() and (a[1] == b[1]).all()


# ----------------------------------------------------------------------------- encodings
def test_quantile_thermometer_sits_at_the_data_quantiles_and_encodes_with_them():
    import tensorflow as tf

    from glt_keras.layers import FixedThermometer

    rng = np.random.default_rng(1)
    x = np.stack([rng.integers(0, 256, (40, 8, 8)),  # a different distribution per channel
                  np.clip(rng.normal(60, 25, (40, 8, 8)), 0, 255),
                  rng.integers(100, 161, (40, 8, 8))], -1).astype(np.uint8)
    levels = 4
    t = quantile_thresholds(x, levels)
    expected = np.stack([np.quantile(x[..., c], np.arange(1, levels + 1) / (levels + 1)) for c in range(3)])
    assert np.allclose(t, expected, rtol=0, atol=1e-9)
    assert np.allclose(quantile_thresholds(histogram=pixel_histogram(x), levels=levels), t)

    layer = FixedThermometer(levels=levels, initial_thresholds=t)
    planes = layer(tf.constant(x, tf.float32)).numpy()
    assert np.allclose(layer.thresholds(), t, atol=1e-3)
    # Integer pixel p: plane k of channel c is +1 iff p > floor(t[c, k] + 2**-10) (effective_thresholds).
    want = np.where(x[..., :, None] > np.floor(t + 2.0 ** -10)[None, None, None], 1.0, -1.0).reshape(planes.shape)
    assert (planes == want).all()
    # Each level holds about an equal share of each channel's pixels.
    for c in range(3):
        shares = np.bincount((planes[..., c * levels:(c + 1) * levels] > 0).sum(-1).ravel(),
                             minlength=levels + 1) / x[..., c].size
        assert np.abs(shares - 1 / (levels + 1)).max() < 0.08

    # Ties (saturated pixels) are spread a whole pixel apart, so every plane differs.
    flat = np.full((10, 4, 4, 1), 255, np.uint8)
    flat[:2] = 3
    tied = quantile_thresholds(flat, 8)[0]
    assert (np.diff(np.floor(tied)) >= 1).all() and 0.5 <= tied.min() and tied.max() <= 254.5


def test_binary_planes_with_fewer_levels_keep_the_top_bits():
    import tensorflow as tf

    from glt_keras.models import glt_net

    model = glt_net(input_shape=(8, 8, 3), num_classes=2, topology="tiny", encoding="binary_planes", levels=2)
    encoder = model.get_layer("encoding")
    assert type(encoder).__name__ == "TopBitPlanes" and encoder.output.shape[-1] == 6
    x = tf.constant([[[[192.0, 100.0, 63.0]]]])
    assert encoder(x).numpy().ravel().tolist() == [1, 1, -1, 1, -1, -1]
    every_bit = glt_net(input_shape=(8, 8, 3), num_classes=2, topology="tiny", encoding="binary_planes", levels=8)
    assert type(every_bit.get_layer("encoding")).__name__ == "BinaryPlanes"


# ----------------------------------------------------------------------------- study
def _row(study, encoding, seed, acc, level=8, condition="normal", history=(0.5, 0.5, 0.5)):
    cell = study.Cell("toy", condition, encoding, level, seed, 3)
    return {"recipe": "toy", "condition": condition, "encoding": encoding, "levels": level, "seed": seed,
            "epochs": 3, "epoch_images": None, "train_images": 72, "schedule": cell.schedule, "key": cell.key,
            "test_accuracy": acc, "val_history": list(history), "thresholds": None}


def test_table_states_mean_and_sample_spread_over_seeds(study, tmp_path):
    rows = [_row(study, "fixed", s, a, history=(0.4, 0.6, 0.7)) for s, a in enumerate([0.5, 0.6, 0.7])]
    rows += [_row(study, "glt", 0, 0.8, history=(0.5, 0.5, 0.5))]
    rows += [_row(study, "glt", s, a, level=2, history=(0.6, 0.6, 0.6)) for s, a in enumerate([0.25, 0.75])]
    rows += [_row(study, "fixed", 0, 0.45, level=2, history=(0.5, 0.5, 0.5))]
    path = tmp_path / "study.json"
    path.write_text(json.dumps({"cells": {r["key"]: r for r in rows}, "histograms": {}}))

    mean, sd = study.mean_spread([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6) and sd == pytest.approx(0.1)
    assert np.isnan(study.mean_spread([0.8])[1])
    table = study.build_table(study.load_results(path))
    lines = [line for line in table.splitlines() if line.startswith("| toy")]
    assert lines[0] == "| toy | normal | 8 | 60.00 ± 10.00 (3) | **80.00** (1) | no |"  # ranks change
    assert lines[1] == "| toy | normal | 2 | 45.00 (1) | **50.00 ± 35.36** (2) | yes |"
    assert "| data | condition | levels | fixed | glt | stable |" in table


def test_ranking_check_tells_ties_within_noise_from_real_swaps(study):
    def rows(encoding, *histories):
        return [_row(study, encoding, seed, h[-1], history=h) for seed, h in enumerate(histories)]

    steady = rows("fixed", (0.50, 0.60, 0.70), (0.52, 0.62, 0.72), (0.48, 0.58, 0.68))
    # 0.1 below fixed at every epoch, seeds 0.02 apart: always behind.
    behind = rows("glt", (0.40, 0.50, 0.60), (0.42, 0.52, 0.62), (0.38, 0.48, 0.58))
    assert study.ranking_stable(steady + behind, ["fixed", "glt"]) == "yes"
    # Ahead, behind, then 0.01 ahead with seeds 0.05 apart: a swap within noise.
    noisy = rows("glt", (0.55, 0.55, 0.76), (0.50, 0.55, 0.66), (0.45, 0.57, 0.71))
    assert study.ranking_stable(steady + noisy, ["fixed", "glt"]) == "ties"
    # Behind at the first of the last epochs, then 0.1 ahead with a small spread: a real swap.
    overtakes = rows("glt", (0.45, 0.75, 0.80), (0.46, 0.76, 0.81), (0.44, 0.74, 0.79))
    assert study.ranking_stable(steady + overtakes, ["fixed", "glt"]) == "no"
    # One seed: its noise is unknown, so a swap counts.
    assert study.ranking_stable(steady + noisy[:1], ["fixed", "glt"]) == "no"
    assert study.ranking_stable(steady + rows("glt", (0.5, 0.6)), ["fixed", "glt"]) is None


def test_report_puts_the_table_in_the_readme_between_its_markers_only(study, tmp_path):
    rows = [_row(study, "fixed", s, a) for s, a in enumerate([0.5, 0.6, 0.7])]
    results = tmp_path / "study.json"
    results.write_text(json.dumps({"cells": {r["key"]: r for r in rows}, "histograms": {}}))
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nbefore\n<!-- encoding-study:start -->\nold table\n<!-- encoding-study:end -->\nafter\n")
    argv = ["--report", "--results", str(results), "--readme", str(readme)]
    assert study.main(argv) == 0
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# Title\n\nbefore\n") and text.endswith("-->\nafter\n")
    assert "| toy | normal | 8 | 60.00 ± 10.00 (3) |" in text
    assert "_Generated by `python benchmarks/encoding_study.py --report --results" in text
    assert (tmp_path / "study.md").exists()

    unmarked = tmp_path / "OTHER.md"
    unmarked.write_text("no markers\n")
    with pytest.raises(SystemExit):
        study.main(["--report", "--results", str(results), "--readme", str(unmarked)])
    assert unmarked.read_text() == "no markers\n"  # left as it was
    with pytest.raises(SystemExit):  # --readme without --report
        study.main(["--results", str(results), "--readme", str(readme), "--dry-run"])


def test_study_records_each_cell_at_once_and_resumes_without_redoing_it(study, image_folder, tmp_path, monkeypatch):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "name: toy\ninput_shape: [16, 16, 3]\nclasses: [bright, dark]\nmodel: {topology: tiny, levels: 8}\n"
        f"data: {{train: {{folder: {image_folder}}}, holdout: 0.25, test: {{folder: {image_folder}}},"
        " augment: {flip: true, brightness: 10.0}}\n"
        "training: {batch_size: 16, binary_lr: 0.01, real_lr: 0.01}\n")
    results = tmp_path / "study.json"
    argv = [str(recipe), "--epochs", "1", "--steps-per-epoch", "1", "--conditions", "under_exposed",
            "--encodings", "fixed_quantiles", "glt", "--levels", "2", "--seeds", "0",
            "--results", str(results), "--out", str(tmp_path / "runs"), "--verbose", "0"]
    trained = []
    real_train = study.train_cell

    def killed_on_the_second_cell(recipe, run_dir, **kw):
        trained.append(recipe.name)
        if len(trained) == 2:
            raise KeyboardInterrupt  # the session stops mid-study
        return real_train(recipe, run_dir, **kw)

    monkeypatch.setattr(study, "train_cell", killed_on_the_second_cell)
    with pytest.raises(KeyboardInterrupt):
        study.main(argv)
    first = json.loads(results.read_text())["cells"]
    assert list(first) == ["toy/under_exposed/fixed_quantiles/L2/seed0/e1_steps1"]

    trained.clear()
    monkeypatch.setattr(study, "train_cell", lambda *a, **kw: trained.append(a[0].name) or real_train(*a, **kw))
    assert study.main(argv) == 0
    assert trained == ["toy_under_exposed_glt_L2_seed0_e1_steps1"]  # only the unfinished cell
    done = json.loads(results.read_text())
    assert done["cells"]["toy/under_exposed/fixed_quantiles/L2/seed0/e1_steps1"] == first[
        "toy/under_exposed/fixed_quantiles/L2/seed0/e1_steps1"]  # kept as recorded
    assert study.main(argv) == 0 and trained == ["toy_under_exposed_glt_L2_seed0_e1_steps1"]  # nothing left

    row = done["cells"]["toy/under_exposed/fixed_quantiles/L2/seed0/e1_steps1"]
    from glt_keras.recipe import load_recipe
    from glt_keras.training.splits import load_splits

    # The quantile cell's thresholds: the quantiles of its own training images, after the condition.
    run = load_recipe(tmp_path / "runs" / "toy_under_exposed_fixed_quantiles_L2_seed0_e1_steps1" / "recipe.yaml")
    assert run.data["sensor"] == "under_exposed" and "brightness" not in run.data["augment"]
    want = quantile_thresholds(load_splits(run).train[0], 2)
    assert np.allclose(run.model["encoding_kwargs"]["initial_thresholds"], want)
    assert np.allclose(row["thresholds"], np.floor(want + 2.0 ** -10) + 0.5)  # fixed: never moved
    assert np.asarray(done["histograms"]["toy/under_exposed"]).max(initial=0) > 0
    assert not (tmp_path / "runs" / "toy_under_exposed_glt_L2_seed0_e1_steps1" / "checkpoints").exists()
    assert "| toy | under_exposed | 2 |" in results.with_suffix(".md").read_text()
    assert results.with_suffix(".png").stat().st_size > 10_000
