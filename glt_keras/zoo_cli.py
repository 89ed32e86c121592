"""``glt-keras zoo list | card NAME | publish RUN_DIR``: the zoo's registry and model cards.

``publish`` is the only writer of ``zoo/registry.json`` and of the cards: it measures
everything it writes (accuracy with the evaluation code, sizes from the converted
flatbuffer, latency next to the MLPerf Tiny reference in one run). A card also shows the
model's Cortex-M4 / M7 numbers from ``benchmarks/results/mcu.json`` when they were measured
for its weights (``benchmarks/bench_mcu.py`` records their SHA-256 and rewrites the cards).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from . import zoo
from ._io import atomic_write
from .recipe import ZOO_DIR, load_recipe

#: A zoo model's second training step (fine-tuning the first's weights), beside its recipe.yaml.
FINETUNE_RECIPE = "finetune.yaml"
#: Written by ``benchmarks/bench_mcu.py``; read by the cards.
MCU_RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "mcu.json"


def _atomic_json(path: Path, data) -> None:
    atomic_write(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_confusion(path: Path, classes, metrics: dict) -> dict:
    """Move each split's confusion matrix out of ``metrics`` into ``path`` (one matrix row
    per line): a 102-class matrix pretty-printed in the registry took 10,000 lines."""
    matrices = {split: m.pop("confusion") for split, m in metrics.items() if "confusion" in m}
    body = ",\n".join(f"  {json.dumps(split)}: [\n" + ",\n".join(f"    {json.dumps(row)}" for row in matrix) + "\n  ]"
                       for split, matrix in sorted(matrices.items()))
    text = "{\n  \"classes\": " + json.dumps(list(classes)) + (",\n" + body if body else "") + "\n}\n"
    assert json.loads(text) == {"classes": list(classes), **matrices}
    atomic_write(path, text)
    return metrics


def _check_same_network(run_recipe, zoo_recipe) -> None:
    """``zoo.load(name)`` builds the network from the zoo's recipe: weights trained with another
    architecture would be published and then fail to load (or load into the wrong classes)."""
    differences = [f"{key}: run {a!r}, zoo {b!r}" for key, a, b in (
        ("input_shape", run_recipe.input_shape, zoo_recipe.input_shape),
        ("classes", run_recipe.classes, zoo_recipe.classes),
        *((f"model.{k}", run_recipe.model.get(k), zoo_recipe.model.get(k))
          for k in sorted(set(run_recipe.model) | set(zoo_recipe.model))),
    ) if a != b]
    if differences:
        raise ValueError(
            f"{run_recipe.path or run_recipe.name} builds a different network from "
            f"{zoo_recipe.path or zoo_recipe.name} ({'; '.join(differences)}): copy the run's recipe "
            f"to the zoo (keeping its comments as you see fit) before publishing it.")


def _check_finetune_recipe(run_recipe, name) -> None:
    """A run that fine-tunes earlier weights (``training.init_weights``) is reproduced by two
    commands; the second needs its recipe in the zoo, as ``zoo/<name>/finetune.yaml``."""
    path = zoo.ZOO_DIR / name / FINETUNE_RECIPE
    if not path.exists():
        raise ValueError(f"{run_recipe.path or run_recipe.name} fine-tunes {run_recipe.training['init_weights']}: "
                         f"copy the run's recipe to {path} (the card's second training step) before publishing it.")
    if load_recipe(path).to_dict() != run_recipe.to_dict():
        raise ValueError(f"{path} differs from the recipe the run used ({run_recipe.path or run_recipe.name}): "
                         "copy the run's recipe there before publishing it.")


def _step(command: str, summary: dict) -> dict:
    return {"command": command, **{k: summary.get(k) for k in
                                    ("epochs", "train_seconds", "images_per_second", "sessions", "schedule")},
            **({"teacher_view_cache": summary["teacher_view_cache"]} if summary.get("teacher_view_cache") else {})}


def teacher_runs(recipe) -> list:
    """What the recipe's run-folder teachers (``kd.teachers`` paths that are training runs of
    this project, e.g. ``runs/cifar10_teacher``) cost to train, from their ``summary.json``:
    trained once before the student, so not in its training time, but part of reproducing it."""
    from .training.teachers import resolve_teacher_path

    runs = []
    for spec in recipe.kd.get("teachers") or []:
        text = spec["path"] if isinstance(spec, dict) else str(spec)
        folder = resolve_teacher_path(text, Path(recipe.path).parent if recipe.path else None)
        summary_file = folder / "summary.json"
        if folder.is_dir() and summary_file.exists():
            summary = json.loads(summary_file.read_text())
            runs.append({"path": text, "best_val_accuracy": summary.get("best_val_accuracy"),
                         **{k: summary.get(k) for k in ("epochs", "train_seconds", "images_per_second", "sessions")}})
    return runs


def training_record(recipe, name: str, run_summary: dict) -> dict:
    """The registry's ``training`` entry: the command, epochs and cost of the run (and of its
    run-folder teachers, :func:`teacher_runs`). A fine-tuning run lists two steps, the run it
    started from (``training.init_weights``) and its own."""
    teachers = teacher_runs(recipe)
    record = _training_steps(recipe, name, run_summary)
    return {**record, "teacher_runs": teachers} if teachers else record


def _training_steps(recipe, name: str, run_summary: dict) -> dict:
    init = recipe.training.get("init_weights")
    if not init:
        return _step(f"glt-keras train {name}", run_summary)
    from .training.checkpoints import resolve_init_weights

    parent_summary_file = resolve_init_weights(init, key="training.init_weights").parent / "summary.json"
    parent = json.loads(parent_summary_file.read_text()) if parent_summary_file.exists() else {}
    steps = [_step(f"glt-keras train {name} --out {init}", parent),
             _step(f"glt-keras train zoo/{name}/{FINETUNE_RECIPE} --out runs/{name}_finetune", run_summary)]

    def total(key):
        values = [s[key] for s in steps]
        return None if None in values else round(sum(values), 1)

    return {"command": steps[0]["command"], "steps": steps, "epochs": total("epochs"),
            "train_seconds": total("train_seconds"), "sessions": total("sessions")}


def publish(run_dir, *, name=None, data_dir=None, bench_limit=None, repeats=50) -> dict:
    """Copy a run's best weights into ``zoo/<name>/``, measure them, write card + registry."""
    from .bench import anchors_dir, conversion_entry, plot_frontier, reference_entries, run_bench
    from .convert import strip_flatbuffer_strings, verify_tflite
    from .convert.sign_ties import separate_sign_ties
    from .convert.tflite import default_images
    from .layers.encoding import plot_transfer_curve
    from .models import load_weights, model_summary, save_weights
    from .training.evaluation import evaluate
    from .training.history import _thermometer
    from .training.splits import extra_eval_sets, load_splits

    run_dir = Path(run_dir)
    recipe = load_recipe(run_dir / "recipe.yaml")
    if recipe.pruning and (run_dir / "shrunk").is_dir():
        # best_weights.h5 here is the masked full-width network, not the model to ship.
        raise ValueError(f"{run_dir} is a pruning run: publish its shrunk network, "
                         f"`glt-keras zoo publish {run_dir / 'shrunk'}`.")
    name = name or recipe.name
    if name not in zoo.list_models():
        raise ValueError(f"{name} has no recipe under {ZOO_DIR}; add zoo/{name}/recipe.yaml first.")
    _check_same_network(recipe, zoo.get_recipe(name))
    if recipe.training.get("init_weights"):
        _check_finetune_recipe(recipe, name)
    best = run_dir / "best_weights.h5"
    if not best.exists():
        raise FileNotFoundError(f"{best} not found: has the run finished an epoch?")
    model = recipe.build_model()
    load_weights(model, best)
    # A sign threshold on an integer accumulator is decided by float rounding, differently in
    # Keras (per machine) and LCE; moved half a step off, exact arithmetic's decision is kept.
    ties = separate_sign_ties(model)
    if ties:
        print(f"{name}: moved {len(ties)} BatchNorm sign thresholds off integer accumulators "
              f"(e.g. {ties[0]}); exact arithmetic gives the same signs.")
    out_dir = ZOO_DIR / name
    weights_file = out_dir / f"{name}_weights.h5"
    save_weights(model, weights_file)

    splits = load_splits(recipe, data_dir=data_dir)
    metrics = {}
    for split_name, pair in (("val", splits.val), ("test", splits.test)):
        if pair is not None:
            result = evaluate(model, *pair, class_names=recipe.classes, image_size=recipe.input_shape[:2])
            metrics[split_name] = {k: result[k] for k in ("images", "accuracy", "mean_per_class_accuracy", "loss")}
            metrics[split_name]["dataset"] = (recipe.data.get(split_name) or {}).get("dataset", "holdout of train")
            metrics[split_name]["confusion"] = result["confusion"]

    # Extra evaluation sets named by the recipe (e.g. the in-domain held-out split).
    for key, (x, y) in extra_eval_sets(zoo.get_recipe(name), data_dir=data_dir).items():
        result = evaluate(model, x, y, class_names=recipe.classes, image_size=recipe.input_shape[:2])
        metrics[key] = {k: result[k] for k in ("images", "accuracy", "mean_per_class_accuracy", "loss")}
        metrics[key].update(dataset=key, confusion=result["confusion"])

    # One conversion: the bench runs it; its stripped copy (no tensor names or signatures,
    # what `glt-keras convert --strip-strings` writes) is verified and measured.
    real_layers = list(recipe.model.get("real_layers") or [])
    conversion = convert_for_zoo(model, real_layers, name=name)
    stripped = strip_flatbuffer_strings(conversion.flatbuffer)
    verify_tflite(stripped, model, default_images(model.input_shape[1:]))
    entry = conversion_entry(conversion, name, model, classes=recipe.classes)
    task = entry.task
    entries = [entry] + (reference_entries([task], anchors_dir(None), frontier=True) if task else [])
    bench = run_bench(entries, limit=bench_limit, repeats=repeats)
    if len(entries) > 1:  # a "frontier" of our model alone (no anchor for this task) says nothing
        plot_frontier(bench, out_dir / "frontier.png", task=task, highlight=name,
                      title=f"{name} among the anchors: accuracy vs .tflite size")
    teachers = teacher_scores(recipe, splits) if recipe.kd.get("teachers") else None
    ours = next(r for r in bench["rows"] if r["name"] == name)
    summary = model_summary(model)
    run_summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    for plot in ("curves.png", "thresholds.png", "pruning.png"):
        if (run_dir / plot).exists():
            shutil.copyfile(run_dir / plot, out_dir / plot)
    thermometer = _thermometer(model)
    if thermometer is not None:
        plot_transfer_curve(thermometer, out_dir / "thermometer.png", title=f"{name}: learned tone curve")
    for log in ("history.csv", "summary.json"):
        if (run_dir / log).exists():
            shutil.copyfile(run_dir / log, out_dir / f"train_{log}")

    write_confusion(out_dir / "confusion.json", recipe.classes, metrics)
    registry = zoo.registry()
    registry[name] = {
        "task": recipe.task,
        "weights": f"{name}/{weights_file.name}",
        "sha256": zoo.sha256_of(weights_file),
        "metrics": metrics,
        "size": {**summary, "tflite_bytes": ours["bytes"], "tflite_bytes_stripped": len(stripped)},
        "lce": {"all_binary": ours.get("float_convs", 1) == 0, "lce_bconv2d": ours.get("lce_bconv2d"),
                "real_layers": real_layers, "sign_ties_separated": len(ties)},
        "benchmark": {"machine": bench["machine"], "data": bench["data"], "rows": bench["rows"]},
        **({"teachers": teachers} if teachers else {}),
        "training": training_record(recipe, name, run_summary),
        "published": time.strftime("%Y-%m-%d"),
    }
    _atomic_json(zoo.REGISTRY_PATH, registry)
    write_card(name)
    return registry[name]


def convert_for_zoo(model, real_layers=(), *, name=None):
    """LCE conversion of a zoo model: every conv ``LceBconv2d``, except the convs of the
    ``real_layers`` a MixBin recipe keeps real-valued on purpose (``CONV_2D``); any other
    float conv is an error naming it."""
    from .convert import to_tflite

    name = name or model.name
    conversion = to_tflite(model, strict=not real_layers)
    expected = {f"{layer}_conv" for layer in real_layers}
    unexpected = [c.layer or c.op for c in conversion.report.float_convs if c.layer not in expected]
    if unexpected or len(conversion.report.float_convs) != len(expected):
        raise ValueError(f"{name}: float convolutions after conversion "
                         f"{[c.layer or c.op for c in conversion.report.float_convs]}, but the recipe keeps "
                         f"{sorted(real_layers) or 'none'} real-valued (unexpected: {unexpected}).")
    return conversion


def teacher_scores(recipe, splits) -> dict:
    """The recipe's teachers' own accuracy on its validation / test images (each teacher alone,
    then their average, as it taught): reported on the card, never used to train or select."""
    from .training.teachers import load_teachers

    scores = {}
    specs = recipe.kd["teachers"]
    groups = [[spec] for spec in specs] + ([specs] if len(specs) > 1 else [])
    for i, group in enumerate(groups):
        ensemble = load_teachers(group, classes=recipe.classes)
        label = " + ".join(t.name for t in ensemble.teachers)
        label = label if label not in scores else f"{label} (#{i + 1})"
        scores[label] = {split_name: float((ensemble.predict(pair[0]).argmax(-1) == pair[1]).mean())
                         for split_name, pair in (("val", splits.val), ("test", splits.test)) if pair is not None}
    return scores


def mcu_lines(name: str, sha256: str) -> list:
    """The card's Cortex-M section: the model's row of :data:`MCU_RESULTS` (instructions per
    inference, flash, RAM per CPU, with the external TFLM + CMSIS-NN reference cited as such)
    when that row measured the weights of SHA-256 ``sha256``; otherwise a line saying these
    weights were not measured (a row without a weights hash is never taken as current)."""
    report = json.loads(MCU_RESULTS.read_text(encoding="utf-8")) if MCU_RESULTS.exists() else {}
    row = next((r for r in report.get("rows", []) if r.get("model") == name), None)
    source = "[`benchmarks/results/mcu.json`](../../benchmarks/results/mcu.json)"
    lines = ["", "## Cortex-M4 / M7 (the C library of `glt-keras export-c`, under QEMU)", ""]
    if row is None or row.get("weights_sha256") != sha256:
        why = ("has no entry for it" if row is None else "measured other weights" if row.get("weights_sha256")
               else "does not record which weights it measured")
        return lines + [f"Not measured for these weights: {source} {why}. Measure with "
                        "`python benchmarks/bench_mcu.py --readme README.md`.", ""]
    lines += ["| library | CPU | instructions / inference | flash bytes | RAM bytes (static + stack) |",
              "|---|---|---:|---:|---:|"]
    for cpu, e in row["cpus"].items():
        lines.append(f"| {name} (this project) | {cpu.replace('cortex', 'Cortex').replace('-m', '-M')} "
                     f"(QEMU `{e['machine']}`) | {e['instructions_per_inference']:,} | {e['flash_bytes']:,} | "
                     f"{e['ram_bytes']:,} ({e['static_ram_bytes']:,} + {e['stack_bytes']:,}) |")
    ref = report.get("external_reference")
    if ref:
        lines.append(f"| _external:_ {ref['name']} | Cortex-M4 | {ref['instructions_m4']:,} | "
                     f"{ref['flash_bytes']:,} | ~{ref['ram_bytes_approx']:,} |")
    host = "identical" if row["argmax_host_equal_keras"] else "DIFFERENT"
    lines += ["", f"- Measured by `{row.get('command') or report.get('command', 'benchmarks/bench_mcu.py')}` ({source}) for these "
              f"weights (SHA-256 `{sha256}`) on {row['data']}: median instructions per `glt_infer()` call "
              "under `qemu-system-arm -icount shift=0` (instructions, not cycles: no pipeline, caches or flash "
              "wait states are modelled), `-O2`. Flash = .text + .rodata + .data of the library; RAM = its static "
              f"arena + the measured stack of `glt_infer`. Argmax of the host build vs Keras: {host}."]
    if ref:
        lines.append(f"- _External reference, not measured by this project_ (quoted from issue #17): {ref['name']}; "
                     f"{ref['versions']}; {ref['method']}.")
    return lines + [""]


def _pct(v):
    return "n/a" if v is None else f"{100 * v:.2f}%"


def write_card(name: str) -> Path:
    """Generate ``zoo/<name>/README.md`` from the recipe and the registry entry."""
    recipe = zoo.get_recipe(name)
    entry = zoo.registry().get(name)
    lines = [f"# {name}", "", "_Generated by `glt-keras zoo publish`; do not edit by hand._", ""]
    lines += [recipe.description.strip(), ""] if recipe.description else []
    lines += [
        "| | |", "|---|---|",
        f"| task | {recipe.task} |",
        f"| classes (output order) | {', '.join(recipe.classes)} |",
        f"| input | {recipe.input_shape[0]}x{recipe.input_shape[1]}x{recipe.input_shape[2]} raw RGB pixels in [0, 255] (uint8 or float32), NHWC; no normalisation: the thermometer is the preprocessing |",
        f"| data | train: {json.dumps(recipe.data.get('train'))}; validation: {json.dumps(recipe.data.get('val') or {'holdout': recipe.data.get('holdout')})}; test: {json.dumps(recipe.data.get('test'))} |",
        "| recipe | [`recipe.yaml`](recipe.yaml) |",
    ]
    if entry is None:
        lines += ["", f"No trained weights yet. Train and publish with `{zoo.publish_commands(name)}`."]
    else:
        lines += ["", "## Use", "", "```python",
                  "import glt_keras.zoo as zoo",
                  f"model = zoo.load(\"{name}\")  # raw RGB pixels 0..255 in, {len(recipe.classes)} scores out",
                  "import larq_compute_engine as lce",
                  "fb = lce.convert_keras_model(model)  # fully binary: every conv LceBconv2d",
                  "from larq_compute_engine.tflite.python.interpreter import Interpreter",
                  "scores = Interpreter(fb, use_indirect_bgemm=True).predict(pixels)",
                  "```"]
        if _has_grouped_convs(recipe):
            lines += ["", "LCE's interpreter runs this model's grouped binary convolutions only with "
                      "`use_indirect_bgemm=True` (or `use_reference_bconv=True`); with its default options it "
                      "fails to prepare them (\"Grouped binary convolutions are not supported with this kernel\"). "
                      f"`glt-keras convert {name} -o {name}.tflite` writes a flatbuffer verified against Keras."]
        m, s, t = entry["metrics"], entry["size"], entry["training"]
        lines += ["", "## Accuracy (`glt-keras eval`)", "", "| split | images | accuracy | mean per-class | loss |", "|---|---|---|---|---|"]
        for split, v in m.items():
            lines.append(f"| {split} ({v['dataset']}) | {v['images']} | {_pct(v['accuracy'])} | "
                         f"{_pct(v['mean_per_class_accuracy'])} | {v['loss']:.4f} |")
        if entry.get("teachers"):
            lines += ["", "## Teachers (their own accuracy on the same images; they labelled the training views)", "",
                      "| teacher | " + " | ".join(next(iter(entry["teachers"].values()))) + " |",
                      "|---|" + "---|" * len(next(iter(entry["teachers"].values())))]
            for label, by_split in entry["teachers"].items():
                lines.append(f"| {label} | " + " | ".join(_pct(v) for v in by_split.values()) + " |")
        lines += ["", "## Size and compute", "", "| | |", "|---|---|",
                  f"| parameters | {s['params']:,} ({s['binary_params']:,} binary, {s['real_params']:,} real-valued) |",
                  f"| binary weight bytes | {s['binary_weight_bytes']:,} |",
                  f"| `.tflite` bytes (LCE) | {s['tflite_bytes']:,}"
                  + (f"; {s['tflite_bytes_stripped']:,} with `glt-keras convert --strip-strings` (no tensor names or signatures)"
                     if s.get("tflite_bytes_stripped") else "") + " |",
                  f"| MACs | {s['macs']:,} ({s['binary_macs']:,} binary) |",
                  (f"| every conv `LceBconv2d` | {'yes' if entry['lce']['all_binary'] else 'NO'} ({entry['lce']['lce_bconv2d']} binary convs) |"
                   if not entry["lce"].get("real_layers") else
                   f"| precision | mixed (MixBin): {', '.join(entry['lce']['real_layers'])} real-valued (`CONV_2D`), "
                   f"{entry['lce']['lce_bconv2d']} convs `LceBconv2d` |"),
                  "", "## Latency and references (one run, same images, 1 thread)", "",
                  "| model | kind | bytes | accuracy | median ms / image | ratio |", "|---|---|---|---|---|---|"]
        for row in entry["benchmark"]["rows"]:
            ratio = ", ".join(f"{v:.2f}x vs {k}" for k, v in row.get("latency_ratio", {}).items())
            metric = row.get("metric", "accuracy")
            accuracy = _pct(row.get(metric)) + (" (mean per class)" if metric != "accuracy" and row.get(metric) else "")
            lines.append(f"| {row['name']} | {row['kind']} | {row['bytes']:,} | {accuracy} | "
                         f"{row['median_ms']:.3f} | {ratio} |")
        lines += ["", f"Data: {json.dumps(entry['benchmark']['data'])}; machine: {entry['benchmark']['machine']['platform']}, "
                  f"{entry['benchmark']['machine']['cpus']} CPUs (load average {entry['benchmark']['machine']['load_average']})."]
        lines += mcu_lines(name, entry["sha256"])
        lines += ["## Training", ""] + training_lines(t)
        for plot, caption in (("frontier.png", "Accuracy vs .tflite bytes, beside every anchor model"),
                              ("thermometer.png", "Learned thermometer (global tone curve)"),
                              ("thresholds.png", "Thresholds per epoch"), ("curves.png", "Loss and accuracy"),
                              ("pruning.png", "Pruned fraction per epoch")):
            if (ZOO_DIR / name / plot).exists():
                lines += [f"![{caption}]({plot})", ""]
        if (ZOO_DIR / name / "confusion.json").exists():
            lines += ["Confusion matrices (rows: true class, columns: predicted; per evaluated split): "
                      "[`confusion.json`](confusion.json).", ""]
        lines += [f"Weights: `{entry['weights']}`, SHA-256 `{entry['sha256']}`.", ""]
    return atomic_write(ZOO_DIR / name / "README.md", "\n".join(lines))


def _has_grouped_convs(recipe) -> bool:
    from .models import TOPOLOGIES

    groups = recipe.model.get("groups") or TOPOLOGIES.get(recipe.model.get("topology", "glt96"), {}).get("groups", ())
    return any(int(g) > 1 for g in groups)


def training_lines(training: dict) -> list:
    """The card's training paragraph: one run, or the two steps of a fine-tuned model."""
    def cost(step):
        return (f"{step['epochs']} epochs, {step['train_seconds']} s of training ({step['images_per_second']} "
                f"images/s on a 2-core CPU, {step['sessions']} session(s))")

    log = "Per-epoch log: [`train_history.csv`](train_history.csv)."
    cache = next((s["teacher_view_cache"] for s in [training, *training.get("steps", [])]
                  if s.get("teacher_view_cache")), None)
    cache_line = [] if not cache else [
        f"The teachers' outputs came from a view cache (`kd.view_cache`): {cache['views']:,} fixed augmented views "
        f"labelled once" + (f" in {cache['fill_seconds']:.1f} s ({cache['workers']} workers)" if cache.get("fill_seconds") else "")
        + ", not counted in the training time above (shared by the runs that use the same photos, views and teachers).", ""]
    teacher_lines = [
        f"The teacher `{t['path']}` (a training run of this project; its recipe is `{t['path']}/recipe.yaml`) was "
        f"trained once beforehand: {cost(t)}, {_pct(t['best_val_accuracy'])} on its held-out images; not counted above, "
        "and reused by every student that names it." for t in training.get("teacher_runs", [])]
    cache_line += teacher_lines + ([""] if teacher_lines else [])
    if "steps" not in training:
        return [f"{training_commands(training)} — {cost(training)}. {log}", ""] + cache_line
    first, second = training["steps"]
    return [f"Two steps, {training['epochs']} epochs and {training['train_seconds']} s of training in all:", "",
            f"1. {training_commands(first)} — {cost(first)};",
            f"2. fine-tuning its best weights with [`{FINETUNE_RECIPE}`]({FINETUNE_RECIPE}): "
            f"{training_commands(second)} — {cost(second)}. Per-epoch log of this step: "
            "[`train_history.csv`](train_history.csv).", ""] + cache_line


def training_commands(training: dict) -> str:
    """The card's training command; a run whose ``--epochs`` was extended on resume lists
    each step, since the recipe's command alone plans one cosine over all epochs."""
    schedule = training.get("schedule") or []
    if len(schedule) < 2:
        return f"`{training['command']}`"
    steps = [f"`{training['command']} --epochs {schedule[0]['planned_epochs']}`"]
    for previous, step in zip(schedule, schedule[1:]):
        steps.append(f"then `{training['command']} --resume --epochs {step['planned_epochs']}` (from epoch "
                     f"{step['first_epoch']}, the cosine learning rate re-planned over {step['planned_epochs']} "
                     f"instead of {previous['planned_epochs']} epochs: a warm restart)")
    return ", ".join(steps)


def cmd(args):
    if args.action == "list":
        published = zoo.registry()
        print("| model | task | input | accuracy | .tflite bytes |\n|---|---|---|---|---|")
        for name in zoo.list_models():
            r = zoo.get_recipe(name)
            e = published.get(name)
            acc = "not trained" if e is None else "not measured"
            metrics = (e or {}).get("metrics") or {}
            for split in ("test", "val"):
                if split in metrics:
                    m = metrics[split]
                    acc = f"{_pct(m['accuracy'])} ({split})"
                    if abs(m.get("mean_per_class_accuracy", m["accuracy"]) - m["accuracy"]) > 0.005:
                        acc += f", {_pct(m['mean_per_class_accuracy'])} mean per class"  # unbalanced test sets
                    break
            size = f"{e['size']['tflite_bytes']:,}" if e and "size" in e else "-"
            print(f"| {name} | {r.task} | {'x'.join(map(str, r.input_shape))} | {acc} | {size} |")
    elif args.action == "card":
        if not args.target:
            raise ValueError("zoo card needs a model name.")
        print(zoo.card(args.target)["markdown"])
    elif args.action == "publish":
        if not args.target:
            raise ValueError("zoo publish needs a run folder.")
        entry = publish(args.target, name=args.name, data_dir=args.data_dir)
        print(json.dumps({k: entry[k] for k in ("weights", "sha256", "metrics")}, indent=2)[:3000])
    return 0


def register(subparsers):
    p = subparsers.add_parser("zoo", help="list zoo models, print a card, publish a training run")
    p.add_argument("action", choices=["list", "card", "publish"])
    p.add_argument("target", nargs="?", help="model name (card) or run folder (publish)")
    p.add_argument("--name", help="zoo name to publish under (default: the run's recipe name)")
    p.add_argument("--data-dir")
    p.set_defaults(func=cmd)
