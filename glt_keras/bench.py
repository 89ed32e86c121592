"""``glt-keras bench``: our LCE models vs the MLPerf Tiny reference models, in one process.

For each model: accuracy on labelled images (when the data is available), ``.tflite``
bytes, and the median latency per image with 1 thread after warm-up (LCE interpreter
for ours, ``tf.lite.Interpreter(num_threads=1)`` for the references), plus the latency
ratio against each reference of the same task. All models are timed on the same
images, interleaved in rounds, so that the ratios come from one run on one machine.

Each of our Keras models also gets a host C row (:class:`HostCRunner`): the project's
own C99 library (``glt-keras export-c``) compiled for this machine with its popcount
instruction, the binary engine that LCE does not have on x86. Our rows report how many
images give the same argmax as the Keras model.

The timing loop (:func:`time_models`, :func:`time_per_image`) and the runners
(:class:`TFLiteRunner`, :class:`HostCRunner`) are reused by the ``benchmarks/`` scripts.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .data.catalog import IMAGENETTE_CLASSES

#: Tasks by input shape and number of classes: the reference models, the labelled
#: evaluation data and the headline metric (``accuracy`` unless ``metric`` says otherwise).
TASKS = {
    "vww": dict(
        input_shape=(96, 96, 3), num_classes=2, dataset=("vww_val500", "val"),
        references=(  # (file, pixel scale: the float input is pixels * scale)
            ("vww_96_int8.tflite", 1.0 / 255.0),
            ("vww_96_float.tflite", 1.0 / 255.0),
        ),
        # More of the accuracy-vs-bytes frontier: Wake Vision person models (raw uint8 pixels,
        # resized bilinearly to their own input size); scored and plotted, no latency ratio.
        frontier=(
            ("wake_vision/wv_quality_k_2_c_3.tflite", 1.0),
            ("wake_vision/wv_quality_samy.tflite", 1.0),
            ("wake_vision/wv_quality_cezar.tflite", 1.0),
            ("wake_vision/wv_quality_mobilenetv2.tflite", 1.0),
            ("wake_vision/wv_quality_mcunet-320kb-1mb_vww.tflite", 1.0),
        ),
    ),
    "cifar10": dict(
        input_shape=(32, 32, 3), num_classes=10, dataset=("cifar10", "test"),
        references=(
            ("pretrainedResnet_quant.tflite", 1.0),
            ("pretrainedResnet.tflite", 1.0),
        ),
    ),
}
TASKS["caltech101"] = dict(
    input_shape=(96, 96, 3), num_classes=102, dataset=("caltech101", "test"), references=(),
    metric="mean_per_class_accuracy",  # Caltech-101's classes are unbalanced (31 to 800 images)
)
# Shape and class count do not identify Imagenette (STL-10 is also ten classes at 96x96): a task
# with ``classes`` matches only a model whose class names are given and equal.
TASKS["imagenette"] = dict(
    input_shape=(96, 96, 3), num_classes=10, dataset=("imagenette", "val"), references=(),
    classes=tuple(IMAGENETTE_CLASSES),
)
TOPOLOGY_TASK = {"glt96": "vww", "glt32": "cifar10", "tiny": "cifar10"}


def anchors_dir(explicit=None) -> Optional[Path]:
    """Where the reference ``.tflite`` files are: ``explicit``, ``$GLT_KERAS_ANCHORS``,
    ``<project>/anchors`` or ``<project>/../shared/anchors``."""
    project = Path(__file__).resolve().parents[1]
    candidates = [explicit, os.environ.get("GLT_KERAS_ANCHORS"), project / "anchors",
                  project.parent / "shared" / "anchors"]
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c)
    if explicit:
        raise FileNotFoundError(f"No such anchors folder: {explicit}")
    return None


def task_of_shape(shape, num_classes: Optional[int] = None, classes=None) -> Optional[str]:
    """The task of a model with this input shape and number of outputs, or ``None``: a
    96x96 model with 102 outputs is Caltech-101, not VWW, and must not be scored on VWW
    labels. Without ``num_classes`` the first task of that shape. A task that names its
    ``classes`` (Imagenette) is found only from the model's class names (``classes``)."""
    shape = tuple(int(d) for d in shape)
    return next((name for name, t in TASKS.items() if t["input_shape"] == shape
                 and (num_classes is None or t["num_classes"] == int(num_classes))
                 and ("classes" not in t or (classes is not None and tuple(classes) == t["classes"]))), None)


# ---------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------
def _stats(seconds: list) -> dict:
    ms = sorted(1000.0 * s for s in seconds)
    return {
        "median_ms": statistics.median(ms),
        "p10_ms": ms[int(0.1 * (len(ms) - 1))],
        "p90_ms": ms[int(0.9 * (len(ms) - 1))],
        "mean_ms": statistics.fmean(ms),
        "n": len(ms),
    }


def time_per_image(run_one: Callable, inputs, *, warmup: int = 10, repeats: int = 100) -> dict:
    """Median (and p10 / p90 / mean) milliseconds of ``run_one(inputs[i])`` after warm-up.

    ``inputs`` is a sequence of prepared single inputs; they are cycled through.
    """
    return time_models({"model": (run_one, inputs)}, warmup=warmup, repeats=repeats, rounds=1)["model"]


def time_models(models: dict, *, warmup: int = 10, repeats: int = 100, rounds: int = 5) -> dict:
    """Time several models fairly: ``{name: (run_one, inputs)}`` -> ``{name: stats}``.

    Every model is warmed up, then the ``repeats`` timed calls of each model are spread
    over ``rounds`` interleaved rounds, so that a slow phase of a noisy machine hits
    every model alike. One call is one image (batch 1); ``time.perf_counter`` around it.
    """
    if repeats < 1 or warmup < 0 or rounds < 1:
        raise ValueError(f"need repeats >= 1, warmup >= 0, rounds >= 1; got {repeats}, {warmup}, {rounds}")
    for run_one, inputs in models.values():
        if len(inputs) == 0:
            raise ValueError("time_models needs at least one input per model")
        for i in range(warmup):
            run_one(inputs[i % len(inputs)])
    times = {name: [] for name in models}
    per_round = [repeats // rounds + (1 if r < repeats % rounds else 0) for r in range(rounds)]
    counter = {name: 0 for name in models}
    for count in per_round:
        for name, (run_one, inputs) in models.items():
            for _ in range(count):
                x = inputs[counter[name] % len(inputs)]
                counter[name] += 1
                start = time.perf_counter()
                run_one(x)
                times[name].append(time.perf_counter() - start)
    return {name: _stats(t) for name, t in times.items()}


# ---------------------------------------------------------------------------------------
# Runners
# ---------------------------------------------------------------------------------------
def resize_like_anchors(images: np.ndarray, size) -> np.ndarray:
    """uint8-valued pixels (N, H, W, 3) -> float32 (N, *size, 3) by PIL's bilinear filter, as the
    anchors' scores in ../shared/anchors/README.md were measured. PIL widens the filter when it
    shrinks (antialiasing); TensorFlow's plain bilinear resize does not, and moved the 50x50
    anchors' scores by up to 3 points (69.4 / 81.6% vs the README's 71.6 / 78.4%)."""
    from PIL import Image

    pixels = np.clip(np.round(images), 0, 255).astype(np.uint8)
    height, width = (int(v) for v in size)
    return np.stack([np.asarray(Image.fromarray(p).resize((width, height), Image.Resampling.BILINEAR))
                     for p in pixels]).astype(np.float32)


class TFLiteRunner:
    """One flatbuffer in an interpreter, fed raw pixels (batch 1).

    ``kind="lce"``: the LCE interpreter (indirect BGEMM, 1 thread); ``kind="tflite"``:
    ``tf.lite.Interpreter(num_threads=1)`` (XNNPACK by default). ``pixel_scale``: the
    model's float input is ``pixels * pixel_scale``; int8 / uint8 inputs are then
    quantized with the model's input scale and zero point.
    """

    def __init__(self, fb, *, kind: str = "lce", pixel_scale: float = 1.0, num_threads: int = 1):
        from .convert._io import read_tflite

        self.flatbuffer, self.source = read_tflite(fb)
        self.kind = kind
        self.pixel_scale = float(pixel_scale)
        if kind == "lce":
            from .convert.verify import lce_interpreter

            wrapper = lce_interpreter(self.flatbuffer, num_threads=num_threads)
            self._lce = wrapper.interpreter  # the C++ LiteInterpreter: predict([x]) -> [y]
            self.input_dtype = np.dtype(wrapper.input_types[0])
            self.input_shape = tuple(wrapper.input_shapes[0])
            self.in_q = _first_q(wrapper.input_scales, wrapper.input_zero_points)
            self.out_q = _first_q(wrapper.output_scales, wrapper.output_zero_points)
            self.num_outputs = int(wrapper.output_shapes[0][-1])
        elif kind == "tflite":
            import tensorflow as tf

            self._tfl = tf.lite.Interpreter(model_content=self.flatbuffer, num_threads=num_threads)
            self._tfl.allocate_tensors()
            inp, out = self._tfl.get_input_details()[0], self._tfl.get_output_details()[0]
            self._in_index, self._out_index = inp["index"], out["index"]
            self.input_dtype = np.dtype(inp["dtype"])
            self.input_shape = tuple(int(d) for d in inp["shape"])
            self.in_q = tuple(inp["quantization"]) if inp["quantization"][0] else None
            self.out_q = tuple(out["quantization"]) if out["quantization"][0] else None
            self.num_outputs = int(out["shape"][-1])
        else:
            raise ValueError(f"kind must be 'lce' or 'tflite', got {kind!r}")

    @property
    def bytes(self) -> int:
        return len(self.flatbuffer)

    def prepare(self, images: np.ndarray) -> list:
        """Raw pixels (N, H, W, C) -> a list of model-ready (1, H, W, C) inputs, resized first
        when the model takes another size (:func:`resize_like_anchors`)."""
        x = np.asarray(images, np.float32)
        if tuple(x.shape[1:3]) != tuple(self.input_shape[1:3]):
            x = resize_like_anchors(x, self.input_shape[1:3])
        x = x * self.pixel_scale
        if self.input_dtype.kind in "iu":
            scale, zero_point = self.in_q
            info = np.iinfo(self.input_dtype)
            x = np.clip(np.round(x / scale) + zero_point, info.min, info.max)
        x = x.astype(self.input_dtype)
        return [x[i:i + 1] for i in range(len(x))]

    def run_one(self, x: np.ndarray) -> np.ndarray:
        if self.kind == "lce":
            return self._lce.predict([x])[0]
        self._tfl.set_tensor(self._in_index, x)
        self._tfl.invoke()
        return self._tfl.get_tensor(self._out_index)

    def predict_classes(self, images: np.ndarray) -> np.ndarray:
        # argmax is invariant to a positive output scale: no dequantization needed.
        return np.array([int(np.argmax(self.run_one(x))) for x in self.prepare(images)])


#: Compiler flags of the host C build; with ``GLT_USE_BUILTIN_POPCOUNT`` (one POPCNT per word on x86).
HOST_CFLAGS = ("-O2", "-march=native")


class HostCRunner:
    """A Keras model as the project's C99 library (:func:`glt_keras.mcu.export_c`) compiled
    for this machine (:func:`glt_keras.mcu.host.build_host`), fed uint8 pixels (batch 1)
    through ``ctypes``; single-threaded.

    ``bitslice=False`` (default here): the XNOR-popcount kernel, faster than the bit-sliced
    kernel (the export's default, made for Cortex-M) when popcount is one instruction.
    ``bytes``: the library's constant data (weights, thresholds, tables), not a ``.tflite``.
    Raises what the export or the build raises (e.g. ``UnsupportedLayerError``).
    """

    def __init__(self, model, *, cflags=HOST_CFLAGS, bitslice: bool = False, cc=None):
        from .mcu import export_c
        from .mcu.host import build_host, find_cc

        tmp = Path(tempfile.mkdtemp(prefix="glt_bench_c_"))
        try:
            result = export_c(model, tmp / "c", bitslice=bitslice)
            self.library = build_host(tmp / "c", build_dir=tmp / "build", cc=cc, cflags=tuple(cflags),
                                      builtin_popcount=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # the library is loaded: its files may go
        version = subprocess.run([find_cc(cc), "--version"], capture_output=True, text=True).stdout
        self.build = {"compiler": (version.splitlines() or ["?"])[0], "cflags": list(cflags),
                      "builtin_popcount": self.library.popcount_builtin, "bitslice": bool(bitslice),
                      "first_layer_table": bool(result.layers[0].get("table"))}
        self.bytes = int(result.const_bytes)
        self.input_dtype = np.dtype(np.uint8)
        self.input_shape = (1,) + tuple(result.input_shape)
        self.num_outputs = int(result.num_classes)

    def prepare(self, images: np.ndarray) -> list:
        """Raw pixels (N, H, W, C) of the model's size -> a list of (1, H, W, C) uint8 inputs."""
        from .mcu.host import as_images

        x = as_images(images, self.input_shape[1:])
        return [x[i:i + 1] for i in range(len(x))]

    def run_one(self, x: np.ndarray) -> np.ndarray:
        return self.library.infer(x)

    def predict_classes(self, images: np.ndarray) -> np.ndarray:
        return self.library.infer(images).argmax(1)


def _first_q(scales, zero_points):
    if not scales or not scales[0]:
        return None
    s = scales[0][0] if isinstance(scales[0], (list, tuple, np.ndarray)) else scales[0]
    z = zero_points[0] if zero_points else 0
    z = z[0] if isinstance(z, (list, tuple, np.ndarray)) else z
    return float(s), int(z or 0)


# ---------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------
@dataclass
class BenchEntry:
    name: str
    task: Optional[str]
    kind: str  # "ours (LCE)" / "ours (host C)" / "reference (TFLite)" / "anchor (TFLite)"
    runner: TFLiteRunner = field(repr=False)  # or a HostCRunner
    extra: dict = field(default_factory=dict)
    keras_model: object = field(default=None, repr=False)  # when set: argmax agreement with it


def load_labelled(task: str, limit: Optional[int], seed: int = 0):
    """``(images uint8, labels, description)`` of a task's evaluation set, or ``None``."""
    name, split = TASKS[task]["dataset"]
    try:
        try:
            from .data import load_arrays
        except ImportError:
            from .data.sources import load_arrays
        ds = load_arrays(name, split)
    except (ImportError, FileNotFoundError, ValueError) as err:
        print(f"bench: no labelled {task} data ({type(err).__name__}: {err}); "
              "timing on random pixels, no accuracy.", file=sys.stderr)
        return None
    x, y = np.asarray(ds.x), np.asarray(ds.y)
    if limit and len(x) > limit:
        index = np.random.default_rng(seed).choice(len(x), limit, replace=False)
        index.sort()
        x, y = x[index], y[index]
    size = tuple(TASKS[task]["input_shape"][:2])
    if tuple(x.shape[1:3]) != size:  # stored larger (Caltech-101: 112x112): resized as for training
        from .data import resize_uint8

        x = resize_uint8(x, size)
    return x, y, f"{name}/{split} ({len(x)} images)"


def keras_entry(model, name: str, *, int8_io: bool = False, verify: bool = True, classes=None) -> BenchEntry:
    """Convert a Keras model with :func:`glt_keras.convert.to_tflite` into a bench entry
    (``classes``: its class names, where they decide the task; see :func:`task_of_shape`)."""
    from .convert import to_tflite

    return conversion_entry(to_tflite(model, int8_io=int8_io, verify=verify), name, model, classes=classes)


def conversion_entry(result, name: str, model, *, classes=None) -> BenchEntry:
    """A bench entry from an existing :class:`~glt_keras.convert.ConversionResult`."""
    task = task_of_shape(model.input_shape[1:], model.output_shape[-1], classes)
    extra = {"lce_bconv2d": result.report.binary_convs, "float_convs": len(result.report.float_convs)}
    if result.report.keras_summary:
        extra.update(binary_macs=result.report.keras_summary["binary_macs"],
                     params=result.report.keras_summary["params"])
    return BenchEntry(name, task, "ours (LCE)", TFLiteRunner(result.flatbuffer, kind="lce"), extra)


REFERENCE, FRONTIER, HOST_C = "reference (TFLite)", "anchor (TFLite)", "ours (host C)"


def host_c_entry(model, name: str, *, classes=None, **kwargs) -> Optional[BenchEntry]:
    """The host C build of a Keras model as a bench entry named ``"<name> (host C)"``, or
    ``None`` (the reason on stderr) when the model cannot be exported or built."""
    from .mcu import UnsupportedLayerError

    try:
        runner = HostCRunner(model, **kwargs)
    except (UnsupportedLayerError, FileNotFoundError, RuntimeError) as err:
        print(f"bench: no host C row for {name}: {err}".splitlines()[0], file=sys.stderr)
        return None
    task = task_of_shape(model.input_shape[1:], model.output_shape[-1], classes)
    return BenchEntry(f"{name} (host C)", task, HOST_C, runner, keras_model=model)


def reference_entries(tasks, anchors: Optional[Path], *, frontier: bool = False) -> list:
    """The task's reference models (latency ratios are taken against them) and, with
    ``frontier``, the other anchors of the accuracy-vs-bytes frontier (scored only)."""
    entries = []
    if anchors is None:
        print("bench: reference models not found (set GLT_KERAS_ANCHORS or --anchors).", file=sys.stderr)
        return entries
    for task in tasks:
        files = [(f, scale, REFERENCE) for f, scale in TASKS[task]["references"]]
        if frontier:
            files += [(f, scale, FRONTIER) for f, scale in TASKS[task].get("frontier", ())]
        for file, pixel_scale, kind in files:
            path = anchors / file
            if not path.is_file():
                print(f"bench: missing reference {path}", file=sys.stderr)
                continue
            runner = TFLiteRunner(path, kind="tflite", pixel_scale=pixel_scale)
            entries.append(BenchEntry(Path(file).stem, task, kind, runner))
    return entries


def run_bench(entries: list, *, limit: Optional[int] = 1000, warmup: int = 10, repeats: int = 100,
              rounds: int = 5, timing_images: int = 16, seed: int = 0) -> dict:
    """Accuracy, bytes and latency of every entry; ratios against each task's references."""
    rows = []
    tasks = sorted({e.task for e in entries if e.task})
    data_info = {}
    keras_classes = {}  # id(model) -> argmax of the Keras model on the task's images
    for task in tasks + [None]:
        group = [e for e in entries if e.task == task]
        if not group:
            continue
        shape = TASKS[task]["input_shape"] if task else tuple(group[0].runner.input_shape[1:])
        labelled = load_labelled(task, limit, seed) if task else None
        if labelled is not None:
            images, labels, description = labelled
        else:
            images = np.random.default_rng(seed).integers(0, 256, (timing_images,) + tuple(shape)).astype(np.uint8)
            labels, description = None, "random pixels (no accuracy)"
        data_info[task or "other"] = description
        timing = images[:timing_images]
        stats = time_models(
            {e.name: (e.runner.run_one, e.runner.prepare(timing)) for e in group},
            warmup=warmup, repeats=repeats, rounds=rounds,
        )
        references = [e for e in group if e.kind == REFERENCE]
        for e in group:
            row = {"name": e.name, "task": task, "kind": e.kind, "bytes": e.runner.bytes,
                   "input": str(e.runner.input_dtype), **stats[e.name], **e.extra}
            predicted = None
            if labels is not None:
                start = time.perf_counter()
                predicted = e.runner.predict_classes(images)
                row["accuracy"] = float(np.mean(predicted == labels))
                per_class = [np.mean(predicted[labels == c] == c) for c in np.unique(labels)]
                row["mean_per_class_accuracy"] = float(np.mean(per_class))
                row["metric"] = TASKS[task].get("metric", "accuracy")
                row["eval_seconds"] = time.perf_counter() - start
            else:
                row["accuracy"] = None
            if e.keras_model is not None:
                if id(e.keras_model) not in keras_classes:
                    scores = e.keras_model.predict(images.astype(np.float32), batch_size=64, verbose=0)
                    keras_classes[id(e.keras_model)] = np.asarray(scores).argmax(-1)
                predicted = e.runner.predict_classes(images) if predicted is None else predicted
                row["argmax_equal_keras"] = int(np.sum(predicted == keras_classes[id(e.keras_model)]))
                row["argmax_compared"] = int(len(images))
            if e.kind == HOST_C:
                row["host_c"] = e.runner.build
            row["latency_ratio"] = {r.name: stats[e.name]["median_ms"] / stats[r.name]["median_ms"]
                                    for r in references if r is not e}
            rows.append(row)
    return {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                    "python": platform.python_version()},
        "settings": {"threads": 1, "warmup": warmup, "repeats": repeats, "rounds": rounds,
                     "timing_images": timing_images, "limit": limit},
        "data": data_info,
        "rows": rows,
    }


def plot_frontier(results: dict, path, *, task: str, highlight=None, title=None) -> Optional[Path]:
    """Accuracy against ``.tflite`` bytes (log scale) of every scored model of ``task`` in
    ``results``: ours as filled circles (``highlight`` in red), anchors as grey squares.
    Written to ``path`` (PNG) through a temporary file; ``None`` when nothing was scored."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = TASKS[task].get("metric", "accuracy")
    # The host C rows repeat their model's accuracy at a size that is not a .tflite's: not plotted.
    rows = [r for r in results["rows"] if r["task"] == task and r.get(metric) is not None and r["kind"] != HOST_C]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=100)
    for r in rows:
        ours = r["kind"].startswith("ours")
        color = "tab:red" if r["name"] == highlight else ("tab:blue" if ours else "0.45")
        ax.scatter(r["bytes"], 100 * r[metric], marker="o" if ours else "s", s=46 if ours else 30,
                   color=color, zorder=3)
        ax.annotate(r["name"], (r["bytes"], 100 * r[metric]), textcoords="offset points", xytext=(5, 3),
                    fontsize=7, color=color)
    ax.set_xscale("log")
    sizes = [r["bytes"] for r in rows]
    ax.set_xlim(min(sizes) / 1.6, max(sizes) * 6)  # room for the labels right of the points
    ax.set_xlabel(".tflite bytes (log scale)")
    ax.set_ylabel(("mean per-class accuracy" if metric != "accuracy" else "accuracy") + " (%)")
    ax.set_title(title or f"{task}: accuracy vs size", fontsize=9)
    ax.text(0.01, 0.98, results["data"].get(task, ""), transform=ax.transAxes, fontsize=7, color="0.4", va="top")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def to_markdown(results: dict) -> str:
    rows = results["rows"]
    refs = sorted({name for r in rows for name in r["latency_ratio"]})
    agreement = any("argmax_equal_keras" in r for r in rows)  # a column only when a row was compared
    head = ["model", "task", "kind", "input", "bytes", "accuracy"] + ["argmax = Keras"] * agreement
    head += ["median ms", "p90 ms"]
    head += [f"x {name}" for name in refs]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * (len(head) - 4)) + "|"]
    for r in rows:
        metric = r.get("metric", "accuracy")
        acc = "n/a" if r.get(metric) is None else f"{r[metric]:.1%}" + (" (mean per class)" if metric != "accuracy" else "")
        same = f"{r['argmax_equal_keras']:,} / {r['argmax_compared']:,}" if "argmax_equal_keras" in r else ""
        cells = [r["name"], r["task"] or "-", r["kind"], r["input"], f"{r['bytes']:,}", acc] + [same] * agreement
        cells += [f"{r['median_ms']:.3f}", f"{r['p90_ms']:.3f}"]
        cells += [f"{r['latency_ratio'][n]:.2f}" if n in r["latency_ratio"] else "" for n in refs]
        lines.append("| " + " | ".join(cells) + " |")
    m = results["machine"]
    notes = [f"1 thread, median of {results['settings']['repeats']} single-image runs after "
             f"{results['settings']['warmup']} warm-up runs, interleaved in "
             f"{results['settings']['rounds']} rounds; {m['cpus']} CPUs, load average "
             f"{m['load_average']}. `x REF`: our median latency / the reference's."]
    builds = [r["host_c"] for r in rows if r.get("host_c")]
    if not any(k in str(m.get("platform", "")).lower() for k in ("aarch64", "arm64", "armv")):
        notes.append("On this non-ARM machine LCE runs its binary convolutions with portable C++ reference "
                     "kernels: its optimized binary kernels exist only for ARM (AArch64 assembly, also 32-bit "
                     "ARM; larq/compute-engine issues 591 and 803). The LCE-vs-int8 latency ratios here say "
                     "little about what binarization buys" + ("; the host C rows show a binary network using "
                                                             "this CPU's popcount instruction." if builds else "."))
    if builds:
        b = builds[0]
        notes.append(
            "`ours (host C)`: the project's C99 library (`glt-keras export-c`, "
            + ("XNOR-popcount kernel, `bitslice=False`" if not b["bitslice"] else "bit-sliced kernel")
            + ") compiled with `" + " ".join(["cc", "-std=c99", *b["cflags"]])
            + ("` and `__builtin_popcount` (`-DGLT_USE_BUILTIN_POPCOUNT`)" if b["builtin_popcount"]
               else "` (portable popcount)")
            + f" by {b['compiler']}, called through ctypes one image at a time, 1 thread. Its bytes are the "
            "library's constant data (weights, thresholds, tables), not a `.tflite` file.")
    if agreement:
        notes.append("`argmax = Keras`: images on which the row's top class equals the Keras model's, of the "
                     "images scored (the labelled ones, or the random timing pixels).")
    notes += [f"data {task}: {d}" for task, d in results["data"].items()]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("names", nargs="*", metavar="ZOO_NAME", help="zoo models (needs glt_keras.zoo)")
    p.add_argument("--model", action="append", default=[], metavar="FILE",
                   help="a saved Keras model (.h5 / .keras / SavedModel); repeatable")
    p.add_argument("--tflite", action="append", default=[], metavar="FILE",
                   help="an already converted LCE .tflite; repeatable")
    p.add_argument("--topology", action="append", default=[], metavar="NAME",
                   help="an untrained glt_net topology (glt96 -> VWW 96x96, glt32 -> CIFAR-10); repeatable")
    p.add_argument("--int8-io", action="store_true", help="convert our models with int8 I/O")
    p.add_argument("--no-references", action="store_true", help="skip the MLPerf Tiny reference models")
    p.add_argument("--no-host-c", action="store_true",
                   help="skip the host C rows (our models as C libraries built with -O2 -march=native)")
    p.add_argument("--frontier", action="store_true",
                   help="also score the other anchors (Wake Vision person models) for the accuracy-vs-bytes frontier")
    p.add_argument("--plot", metavar="DIR", help="write <task>_frontier.png (accuracy vs bytes) per task here")
    p.add_argument("--anchors", metavar="DIR", help="folder of the reference .tflite files")
    p.add_argument("--limit", type=int, default=1000, help="labelled images per task (0: all; default 1000)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=100, help="timed single-image runs per model")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--json", metavar="OUT.json", help="write the results as JSON")
    p.add_argument("--readme", metavar="README.md",
                   help="also write the table between the zoo-table markers of this file")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="accuracy, size and 1-thread latency vs the MLPerf Tiny references",
        description=__doc__.split("\n\n")[0],
    )
    add_arguments(p)
    p.set_defaults(func=run)


def collect_entries(args) -> list:
    from .convert.tflite import load_keras_model
    from .models import glt_net

    entries = []

    def ours(model, name, classes=None):  # the LCE row and, unless --no-host-c, the host C row of a Keras model
        from .convert import VerificationError

        try:
            entry = keras_entry(model, name, int8_io=args.int8_io, classes=classes)
        except VerificationError as err:  # the message alone does not say which of the models failed
            raise VerificationError(f"{name}: {err}", err.result) from None
        entry.keras_model = model
        entries.append(entry)
        host = None if getattr(args, "no_host_c", False) else host_c_entry(model, name, classes=classes)
        if host is not None:
            entries.append(host)

    for name in args.names:
        try:
            import glt_keras.zoo as zoo
        except ModuleNotFoundError as err:
            if err.name == "glt_keras.zoo":
                raise ValueError(f"zoo names ({name!r}) need glt_keras.zoo, which is not installed: "
                                 "use --model FILE, --tflite FILE or --topology NAME.") from None
            raise
        model = zoo.load(name)
        ours(getattr(model, "model", model), name, classes=zoo.get_recipe(name).classes)
    for file in args.model:
        ours(load_keras_model(file), Path(file).stem)
    for file in args.tflite:
        runner = TFLiteRunner(file, kind="lce")
        entries.append(BenchEntry(Path(file).stem, task_of_shape(runner.input_shape[1:], runner.num_outputs),
                                  "ours (LCE)", runner))
    for topology in args.topology:
        task = TOPOLOGY_TASK.get(topology, "vww")
        t = TASKS[task]
        kwargs = dict(widths=(64, 64), groups=(1, 2)) if topology == "tiny" else {}
        model = glt_net(input_shape=t["input_shape"], num_classes=t["num_classes"], topology=topology, **kwargs)
        ours(model, f"{topology} (untrained)")
    if not entries:
        raise ValueError("nothing to benchmark: give zoo names, --model, --tflite or --topology.")
    if not args.no_references:
        tasks = sorted({e.task for e in entries if e.task})
        entries += reference_entries(tasks, anchors_dir(args.anchors), frontier=args.frontier)
    return entries


def run(args) -> int:
    from ._io import atomic_write

    entries = collect_entries(args)
    results = run_bench(entries, limit=args.limit or None, warmup=args.warmup,
                        repeats=args.repeats, rounds=args.rounds)
    table = to_markdown(results)
    print(table)
    if args.plot:
        Path(args.plot).mkdir(parents=True, exist_ok=True)
        for task in sorted({r["task"] for r in results["rows"] if r["task"]}):
            written = plot_frontier(results, Path(args.plot) / f"{task}_frontier.png", task=task)
            if written:
                print(f"wrote {written}")
    if args.json:
        atomic_write(args.json, json.dumps(results, indent=2))
    if args.readme:
        update_readme(args.readme, table, command="glt-keras bench " + " ".join(sys.argv[2:]))
    return 0


README_START, README_END = "<!-- zoo-table:start -->", "<!-- zoo-table:end -->"


def update_readme(path, table: str, *, command: str, start: str = README_START, end: str = README_END) -> None:
    """Replace the README's generated table between the ``start`` / ``end`` markers (default:
    the zoo table's) with ``table``."""
    from ._io import atomic_write

    text = Path(path).read_text(encoding="utf-8")
    if start not in text or end not in text:
        raise ValueError(f"{path} has no {start} ... {end} markers.")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    body = f"{start}\n_Generated by `{command}`; do not edit by hand._\n\n{table}{end}"
    atomic_write(path, head + body + tail)
