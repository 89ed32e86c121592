"""Behaviour of glt_keras.convert: LCE conversion, op census, verification, C array, CLI.

Conversions cost seconds each (the first one in a process ~30-40 s of TensorFlow tracing),
so the converted models are module-scoped fixtures shared by the tests.
"""
import json
import shutil
import subprocess

import numpy as np
import pytest
import tensorflow as tf

from glt_keras.convert import (
    StrictConversionError,
    VerificationError,
    inspect_flatbuffer,
    to_tflite,
    verify_tflite,
    write_c_array,
)
from glt_keras.layers.binary import BinaryConv2D
from glt_keras.models import glt_net

FLOAT_CONVS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
SHAPE = (32, 32, 3)


def tiny(**kwargs):
    # The "tiny" topology with widths that LCE accepts (a multiple of 32 channels per group).
    return glt_net(input_shape=SHAPE, num_classes=10, topology="tiny", widths=(64, 64),
                   groups=(1, 2), **kwargs)


def pixels(n=8, seed=1):
    return np.random.default_rng(seed).integers(0, 256, size=(n,) + SHAPE).astype(np.uint8)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def logits_model():
    tf.keras.utils.set_random_seed(0)
    return tiny(classifier_activation=None)


@pytest.fixture(scope="module")
def logits_result(logits_model, workdir):
    return to_tflite(logits_model, workdir / "tiny_logits.tflite", flash_budget=64 * 1024)


@pytest.fixture(scope="module")
def bad_group_model():
    x = tf.keras.Input((8, 8, 32))
    y = BinaryConv2D(32, 3, groups=2, lce_check=False, name="narrow_groups")(x)
    y = tf.keras.layers.BatchNormalization(name="bn")(y)
    y = BinaryConv2D(32, 3, name="fine_conv")(y)
    y = tf.keras.layers.GlobalAveragePooling2D()(y)
    return tf.keras.Model(x, y, name="bad_groups")


# -- a zoo-style model converts fully binarized and matches Keras ------------------------
def test_zoo_style_softmax_model_converts_all_binary(workdir):
    model = tiny()  # softmax head, split groups as trained
    result = to_tflite(model, workdir / "tiny_softmax.tflite", verify_images=pixels(6))
    report = result.report
    assert report.all_binary and report.float_convs == []
    assert report.op_counts["LceBconv2d"] == 3  # block1, block2 and the 1x1 head
    assert not any(op in report.op_counts for op in FLOAT_CONVS)
    assert result.verification.passed and result.verification.n_images == 6
    assert (workdir / "tiny_softmax.tflite").read_bytes() == result.flatbuffer


def test_logits_model_matches_keras(logits_result, logits_model, workdir):
    report, check = logits_result.report, logits_result.verification
    assert report.all_binary and report.op_counts["LceBconv2d"] == 3
    assert check.passed and check.argmax_agreement == 1.0
    assert check.max_abs_diff < 1e-3
    # Keras accounting and budget are in the report.
    assert report.keras_summary["binary_params"] > 0 and report.keras_summary["binary_macs"] > 0
    assert report.binary_weight_bytes > 0 and report.fits_flash is True
    md = logits_result.to_markdown()
    assert "LceBconv2d" in md and "all binary" in md and "fits flash budget" in md
    json.dumps(logits_result.to_dict())  # JSON-safe
    # Independent check on other images, from the written file.
    again = verify_tflite(workdir / "tiny_logits.tflite", logits_model, pixels(5, seed=7))
    assert again.passed and again.argmax_agreement == 1.0


def test_strip_strings_is_smaller_and_still_matches_keras(logits_result, logits_model):
    stripped = to_tflite(logits_model, strip_strings=True, verify_images=pixels(5, seed=3))
    assert len(stripped.flatbuffer) < len(logits_result.flatbuffer)
    assert stripped.report.all_binary and stripped.report.op_counts == logits_result.report.op_counts
    assert stripped.verification.passed and stripped.verification.argmax_agreement == 1.0
    # The tensor names are gone (a device reads tensors by index).
    assert b"head_conv" in logits_result.flatbuffer and b"head_conv" not in stripped.flatbuffer
    with pytest.raises(ValueError, match="strip_strings"):
        to_tflite(logits_model, strip_strings="yes")


def test_flash_budget_and_largest_buffers(logits_result):
    small = inspect_flatbuffer(logits_result.flatbuffer, flash_budget=1000)
    assert small.fits_flash is False and "NO" in small.to_markdown()
    assert small.largest_buffers[0].bytes == max(b.bytes for b in small.largest_buffers)
    assert small.suspicious_buffers == []  # no constant-folded broadcast


# -- a group narrower than 32 channels stays float, with the reason ------------------------
def test_narrow_group_reported_and_strict_raises(bad_group_model):
    with pytest.raises(StrictConversionError) as info:
        to_tflite(bad_group_model, strict=True)
    message = str(info.value)
    assert "narrow_groups" in message and "16 input channels per group" in message
    report = info.value.result.report
    assert not report.all_binary
    (conv,) = report.float_convs
    assert conv.op == "CONV_2D" and conv.layer == "narrow_groups"
    assert any("multiple of 32" in r for r in conv.reasons)
    assert report.op_counts["LceBconv2d"] == 1  # fine_conv is still binary
    assert "stayed float" in report.to_markdown()
    assert any("Invalid binary grouped convolution" in m for m in report.converter_messages)
    # The same report without strict, from the flatbuffer alone (no layer names then).
    plain = inspect_flatbuffer(info.value.result.flatbuffer)
    assert [c.op for c in plain.float_convs] == ["CONV_2D"] and plain.float_convs[0].layer is None


# -- C array --------------------------------------------------------------------------
MAIN_C = r"""
#include <stdio.h>
#include <stdint.h>
#include "glt_model.h"
int main(int argc, char **argv) {
  FILE *f = fopen(argv[1], "wb");
  if (!f) return 1;
  fwrite(glt_model_tflite, 1, glt_model_tflite_len, f);
  fclose(f);
  return ((uintptr_t)glt_model_tflite % 16) ? 3 : 0;
}
"""


@pytest.mark.parametrize("language", ["c", "c++"])
def test_c_array_compiles_and_round_trips(logits_result, workdir, language):
    cc, cxx = shutil.which("cc") or shutil.which("gcc"), shutil.which("g++") or shutil.which("c++")
    if cc is None or (language == "c++" and cxx is None):
        pytest.skip("no C/C++ compiler")
    out = workdir / f"c_array_{language.replace('+', 'x')}"
    h, source = write_c_array(logits_result.flatbuffer, out, name="glt_model")
    text = h.read_text()
    assert "#ifndef GLT_MODEL_H_" in text and 'extern "C"' in text
    assert "alignas(16) const unsigned char glt_model_tflite[]" in source.read_text()
    (out / "main.c").write_text(MAIN_C)
    if language == "c":
        subprocess.run([cc, "-std=c11", "-Wall", "-Werror", "-x", "c", "-c", str(source), "-o",
                        str(out / "model.o")], check=True)
    else:
        subprocess.run([cxx, "-std=c++11", "-Wall", "-Werror", "-c", str(source), "-o",
                        str(out / "model.o")], check=True)
    subprocess.run([cc, "-std=c11", "-Wall", "-Werror", "-I", str(out), str(out / "main.c"),
                    str(out / "model.o"), "-o", str(out / "dump")], check=True)
    run = subprocess.run([str(out / "dump"), str(out / "dumped.tflite")])
    assert run.returncode == 0  # written, and 16-byte aligned
    assert (out / "dumped.tflite").read_bytes() == logits_result.flatbuffer


# -- int8 I/O through the CLI, from a saved .h5 -------------------------------------------
def test_cli_int8_io_from_h5(logits_model, workdir, capsys):
    from glt_keras.cli import main

    h5 = workdir / "tiny_logits.h5"
    logits_model.save(h5)
    out = workdir / "cli" / "tiny_int8.tflite"
    code = main(["convert", str(h5), "-o", str(out), "--int8-io", "--strict", "--c-array",
                 "--flash-budget", "64k", "--json", str(workdir / "cli" / "report.json")])
    printed = capsys.readouterr().out
    assert code == 0
    assert "int8" in printed and "verification passed" in printed
    assert (workdir / "cli" / "tiny_int8.h").exists() and (workdir / "cli" / "tiny_int8.cc").exists()
    saved = json.loads((workdir / "cli" / "report.json").read_text())
    assert saved["report"]["all_binary"] and saved["report"]["fits_flash"]

    report = inspect_flatbuffer(out)
    (inp,), (outp,) = report.inputs, report.outputs
    assert inp.dtype == "int8" and inp.scale == 1.0 and inp.zero_point == -128
    assert outp.dtype == "int8"
    assert report.all_binary
    check = verify_tflite(out, logits_model, pixels(16, seed=3))
    assert check.passed and check.input_quantization == (1.0, -128)
    assert check.argmax_agreement >= 0.9  # int8 output: a near-tie may flip


# -- bad inputs: clear errors ------------------------------------------------------------
def test_missing_and_corrupt_tflite(logits_model, workdir):
    with pytest.raises(FileNotFoundError, match="No such .tflite file"):
        verify_tflite(workdir / "nope.tflite", logits_model, pixels(2))
    junk = workdir / "junk.tflite"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="not a TFLite model"):
        verify_tflite(junk, logits_model, pixels(2))
    with pytest.raises(ValueError, match="not a TFLite model"):
        inspect_flatbuffer(junk)
    with pytest.raises(ValueError, match="not a TFLite model"):
        write_c_array(junk, workdir)
    # Right identifier, garbage after it.
    fake = workdir / "fake.tflite"
    fake.write_bytes(b"\x1c\x00\x00\x00TFL3" + b"\xff" * 64)
    with pytest.raises(ValueError, match="Corrupt TFLite flatbuffer"):
        inspect_flatbuffer(fake)


def test_images_of_wrong_shape_or_dtype(logits_result, logits_model):
    fb = logits_result.flatbuffer
    with pytest.raises(ValueError, match=r"shape \(N, 32, 32, 3\).*got \(4, 28, 28, 3\)"):
        verify_tflite(fb, logits_model, np.zeros((4, 28, 28, 3), np.uint8))
    with pytest.raises(ValueError, match="add a batch axis"):
        verify_tflite(fb, logits_model, np.zeros(SHAPE, np.uint8))
    with pytest.raises(ValueError, match="numeric pixels.*got dtype bool"):
        verify_tflite(fb, logits_model, np.zeros((2,) + SHAPE, bool))
    with pytest.raises(ValueError, match="numeric pixels"):
        verify_tflite(fb, logits_model, np.full((2,) + SHAPE, "a"))
    with pytest.raises(ValueError, match="NaN"):
        verify_tflite(fb, logits_model, np.full((2,) + SHAPE, np.nan, np.float32))


def on_thresholds(model, n=4, tied=(1, 2)):
    """Integer pixels, except images ``tied``: every pixel on an effective threshold (x.5)."""
    x = pixels(n).astype(np.float32)
    t = model.get_layer("encoding").effective_thresholds()
    for i in tied:
        x[i] = t[:, i % t.shape[1]]
    return x


def test_mismatch_raises_verification_error(logits_result, logits_model):
    other = tiny(classifier_activation=None)  # same architecture, other random weights
    rng = np.random.default_rng(3)
    for bn in (l for l in other.layers if isinstance(l, tf.keras.layers.BatchNormalization)):
        # trained-like statistics: a fresh BatchNorm puts every sign threshold on the integer 0
        n = bn.moving_mean.shape[-1]
        bn.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.3, n), rng.normal(0, 5, n), rng.uniform(5, 50, n)])
    x = on_thresholds(logits_model, tied=(1,))
    with pytest.raises(VerificationError, match="does not match Keras") as info:
        verify_tflite(logits_result.flatbuffer, other, x)
    assert isinstance(info.value, ValueError) and info.value.result.passed is False
    # Images off the thresholds fail too: not blamed on ties of any kind.
    assert info.value.result.threshold_ties is None and "threshold" not in str(info.value)
    result = verify_tflite(logits_result.flatbuffer, other, pixels(4), raise_on_failure=False)
    assert result.passed is False


def test_failure_only_at_threshold_ties_says_so(logits_result, logits_model, monkeypatch):
    # Keras rounds inputs on a threshold down, LCE up: only the two images whose pixels sit
    # on the effective thresholds (85.5-like floats; uint8 pixels never do) disagree.
    enc = logits_model.get_layer("encoding")
    call = enc.call
    monkeypatch.setattr(enc, "call", lambda inputs, *a, **k: call(inputs - 1e-4, *a, **k))
    x = on_thresholds(logits_model, tied=(1, 2))
    with pytest.raises(VerificationError, match=r"does not match Keras.*Likely cause: every failing image "
                       r"\(\d of 4\) has inputs on or within 0.000977 of an effective threshold of "
                       r"'encoding'.*integer pixels never tie") as info:
        verify_tflite(logits_result.flatbuffer, logits_model, x)
    assert "\n" not in str(info.value)
    assert "effective threshold" in info.value.result.to_markdown()
    # The same model on the integer images alone passes.
    assert verify_tflite(logits_result.flatbuffer, logits_model, x[[0, 3]]).passed


def test_bad_options(logits_model, workdir):
    with pytest.raises(ValueError, match="Unknown target 'riscv'"):
        to_tflite(logits_model, target="riscv")
    with pytest.raises(ValueError, match="tolerance must be"):
        to_tflite(logits_model, tolerance=-1.0)
    with pytest.raises(ValueError, match="flash_budget must be positive"):
        to_tflite(logits_model, flash_budget=0)
    with pytest.raises(ValueError, match="verify_images must have shape"):
        to_tflite(logits_model, verify_images=np.zeros((2, 8, 8, 3)))
    with pytest.raises(ValueError, match="output_range"):
        to_tflite(logits_model, int8_io=True, output_range=(1.0, -1.0))
    with pytest.raises(FileNotFoundError, match="No such model file"):
        to_tflite(workdir / "missing.h5")
    with pytest.raises(ValueError, match="C identifier"):
        write_c_array(b"\x1c\x00\x00\x00TFL3" + b"\x00" * 32, workdir, name="9-lives")


def test_cli_reports_missing_model(workdir, capsys):
    from glt_keras.cli import main

    assert main(["convert", str(workdir / "missing.h5"), "-o", str(workdir / "x.tflite")]) == 2
    assert "No such model file" in capsys.readouterr().err


# -- the benchmark's timing loop and runners (glt_keras.bench) ------------------------------
def test_bench_tells_tasks_apart_by_their_number_of_classes():
    from glt_keras.bench import task_of_shape

    assert task_of_shape((96, 96, 3), 2) == "vww"
    assert task_of_shape((96, 96, 3), 102) == "caltech101"  # never scored on VWW labels
    assert task_of_shape((96, 96, 3), 5) is None
    assert task_of_shape((32, 32, 3), 10) == "cifar10"


def test_bench_finds_imagenette_only_by_its_class_names():
    # STL-10 is also ten classes at 96x96: shape and class count must not score it on Imagenette labels.
    from glt_keras.bench import task_of_shape
    from glt_keras.data.catalog import IMAGENETTE_CLASSES, STL10_CLASSES
    from glt_keras.recipe import load_recipe
    from glt_keras.recipe import ZOO_DIR

    assert task_of_shape((96, 96, 3), 10) is None
    assert task_of_shape((96, 96, 3), 10, STL10_CLASSES) is None
    assert task_of_shape((96, 96, 3), 10, IMAGENETTE_CLASSES) == "imagenette"
    assert task_of_shape((96, 96, 3), 10, load_recipe(ZOO_DIR / "imagenette_binary" / "recipe.yaml").classes) == "imagenette"
    assert task_of_shape((96, 96, 3), 2, ["non_person", "person"]) == "vww"  # tasks without names ignore them


def test_bench_resizes_stored_images_and_reports_the_tasks_metric(logits_result, monkeypatch):
    from types import SimpleNamespace

    import glt_keras.data as data
    from glt_keras import bench

    runner = bench.TFLiteRunner(logits_result.flatbuffer, kind="lce")
    x = np.random.default_rng(0).integers(0, 256, (12, 40, 40, 3), dtype=np.uint8)
    y = np.array([0] * 9 + [1] * 3)  # unbalanced: accuracy and mean per-class accuracy differ
    monkeypatch.setitem(bench.TASKS, "fake", dict(input_shape=SHAPE, num_classes=runner.num_outputs,
                                                  dataset=("fake", "test"), references=(),
                                                  metric="mean_per_class_accuracy"))
    monkeypatch.setattr(data, "load_arrays", lambda name, split: SimpleNamespace(x=x, y=y))
    images, labels, _ = bench.load_labelled("fake", None)
    # The pixels the training and evaluation loaders give the model (load_splits resizes the same way).
    np.testing.assert_array_equal(images, data.resize_uint8(x, SHAPE[:2]))
    result = bench.run_bench([bench.BenchEntry("ours", "fake", "ours (LCE)", runner)], limit=None,
                             warmup=1, repeats=2, rounds=1)
    row = result["rows"][0]
    predicted = runner.predict_classes(images)
    assert row["accuracy"] == pytest.approx(np.mean(predicted == y))
    assert row["mean_per_class_accuracy"] == pytest.approx(
        (np.mean(predicted[:9] == 0) + np.mean(predicted[9:] == 1)) / 2)
    assert f"{row['mean_per_class_accuracy']:.1%} (mean per class)" in bench.to_markdown(result)


def test_bench_runners_and_timing(logits_result):
    from glt_keras.bench import TASKS, TFLiteRunner, anchors_dir, time_models, to_markdown

    ours = TFLiteRunner(logits_result.flatbuffer, kind="lce")
    models = {"ours": (ours.run_one, ours.prepare(pixels(3)))}
    anchors = anchors_dir()
    if anchors is not None and (anchors / "pretrainedResnet_quant.tflite").is_file():
        ref = TFLiteRunner(anchors / "pretrainedResnet_quant.tflite", kind="tflite")
        assert ref.prepare(pixels(1))[0].dtype == np.int8  # raw pixels - 128
        models["ref"] = (ref.run_one, ref.prepare(pixels(3)))
        assert TASKS["cifar10"]["input_shape"] == SHAPE
    stats = time_models(models, warmup=1, repeats=6, rounds=3)
    assert set(stats) == set(models)
    assert all(s["n"] == 6 and 0 < s["median_ms"] <= s["p90_ms"] for s in stats.values())
    assert ours.predict_classes(pixels(2)).shape == (2,)
    row = {"name": "ours", "task": "cifar10", "kind": "ours (LCE)", "input": "float32",
           "bytes": ours.bytes, "accuracy": None, "latency_ratio": {}, **stats["ours"]}
    table = to_markdown({"rows": [row], "machine": {"cpus": 2, "load_average": None},
                         "settings": {"repeats": 6, "warmup": 1, "rounds": 3}, "data": {}})
    assert "| ours |" in table


def test_bench_anchor_of_another_input_size_is_fed_resized_pixels(tmp_path):
    import tensorflow as tf

    from glt_keras.bench import TFLiteRunner

    inputs = tf.keras.Input((12, 12, 3))
    model = tf.keras.Model(inputs, tf.keras.layers.GlobalAveragePooling2D()(inputs))
    path = tmp_path / "anchor.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    runner = TFLiteRunner(path, kind="tflite", pixel_scale=1 / 255)
    images = np.random.default_rng(0).integers(0, 256, (2, 24, 24, 3)).astype(np.uint8)
    prepared = runner.prepare(images)
    assert prepared[0].shape == (1, 12, 12, 3)
    from PIL import Image

    want = np.asarray(Image.fromarray(images[1]).resize((12, 12), Image.Resampling.BILINEAR)) / 255
    np.testing.assert_allclose(prepared[1][0], want, rtol=1e-6)


def test_bench_scores_the_wake_vision_anchors_as_their_readme_does():
    """../shared/anchors/README.md: 71.6% / 74.6% / 78.4% on the 500 VWW validation images."""
    from glt_keras import bench

    anchors = bench.anchors_dir()
    if anchors is None or not (anchors / "wake_vision" / "wv_quality_cezar.tflite").is_file():
        pytest.skip("no ../shared/anchors")
    labelled = bench.load_labelled("vww", None)
    if labelled is None:
        pytest.skip("no VWW validation images")
    x, y, _ = labelled
    for name, want in (("k_2_c_3", 0.716), ("samy", 0.746), ("cezar", 0.784)):
        runner = bench.TFLiteRunner(anchors / "wake_vision" / f"wv_quality_{name}.tflite", kind="tflite")
        assert np.mean(runner.predict_classes(x) == y) == pytest.approx(want, abs=1e-9), name


def test_bench_frontier_anchors_and_plot(tmp_path):
    from glt_keras import bench

    anchors = bench.anchors_dir()
    if anchors is not None and (anchors / "wake_vision").is_dir():
        entries = bench.reference_entries(["vww"], anchors, frontier=True)
        kinds = {e.name: e.kind for e in entries}
        assert kinds["vww_96_int8"] == bench.REFERENCE and kinds["wv_quality_k_2_c_3"] == bench.FRONTIER
        assert {e.kind for e in bench.reference_entries(["vww"], anchors)} == {bench.REFERENCE}
    rows = [{"name": "ours", "task": "vww", "kind": "ours (LCE)", "bytes": 120_000, "accuracy": 0.8},
            {"name": "anchor", "task": "vww", "kind": bench.FRONTIER, "bytes": 8_000, "accuracy": 0.7},
            {"name": "other task", "task": "cifar10", "kind": "ours (LCE)", "bytes": 9, "accuracy": 0.1}]
    results = {"rows": rows, "data": {"vww": "vww_val500/val (500 images)"}}
    path = bench.plot_frontier(results, tmp_path / "frontier.png", task="vww", highlight="ours")
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"
    assert bench.plot_frontier({"rows": rows[:1] and [{**rows[0], "accuracy": None}], "data": {}},
                               tmp_path / "none.png", task="vww") is None


def test_bench_names_the_model_whose_conversion_fails(monkeypatch):
    # A bench of several zoo models stops at the first that does not verify: the error says which.
    import argparse

    from glt_keras import bench

    def failing(model, name, **kwargs):
        raise VerificationError("The converted model does not match Keras: verification FAILED on 16 images")

    monkeypatch.setattr(bench, "keras_entry", failing)
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(["--topology", "glt32", "--no-references", "--no-host-c"])
    with pytest.raises(VerificationError, match=r"^glt32 \(untrained\): The converted model does not match Keras"):
        bench.collect_entries(args)
