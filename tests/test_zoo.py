"""The zoo registry: list, load with checksum checks, cards, and the command line."""
import json

import numpy as np
import pytest

from glt_keras import cli, zoo
from glt_keras.recipe import load_recipe
from conftest import load_benchmark


@pytest.fixture
def fake_zoo(tmp_path, monkeypatch):
    """A zoo folder with one published model (random weights) and one unpublished."""
    root = tmp_path / "zoo"
    for name, classes in (("toy_binary", ["a", "b", "c"]), ("toy_untrained", ["x", "y"])):
        (root / name).mkdir(parents=True)
        (root / name / "recipe.yaml").write_text(
            f"name: {name}\ntask: toy\ninput_shape: [16, 16, 3]\nclasses: {classes}\n"
            "model: {topology: tiny, levels: 4}\n"
        )
    monkeypatch.setattr(zoo, "ZOO_DIR", root)
    monkeypatch.setattr(zoo, "REGISTRY_PATH", root / "registry.json")
    import glt_keras.recipe as recipe_module

    monkeypatch.setattr(recipe_module, "ZOO_DIR", root)
    model = zoo.load("toy_binary", weights=None)
    rng = np.random.default_rng(0)
    model.set_weights([w + rng.normal(0, 0.1, w.shape).astype(w.dtype) for w in model.get_weights()])
    weights = root / "toy_binary" / "toy_binary_weights.h5"
    model.save_weights(str(weights))
    (root / "registry.json").write_text(json.dumps({
        "toy_binary": {"weights": "toy_binary/toy_binary_weights.h5", "sha256": zoo.sha256_of(weights),
                       "metrics": {}, "task": "toy"}
    }))
    return root, model


def test_list_models(fake_zoo):
    assert zoo.list_models() == ["toy_binary", "toy_untrained"]
    assert zoo.list_models(pretrained=True) == ["toy_binary"]


def test_load_pretrained_gives_the_published_weights(fake_zoo):
    _, original = fake_zoo
    model = zoo.load("toy_binary")
    x = np.random.default_rng(1).integers(0, 256, (4, 16, 16, 3)).astype("uint8")
    np.testing.assert_array_equal(model.predict(x, verbose=0), original.predict(x, verbose=0))
    assert model.output_shape == (None, 3)
    np.testing.assert_allclose(model.predict(x, verbose=0).sum(-1), 1.0, rtol=1e-5)  # softmax scores


def test_checksum_mismatch_names_the_file(fake_zoo):
    root, _ = fake_zoo
    path = root / "toy_binary" / "toy_binary_weights.h5"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(zoo.WeightsError, match=r"toy_binary_weights.h5.*SHA-256"):
        zoo.load("toy_binary")


def test_truncated_weight_file_is_a_clear_error(fake_zoo, tmp_path):
    root, _ = fake_zoo
    truncated = tmp_path / "cut_weights.h5"
    truncated.write_bytes((root / "toy_binary" / "toy_binary_weights.h5").read_bytes()[:500])
    with pytest.raises(zoo.WeightsError, match=r"cut_weights.h5.*truncated or corrupt"):
        zoo.load("toy_binary", weights=truncated)


def test_untrained_model_names_the_training_command(fake_zoo):
    with pytest.raises(zoo.WeightsError, match="glt-keras train toy_untrained && glt-keras zoo publish runs/toy_untrained"):
        zoo.load("toy_untrained")
    # A pruning recipe publishes the shrunk network its run writes.
    recipe = fake_zoo[0] / "toy_untrained" / "recipe.yaml"
    recipe.write_text(recipe.read_text() + "pruning: {target_ratio: 0.5}\n")
    with pytest.raises(zoo.WeightsError, match=r"cp runs/toy_untrained/shrunk_recipe.yaml zoo/toy_untrained/recipe.yaml"
                                               r" && glt-keras zoo publish runs/toy_untrained/shrunk"):
        zoo.load("toy_untrained")
    assert zoo.load("toy_untrained", weights=None).output_shape == (None, 2)


def test_unknown_model(fake_zoo):
    with pytest.raises(ValueError, match="Unknown zoo model 'nope'.*toy_binary"):
        zoo.load("nope")


def test_new_head_and_no_top_keep_the_backbone(fake_zoo):
    _, original = fake_zoo
    five = zoo.load("toy_binary", num_classes=5)
    assert five.output_shape == (None, 5)
    np.testing.assert_array_equal(five.get_layer("block2_conv").get_weights()[0],
                                  original.get_layer("block2_conv").get_weights()[0])
    features = zoo.load("toy_binary", include_top=False, input_shape=(32, 32, 3))
    assert features.output_shape == (None, 8, 8, 64)


def test_card_without_weights_says_how_to_train(fake_zoo):
    card = zoo.card("toy_untrained")
    assert card["classes"] == ["x", "y"]
    assert "glt-keras train toy_untrained" in card["markdown"]


def test_cli_zoo_list(fake_zoo, capsys):
    assert cli.main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    assert "| toy_binary | toy |" in out and "not trained" in out
    root, _ = fake_zoo
    registry = json.loads((root / "registry.json").read_text())
    registry["toy_binary"]["metrics"] = {"test": {"accuracy": 0.55, "mean_per_class_accuracy": 0.36}}
    (root / "registry.json").write_text(json.dumps(registry))
    assert cli.main(["zoo", "list"]) == 0  # an unbalanced test set: both numbers
    assert "| 55.00% (test), 36.00% mean per class |" in capsys.readouterr().out


def test_every_shipped_recipe_builds():
    from glt_keras.recipe import ZOO_DIR

    paths = sorted(ZOO_DIR.glob("*/recipe.yaml"))
    assert len(paths) >= 7, paths  # the published zoo, at least
    for path in paths:
        recipe = load_recipe(path)
        model = recipe.build_model()
        assert model.output_shape == (None, len(recipe.classes)), path
        assert tuple(model.input_shape[1:]) == recipe.input_shape


def test_shipped_registry_checksums_match():
    """Every published weight file in the repository matches its registry SHA-256."""
    names = zoo.list_models(pretrained=True)
    assert "vww_binary" in names and "cifar10_binary" in names, names
    for name in names:
        path = zoo.pretrained_weights(name)  # raises on a mismatch
        assert path.exists()


def test_publish_refuses_the_masked_network_of_a_pruning_run(fake_zoo, tmp_path):
    from glt_keras.zoo_cli import publish

    run = tmp_path / "runs" / "toy_binary"
    (run / "shrunk").mkdir(parents=True)
    (run / "recipe.yaml").write_text(
        "name: toy_binary\ntask: toy\ninput_shape: [16, 16, 3]\nclasses: [a, b, c]\n"
        "model: {topology: tiny, levels: 4}\npruning: {target_ratio: 0.5}\n"
    )
    registry_before = (fake_zoo[0] / "registry.json").read_text()
    with pytest.raises(ValueError, match="shrunk"):
        publish(run)
    assert (fake_zoo[0] / "registry.json").read_text() == registry_before


def test_publish_refuses_a_run_whose_network_differs_from_the_zoo_recipe(fake_zoo, tmp_path):
    """zoo.load builds from the zoo's recipe: a wider run's weights must not be published."""
    from glt_keras.zoo_cli import publish

    run = tmp_path / "runs" / "toy_binary"
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(
        "name: toy_binary\ntask: toy\ninput_shape: [16, 16, 3]\nclasses: [a, b, c]\n"
        "model: {topology: tiny, levels: 8}\n"
    )
    weights_before = (fake_zoo[0] / "toy_binary" / "toy_binary_weights.h5").read_bytes()
    with pytest.raises(ValueError, match=r"model.levels: run 8, zoo 4.*copy the run's recipe"):
        publish(run)
    assert (fake_zoo[0] / "toy_binary" / "toy_binary_weights.h5").read_bytes() == weights_before


def test_zoo_conversion_allows_only_the_recipes_real_layers():
    from glt_keras.convert import StrictConversionError
    from glt_keras.models import glt_net
    from glt_keras.zoo_cli import convert_for_zoo

    kwargs = dict(input_shape=(16, 16, 3), num_classes=2, topology="tiny", widths=(64, 64), groups=(1, 2))
    mixed = glt_net(**kwargs, real_layers=["block2"])
    report = convert_for_zoo(mixed, ["block2"]).report
    assert [c.layer for c in report.float_convs] == ["block2_conv"] and report.binary_convs == 2
    with pytest.raises(StrictConversionError, match="block2_conv"):  # the recipe says fully binary
        convert_for_zoo(mixed, [])
    with pytest.raises(ValueError, match="unexpected: \\['block2_conv'\\]"):  # the recipe names another layer
        convert_for_zoo(mixed, ["block1"])


def test_confusion_matrices_leave_the_registry_for_their_own_file(tmp_path):
    from glt_keras.zoo_cli import write_confusion

    metrics = {"test": {"accuracy": 0.5, "confusion": [[1, 1], [0, 2]]}, "val": {"accuracy": 1.0}}
    write_confusion(tmp_path / "confusion.json", ["a", "b"], metrics)
    assert metrics == {"test": {"accuracy": 0.5}, "val": {"accuracy": 1.0}}
    text = (tmp_path / "confusion.json").read_text()
    assert json.loads(text) == {"classes": ["a", "b"], "test": [[1, 1], [0, 2]]}
    assert "    [1, 1],\n    [0, 2]\n" in text  # one matrix row per line


def test_load_gives_the_export_form_and_split_groups_the_training_form(fake_zoo):
    from glt_keras.convert.tflite import has_split_groups

    native = zoo.load("toy_binary")
    split = zoo.load("toy_binary", split_groups=True)
    assert not has_split_groups(native) and has_split_groups(split)
    x = np.random.default_rng(1).integers(0, 256, (4, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(native.predict(x, verbose=0), split.predict(x, verbose=0), atol=1e-6)


def test_plain_lce_call_on_a_zoo_model_is_fully_binary(capfd):
    # What every Larq user types: no glt_keras conversion helper in between.
    import larq_compute_engine as lce
    from larq_compute_engine.tflite.python.interpreter import Interpreter

    from glt_keras.convert import inspect_flatbuffer

    model = zoo.load("vww_binary")
    fb = lce.convert_keras_model(model)
    report = inspect_flatbuffer(fb)
    convs = [l for l in model.layers if l.name.endswith("_conv")]
    # One conv per block of the recipe, plus the 1x1 head.
    assert len(convs) == len(zoo.get_recipe("vww_binary").model["widths"]) + 1
    assert report.op_counts.get("LceBconv2d") == len(convs), report.op_counts
    assert report.all_binary and not {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"} & set(report.op_counts)
    assert len(fb) < 150_000, len(fb)
    x = np.random.default_rng(0).integers(0, 256, (2, 96, 96, 3)).astype("float32")
    got = Interpreter(fb, num_threads=1, use_indirect_bgemm=True).predict(x)
    np.testing.assert_allclose(got, model.predict(x, verbose=0), atol=1e-4)
    # As the README and the cards say: LCE's default kernel cannot run grouped binary convs.
    capfd.readouterr()
    with pytest.raises(Exception, match="AllocateTensors"):
        Interpreter(fb, num_threads=1).predict(x)
    assert "Grouped binary convolutions are not supported with this kernel" in capfd.readouterr().err


def test_published_cards_are_generated_and_say_how_to_run_the_tflite(monkeypatch):
    # The cards on disk are what `write_card` writes today (never edited by hand), and each
    # tells the reader that LCE's interpreter needs use_indirect_bgemm=True.
    from glt_keras import zoo_cli

    written = {}
    monkeypatch.setattr(zoo_cli, "atomic_write", lambda path, text: written.setdefault(path, text))
    monkeypatch.setattr(zoo_cli, "ZOO_DIR", zoo.ZOO_DIR)  # bound at import, maybe under fake_zoo
    names = zoo.list_models(pretrained=True)
    assert names
    for name in names:
        zoo_cli.write_card(name)
        path = zoo.ZOO_DIR / name / "README.md"
        assert written[path] == path.read_text(encoding="utf-8"), f"{path} is not the generated card"
        assert "use_indirect_bgemm=True" in written[path] and "not supported with this kernel" in written[path]


def _bench_mcu_module():
    return load_benchmark("bench_mcu")


def test_card_shows_cortex_m_numbers_only_for_the_weights_measured(fake_zoo, tmp_path, monkeypatch):
    from glt_keras import zoo_cli

    root, _ = fake_zoo
    monkeypatch.setattr(zoo_cli, "ZOO_DIR", root)  # bound at import
    registry = json.loads((root / "registry.json").read_text())
    entry = registry["toy_binary"]
    entry.update(
        size={"params": 10, "binary_params": 8, "real_params": 2, "binary_weight_bytes": 1, "tflite_bytes": 99,
              "macs": 100, "binary_macs": 90},
        lce={"all_binary": True, "lce_bconv2d": 2, "real_layers": []},
        benchmark={"machine": {"platform": "x", "cpus": 2, "load_average": None}, "data": {}, "rows": []},
        training={"command": "glt-keras train toy_binary", "epochs": 1, "train_seconds": 1,
                  "images_per_second": 1, "sessions": 1})
    (root / "registry.json").write_text(json.dumps(registry))
    cpu = {"machine": "mps2-an386", "flash_bytes": 23_456, "static_ram_bytes": 3_000, "stack_bytes": 456,
           "ram_bytes": 3_456}
    row = {"model": "toy_binary", "weights_sha256": entry["sha256"], "data": "toy/test (first 4)",
           "argmax_host_equal_keras": True,
           "cpus": {"cortex-m4": {**cpu, "instructions_per_inference": 1_234_567},
                    "cortex-m7": {**cpu, "machine": "mps2-an500", "instructions_per_inference": 7_654_321}}}
    mcu = tmp_path / "mcu.json"
    monkeypatch.setattr(zoo_cli, "MCU_RESULTS", mcu)
    external = _bench_mcu_module().EXTERNAL_REFERENCE

    def card_for(row):
        mcu.write_text(json.dumps({"rows": [row], "external_reference": external,
                                   "command": "python benchmarks/bench_mcu.py"}))
        return zoo_cli.write_card("toy_binary").read_text()

    card = card_for(row)  # measured for these weights: the numbers, and the external row cited as such
    for number in ("1,234,567", "7,654,321", "23,456", "3,456 (3,000 + 456)", entry["sha256"]):
        assert number in card
    assert "| _external:_ MLPerf Tiny VWW int8" in card and "| 24,101,500 |" in card
    assert "_External reference, not measured by this project_" in card
    assert "TensorFlow Lite Micro 90b983c2, CMSIS-NN 4ab83cc3" in card
    assert "Not measured for these weights" not in card

    stale = {**row, "weights_sha256": "0" * 64}  # measured before the model was republished
    unrecorded = {k: v for k, v in row.items() if k != "weights_sha256"}  # an mcu.json older than the hash
    for other, why in ((stale, "measured other weights"), (unrecorded, "does not record which weights")):
        card = card_for(other)
        assert "1,234,567" not in card and "7,654,321" not in card and "24,101,500" not in card
        assert "Not measured for these weights" in card and why in card
    mcu.unlink()
    assert "has no entry for it" in zoo_cli.write_card("toy_binary").read_text()


def test_bench_mcu_keeps_rows_of_models_not_measured_again(tmp_path):
    """Timing one model must not drop the others' rows from mcu.json (nor keep a stale row of
    the re-measured model, nor mix in rows measured on other CPUs)."""
    merge_rows = _bench_mcu_module().merge_rows
    previous = tmp_path / "mcu.json"
    previous.write_text(json.dumps({"cpus": ["cortex-m4"], "rows": [
        {"model": "b", "weights_sha256": "old-b"}, {"model": "a", "weights_sha256": "old-a"}]}))
    rows = merge_rows(previous, [{"model": "b", "weights_sha256": "new-b"}], ["cortex-m4"])
    assert rows == [{"model": "a", "weights_sha256": "old-a"}, {"model": "b", "weights_sha256": "new-b"}]
    assert merge_rows(previous, [{"model": "b"}], ["cortex-m4", "cortex-m7"]) == [{"model": "b"}]
    assert merge_rows(tmp_path / "missing.json", [{"model": "b"}], ["cortex-m4"]) == [{"model": "b"}]


FINETUNE_RUN = ("name: toy_binary\ntask: toy\ninput_shape: [16, 16, 3]\nclasses: [a, b, c]\n"
                "model: {topology: tiny, levels: 4}\ntraining: {init_weights: runs/step1, epochs: 3}\n")


def test_publish_of_a_finetuning_run_needs_its_recipe_in_the_zoo(fake_zoo, tmp_path):
    """A run started from earlier weights is reproduced by two commands: the card can only give
    the second one if its recipe is in the zoo (zoo/<name>/finetune.yaml), unchanged."""
    from glt_keras.zoo_cli import publish

    run = tmp_path / "runs" / "toy_binary_ft"
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(FINETUNE_RUN)
    weights_before = (fake_zoo[0] / "toy_binary" / "toy_binary_weights.h5").read_bytes()
    with pytest.raises(ValueError, match=r"fine-tunes runs/step1: copy the run's recipe to .*toy_binary/finetune\.yaml"):
        publish(run)
    (fake_zoo[0] / "toy_binary" / "finetune.yaml").write_text(FINETUNE_RUN.replace("epochs: 3", "epochs: 4"))
    with pytest.raises(ValueError, match=r"finetune\.yaml differs from the recipe the run used"):
        publish(run)
    assert (fake_zoo[0] / "toy_binary" / "toy_binary_weights.h5").read_bytes() == weights_before


def test_card_of_a_finetuned_model_lists_both_training_steps(tmp_path):
    from glt_keras.zoo_cli import training_lines, training_record

    step1 = tmp_path / "step1"
    step1.mkdir()
    (step1 / "best_weights.h5").write_bytes(b"")
    (step1 / "summary.json").write_text(json.dumps(
        {"epochs": 150, "train_seconds": 1000.0, "images_per_second": 90.0, "sessions": 3,
         "schedule": [{"first_epoch": 1, "planned_epochs": 60}, {"first_epoch": 25, "planned_epochs": 150}]}))
    path = tmp_path / "finetune.yaml"
    path.write_text(FINETUNE_RUN.replace("runs/step1", str(step1)))
    record = training_record(load_recipe(path), "toy_binary",
                             {"epochs": 60, "train_seconds": 500.0, "images_per_second": 110.0, "sessions": 2,
                              "schedule": [{"first_epoch": 1, "planned_epochs": 60}]})
    assert record["epochs"] == 210 and record["train_seconds"] == 1500.0 and record["sessions"] == 5
    text = "\n".join(training_lines(record))
    assert f"1. `glt-keras train toy_binary --out {step1} --epochs 60`" in text  # the warm restart is kept
    assert "--resume --epochs 150" in text
    assert "2. fine-tuning its best weights with [`finetune.yaml`](finetune.yaml): `glt-keras train zoo/toy_binary/finetune.yaml" in text
    assert "60 epochs, 500.0 s" in text and "210 epochs and 1500.0 s" in text


def test_card_counts_what_a_run_folder_teacher_cost_to_train(tmp_path):
    """A student distilled from a teacher trained here (runs/cifar10_teacher) lists that run's
    cost beside its own: reproducing the student means training the teacher first."""
    from glt_keras.zoo_cli import training_lines, training_record

    teacher = tmp_path / "teacher_run"
    teacher.mkdir()
    (teacher / "summary.json").write_text(json.dumps(
        {"epochs": 80, "train_seconds": 11627.1, "images_per_second": 309.1, "sessions": 6,
         "best_val_accuracy": 0.9018}))
    student = tmp_path / "student.yaml"
    student.write_text("name: toy_binary\ntask: toy\ninput_shape: [16, 16, 3]\nclasses: [a, b, c]\n"
                       "model: {topology: tiny, levels: 4}\n"
                       f"kd: {{teachers: [{{path: {teacher}}}, {{path: {tmp_path / 'file_teacher.tflite'}}}]}}\n")
    run = {"epochs": 200, "train_seconds": 7600.0, "images_per_second": 526.3, "sessions": 2}
    record = training_record(load_recipe(student), "toy_binary", run)
    # Only the run folder has a training cost; a teacher file does not.
    assert record["teacher_runs"] == [{"path": str(teacher), "best_val_accuracy": 0.9018, "epochs": 80,
                                       "train_seconds": 11627.1, "images_per_second": 309.1, "sessions": 6}]
    assert record["train_seconds"] == 7600.0  # the student's own time stays its own
    text = "\n".join(training_lines(record))
    assert f"The teacher `{teacher}`" in text and "80 epochs, 11627.1 s of training" in text and "90.18%" in text
    plain = tmp_path / "plain.yaml"
    plain.write_text("name: toy_binary\ntask: toy\ninput_shape: [16, 16, 3]\nclasses: [a, b, c]\n"
                     "model: {topology: tiny, levels: 4}\n")
    assert "teacher_runs" not in training_record(load_recipe(plain), "toy_binary", run)
