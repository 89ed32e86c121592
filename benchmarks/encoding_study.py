"""The encoding study (issue 19): where does a learned thermometer (GLT) pay?

One network per data set, trained again for every cell of
    recipe x sensor condition x encoding x levels x seed
with the same schedule, and scored on the recipe's test split (CIFAR-10: its 10,000 test images;
Imagenette: its val split) with the weights selected on the held-out part of the training split.

Encodings (``levels`` = +-1 planes per colour channel, the first convolution's input width):
  binary_planes    natural binary code: the top ``levels`` bits of each pixel (8: every bit)
  fixed            thermometer at uniform thresholds 255 k / (levels + 1)
  fixed_quantiles  thermometer fixed at the per-channel quantiles k / (levels + 1) of the
                   training pixels (training images only, after the sensor condition; exact,
                   glt_keras.data.pixel_stats.quantile_thresholds)
  glt              learned thermometer from the uniform start (the zoo recipes' setting)
  glt_quantiles    (not in the default set) learned, starting at the quantile thresholds

Sensor conditions (glt_keras.data.sensor; a recipe's data.sensor, applied to the raw uint8 pixels
of train, validation and test alike): normal, under_exposed (3 stops under: round(0.389 p)),
over_exposed (2 stops over, clipped: min(255, round(1.878 p))), low_contrast
(round(127.5 + (p - 127.5) / 4)). The study trains without the recipes' photometric
augmentation (brightness / contrast jitter), so the encodings see each condition's pixel
distribution; crops and flips stay.

Every finished cell is added to the results JSON at once (atomically, under a lock): a run stopped
at any point and started again with the same command continues with the first unfinished cell
(which resumes from its last epoch checkpoint) and never trains a recorded cell again. Cells are
ordered seed by seed, so a partial study already has one seed of every cell. Several processes may
share one results file (``--shard I/N``). Each run, and ``--report``, rewrites the table (markdown:
mean +- sample standard deviation over seeds, and whether the ranking of the encodings by mean
validation accuracy is the same at each of the last 3 epochs) and the figure (accuracy by encoding
x levels; for each condition the learned tone curves next to the training pixels' histogram).

The networks are the study's own recipes, not the zoo's: recipes/encoding_study_cifar10.yaml (the
zoo's glt32 at half width) and recipes/encoding_study_imagenette.yaml (glt96 at about half width, in
vww_binary_small's size class); an edited zoo recipe (cifar10_binary becomes a distilled one) never
changes the study's base. The full grid (4 conditions x 4 encodings x 3 levels x 3 seeds = 144 cells
per data set) is more than this 2-core machine can give; the plan is the three levels under the
normal condition and one level (4) under each sensor condition, 3 seeds each (72 cells per data set),
one pair of commands per data set, run again after any stop; then the table and figure of both:

    nice -n 19 python benchmarks/encoding_study.py recipes/encoding_study_cifar10.yaml --conditions normal
    nice -n 19 python benchmarks/encoding_study.py recipes/encoding_study_cifar10.yaml \
        --conditions under_exposed over_exposed low_contrast --levels 4
    (the same two with recipes/encoding_study_imagenette.yaml)
    python benchmarks/encoding_study.py --report

Default schedules (SCHEDULES below): CIFAR-10 10 epochs of 20,000 images (200,000 images, 4.4
passes over its 45,000 training images); Imagenette 24 epochs of its 8,522 training images (204,500
images). If the table's *stable* column says "no", the ranking was still moving ("ties": only
encodings within noise of each other swapped places): run again with a
larger --epochs (new cells, beside the recorded ones).

Cost (benchmarks/bench_training_throughput.py --recipe RECIPE --variants mixed_bfloat16, idle, 2
cores, bfloat16 on this AMX machine): about 470-490 training images/s for the Imagenette network
(so ~7 minutes of training a cell, ~9 with validation and test: ~11 hours for its 72 cells) and
more for the CIFAR network; a training run's input pipeline and per-epoch validation make the
real rate lower than the benchmark's. A first pass (seed 0 only) is a third of that:

    nice -n 19 python benchmarks/encoding_study.py recipes/encoding_study_cifar10.yaml --seeds 0 --conditions normal

Smoke run (a minute or two, its own results file):

    python benchmarks/encoding_study.py recipes/encoding_study_cifar10.yaml --epochs 1 --steps-per-epoch 2 --subset 256 \\
        --conditions under_exposed --levels 2 --seeds 0 --results /tmp/study.json
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CONDITIONS = ("normal", "under_exposed", "over_exposed", "low_contrast")
ENCODINGS = ("binary_planes", "fixed", "fixed_quantiles", "glt", "glt_quantiles")
DEFAULT_ENCODINGS = ("binary_planes", "fixed", "fixed_quantiles", "glt")
LEVELS = (8, 4, 2)
SEEDS = (0, 1, 2)
#: recipe -> default schedule (other recipes: their own epoch_images, --epochs required).
SCHEDULES = {
    "encoding_study_cifar10": {"epochs": 10, "epoch_images": 20000},
    "encoding_study_imagenette": {"epochs": 24, "epoch_images": None},
}
#: The study's networks (recipe files, see the module docstring).
DEFAULT_RECIPES = tuple(str(ROOT / "recipes" / f"{name}.yaml") for name in SCHEDULES)
DEFAULT_RESULTS = ROOT / "benchmarks" / "results" / "encoding_study.json"
#: The ranking check: the last this many epochs.
STABLE_EPOCHS = 3


# ----------------------------------------------------------------------------- cells
@dataclass(frozen=True)
class Cell:
    recipe: str
    condition: str
    encoding: str
    levels: int
    seed: int
    epochs: int
    epoch_images: int | None = None
    subset: int | None = None
    steps_per_epoch: int | None = None

    @property
    def schedule(self) -> str:
        """The training budget, part of the key: cells of different budgets never mix."""
        s = f"e{self.epochs}" + (f"x{self.epoch_images}" if self.epoch_images else "")
        if self.subset:
            s += f"_sub{self.subset}"
        if self.steps_per_epoch:
            s += f"_steps{self.steps_per_epoch}"
        return s

    @property
    def key(self) -> str:
        return f"{self.recipe}/{self.condition}/{self.encoding}/L{self.levels}/seed{self.seed}/{self.schedule}"

    @property
    def run_name(self) -> str:
        return self.key.replace("/", "_")


def base_hash(base) -> str:
    """The base recipe's network, data and training settings (a recipe edited between sessions
    gives other cells, which the study refuses to mix with the recorded ones)."""
    d = base.to_dict()
    d["training"] = {k: v for k, v in d["training"].items() if k not in ("epochs", "seed")}  # the study's own
    text = json.dumps({k: d[k] for k in ("input_shape", "classes", "model", "data", "training", "kd")},
                      sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def cell_recipe(base, cell: Cell, thresholds=None):
    """The base recipe with the cell's encoding, levels, sensor condition, schedule and seed.

    ``thresholds``: ``(channels, levels)`` quantile thresholds for the ``*_quantiles`` encodings."""
    encoding = {"fixed_quantiles": "fixed", "glt_quantiles": "glt"}.get(cell.encoding, cell.encoding)
    kwargs = dict(base.model.get("encoding_kwargs") or {})
    kwargs.pop("initial_thresholds", None)
    if cell.encoding.endswith("_quantiles"):
        if thresholds is None:
            raise ValueError(f"{cell.key}: needs the training pixels' quantile thresholds.")
        kwargs["initial_thresholds"] = [[float(v) for v in row] for row in thresholds]
    model = {"encoding": encoding, "levels": int(cell.levels), "encoding_kwargs": kwargs or None}
    augment = {k: v for k, v in (base.data.get("augment") or {}).items() if k not in ("brightness", "contrast")}
    data = {"sensor": cell.condition, "augment": augment or None}
    if cell.epoch_images:
        data["epoch_images"] = int(cell.epoch_images)
    return base.with_changes(name=cell.run_name, model=model, data=data,
                             training={"epochs": int(cell.epochs), "seed": int(cell.seed), "threshold_init": "uniform"})


def plan_cells(recipes, conditions, encodings, levels, seeds, *, epochs=None, epoch_images=None,
               subset=None, steps_per_epoch=None) -> list:
    """Every cell, seed by seed (a partial study has one seed of everything first)."""
    cells = []
    for seed in seeds:
        for name in recipes:
            default = SCHEDULES.get(name, {})
            e = epochs or default.get("epochs")
            if not e:
                raise ValueError(f"recipe {name}: no default schedule; give --epochs.")
            ei = epoch_images if epoch_images is not None else default.get("epoch_images")
            for condition in conditions:
                for level in levels:
                    for encoding in encodings:
                        cells.append(Cell(name, condition, encoding, int(level), int(seed), int(e),
                                          ei, subset, steps_per_epoch))
    return cells


# ----------------------------------------------------------------------------- results file
def load_results(path) -> dict:
    path = Path(path)
    if not path.exists():
        return {"version": 1, "cells": {}, "histograms": {}, "commands": []}
    results = json.loads(path.read_text())
    for key, empty in (("cells", {}), ("histograms", {}), ("commands", [])):
        results.setdefault(key, empty)
    return results


@contextlib.contextmanager
def _locked(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def update_results(path, change) -> dict:
    """Read the results file, ``change(results)`` it, and write it back atomically, under a lock
    (processes sharing the file never lose each other's cells). Returns the new results."""
    from glt_keras._io import atomic_write

    path = Path(path)
    with _locked(path):
        results = load_results(path)
        change(results)
        atomic_write(path, json.dumps(results, indent=1))
    return results


# ----------------------------------------------------------------------------- one cell
def train_cell(recipe, run_dir: Path, *, data_dir=None, subset=None, steps_per_epoch=None, verbose=2) -> dict:
    """Train (or resume) one cell's run; returns the run summary."""
    from glt_keras.training.run import train

    return train(recipe, out_dir=run_dir, resume=True, data_dir=data_dir, subset=subset,
                 steps_per_epoch=steps_per_epoch, verbose=verbose)


def _val_history(run_dir: Path) -> list:
    path = run_dir / "history.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [round(float(r["val_accuracy"]), 5) for r in csv.DictReader(f) if r.get("val_accuracy")]


def run_cell(base, cell: Cell, *, out: Path, results_path: Path, data_dir=None, verbose=2,
             keep_checkpoints=False) -> dict:
    """Train, evaluate and record one cell. Returns its row."""
    import numpy as np

    from glt_keras.data.pixel_stats import pixel_histogram, quantile_thresholds
    from glt_keras.models import load_weights, model_summary
    from glt_keras.training.evaluation import evaluate
    from glt_keras.training.splits import load_splits

    # The cell's splits (its seed's holdout, its sensor condition): the encodings change nothing here.
    splits = load_splits(cell_recipe(base, Cell(**{**asdict(cell), "encoding": "fixed"})),
                         data_dir=data_dir, subset=cell.subset)
    stats_key = f"{cell.recipe}/{cell.condition}"
    thresholds = None
    if cell.encoding.endswith("_quantiles") or stats_key not in load_results(results_path)["histograms"]:
        histogram = pixel_histogram(splits.train[0])  # training images only
        if cell.encoding.endswith("_quantiles"):
            thresholds = quantile_thresholds(histogram=histogram, levels=cell.levels)
        update_results(results_path, lambda r: r["histograms"].setdefault(stats_key, histogram.tolist()))
    train_images = int(len(splits.train[1]))
    splits.train = None  # train() loads its own copy
    recipe = cell_recipe(base, cell, thresholds)
    run_dir = out / cell.run_name
    t0, cpu0 = time.time(), time.process_time()
    summary = train_cell(recipe, run_dir, data_dir=data_dir, subset=cell.subset,
                         steps_per_epoch=cell.steps_per_epoch, verbose=verbose) or {}
    cpu_seconds = time.process_time() - cpu0
    model = recipe.build_model()
    load_weights(model, run_dir / "best_weights.h5")
    row = {**asdict(cell), "key": cell.key, "schedule": cell.schedule, "base_hash": base_hash(base),
           "binary_weight_bytes": model_summary(model)["binary_weight_bytes"],
           "train_images": train_images,
           "train_seconds": summary.get("train_seconds", round(time.time() - t0, 1)),
           # This session's share only when a cell was resumed across sessions.
           "cpu_seconds": round(cpu_seconds, 1),
           "val_history": _val_history(run_dir)}
    for split, pair in (("val", splits.val), ("test", splits.test)):
        if pair is not None:
            scores = evaluate(model, *pair, class_names=recipe.classes, image_size=recipe.input_shape[:2])
            row[f"{split}_accuracy"] = scores["accuracy"]
            row[f"{split}_mean_per_class_accuracy"] = scores["mean_per_class_accuracy"]
    encoder = model.get_layer("encoding")
    row["thresholds"] = (np.round(encoder.effective_thresholds(), 3).tolist()
                         if hasattr(encoder, "effective_thresholds") else None)
    row["initial_thresholds"] = None if thresholds is None else np.round(thresholds, 4).tolist()
    row["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    update_results(results_path, lambda r: r["cells"].__setitem__(cell.key, row))
    if not keep_checkpoints:  # the recorded cell is never trained again: free the disk
        for name in ("checkpoints", "tensorboard"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
    return row


# ----------------------------------------------------------------------------- table
def mean_spread(values) -> tuple:
    """Mean and sample standard deviation (``ddof=1``; ``nan`` for a single value)."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def _metric(row: dict) -> float | None:
    return row.get("test_accuracy", row.get("val_accuracy"))


def _groups(results: dict) -> dict:
    """{(recipe, schedule): [rows]} in a stable order."""
    groups = {}
    for row in results["cells"].values():
        groups.setdefault((row["recipe"], row["schedule"]), []).append(row)
    return dict(sorted(groups.items()))


def _order(values, preferred):
    return [v for v in preferred if v in values] + sorted(v for v in values if v not in preferred)


def ranking_stable(rows, encodings, last=STABLE_EPOCHS):
    """Whether the encodings' order by mean validation accuracy (over seeds) is the same at each
    of the last ``last`` epochs: ``"yes"``; ``"ties"`` when only pairs within noise swap places
    (at the last epoch their means differ by at most 2 standard errors of the difference, from
    the seeds' spread: the schedule cannot order them, a longer one would not either without
    more seeds); ``"no"`` when a pair apart by more than that swaps (or a swapping pair has a
    single seed, so its noise is unknown); ``None`` when some run has fewer epochs."""
    hist = {}
    for enc in encodings:
        hist[enc] = [r["val_history"] for r in rows if r["encoding"] == enc]
        if not hist[enc] or any(len(h) < last for h in hist[enc]):
            return None
    means = [{enc: sum(h[-back] for h in hs) / len(hs) for enc, hs in hist.items()} for back in range(1, last + 1)]
    swapped = [(a, b) for i, a in enumerate(encodings) for b in encodings[i + 1:]
               if len({(m[a] > m[b]) - (m[a] < m[b]) for m in means}) > 1]
    if not swapped:
        return "yes"

    def apart(a, b):
        (ma, sa), (mb, sb) = mean_spread([h[-1] for h in hist[a]]), mean_spread([h[-1] for h in hist[b]])
        if math.isnan(sa) or math.isnan(sb):
            return True
        return abs(ma - mb) > 2 * math.sqrt(sa ** 2 / len(hist[a]) + sb ** 2 / len(hist[b]))

    return "no" if any(apart(a, b) for a, b in swapped) else "ties"


def build_table(results: dict, *, metric_name: str = "test accuracy") -> str:
    """One markdown table: a row per (recipe, condition, levels), a column per encoding with
    ``mean ± sd (n)`` of the test accuracy in % over seeds (sd: sample standard deviation), the
    best mean in bold, and whether the ranking held over the last epochs."""
    groups = _groups(results)
    if not groups:
        return "_No finished cell yet._\n"
    encodings = _order({r["encoding"] for rows in groups.values() for r in rows}, ENCODINGS)
    lines = []
    for (recipe, schedule), rows in groups.items():
        r0 = rows[0]
        budget = f"{r0['epochs']} epoch(s)" + (f" x {r0['epoch_images']:,} images" if r0.get("epoch_images") else
                                                f" x {r0.get('train_images', 0):,} images")
        widest = max(rows, key=lambda r: r["levels"])
        size = widest.get("binary_weight_bytes")
        lines.append(f"- **{recipe}** (`{schedule}`): {budget}" + (
            f"; {size:,} binary weight bytes at {widest['levels']} levels" if size else ""))
    lines += ["", f"{metric_name.capitalize()} (%), mean ± sample standard deviation over seeds (number of "
              f"seeds); best mean of each row in bold. *Stable*: the encodings rank the same by mean validation "
              f"accuracy at each of the last {STABLE_EPOCHS} epochs (*yes*), only encodings within noise of "
              f"each other swap places (*ties*: at the last epoch their means differ by at most 2 standard "
              f"errors of the difference over seeds), or encodings apart by more than that swap (*no*).", ""]
    header = ["data", "condition", "levels", *encodings, "stable"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (recipe, schedule), rows in groups.items():
        conditions = _order({r["condition"] for r in rows}, CONDITIONS)
        for condition in conditions:
            for level in sorted({r["levels"] for r in rows if r["condition"] == condition}, reverse=True):
                cell_rows = [r for r in rows if r["condition"] == condition and r["levels"] == level]
                stats = {}
                for enc in encodings:
                    values = [_metric(r) for r in cell_rows if r["encoding"] == enc and _metric(r) is not None]
                    if values:
                        stats[enc] = (*mean_spread([100 * v for v in values]), len(values))
                best = max((s[0] for s in stats.values()), default=None)
                cells = []
                for enc in encodings:
                    if enc not in stats:
                        cells.append("")
                        continue
                    mean, sd, n = stats[enc]
                    text = f"{mean:.2f}" if math.isnan(sd) else f"{mean:.2f} ± {sd:.2f}"
                    if len(stats) > 1 and mean == best:
                        text = f"**{text}**"
                    cells.append(f"{text} ({n})")
                present = [e for e in encodings if e in stats]
                stable = ranking_stable(cell_rows, present) if len(present) > 1 else None
                lines.append("| " + " | ".join([recipe, condition, str(level), *cells, stable or ""]) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- figure
def tone_curve(thresholds) -> "np.ndarray":
    """Fraction of +1 planes for every pixel value 0..255 (mean over channels) of effective
    thresholds ``(channels, levels)``: the encoding's tone curve."""
    import numpy as np

    t = np.asarray(thresholds, float)
    p = np.arange(256)[:, None, None]
    return (p >= t[None]).sum(-1).mean(-1) / t.shape[-1]


def plot_study(results: dict, path) -> str | None:
    """The study's figure: for each recipe two columns, one row per condition: test accuracy by
    levels (one line per encoding, error bars: sample standard deviation over seeds), and the
    learned (GLT) tone curves, mean over seeds and channels, over the training pixels' histogram."""
    import os

    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(results)
    if not groups:
        return None
    conditions = _order({r["condition"] for rows in groups.values() for r in rows}, CONDITIONS)
    encodings = _order({r["encoding"] for rows in groups.values() for r in rows}, ENCODINGS)
    colours = dict(zip(ENCODINGS, ["tab:gray", "tab:blue", "tab:green", "tab:red", "tab:purple"]))
    fig, axes = plt.subplots(len(conditions), 2 * len(groups), squeeze=False,
                             figsize=(4.2 * 2 * len(groups), 2.9 * len(conditions)), dpi=100)
    for g, ((recipe, schedule), rows) in enumerate(groups.items()):
        levels_all = sorted({r["levels"] for r in rows})
        for i, condition in enumerate(conditions):
            ax, tone = axes[i, 2 * g], axes[i, 2 * g + 1]
            crow = [r for r in rows if r["condition"] == condition]
            for j, enc in enumerate(encodings):
                xs, ms, sds = [], [], []
                for level in levels_all:
                    values = [100 * _metric(r) for r in crow if r["encoding"] == enc and r["levels"] == level]
                    if values:
                        mean, sd = mean_spread(values)
                        xs.append(levels_all.index(level) + 0.06 * (j - (len(encodings) - 1) / 2))
                        ms.append(mean)
                        sds.append(0.0 if math.isnan(sd) else sd)
                if xs:
                    ax.errorbar(xs, ms, yerr=sds, marker="o", ms=3.5, capsize=2, lw=1.2,
                                color=colours.get(enc), label=enc)
            ax.set_xticks(range(len(levels_all)), [str(v) for v in levels_all])
            ax.set_xlim(-0.5, len(levels_all) - 0.5)
            ax.set_xlabel("levels (planes per channel)")
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(f"{recipe}: {condition}", fontsize=9)
            ax.grid(alpha=0.3)
            # Tone curves over the histogram.
            hist = results["histograms"].get(f"{recipe}/{condition}")
            pixels = np.arange(256)
            if hist is not None:
                counts = np.asarray(hist, float).sum(0)
                # 64 bins of 4 values: rescaled pixels (under / over-exposure) leave empty values between.
                density = counts.reshape(64, 4).sum(1) / counts.sum()
                twin = tone.twinx()
                twin.bar(np.arange(64) * 4, density, width=4, align="edge", color="0.82", lw=0)
                twin.set_yticks([])
                # A saturated bin (over-exposure: 255) would flatten the rest: cut it, say its share.
                cap = 1.15 * np.sort(density)[-3]
                twin.set_ylim(0, cap if density.max() > cap else None)
                if density.max() > cap:
                    top = int(density.argmax()) * 4
                    twin.text(0.98, 0.97, f"{density.max():.0%} in {top}..{top + 3}",
                              transform=twin.transAxes, ha="right", va="top", fontsize=7, color="0.35")
                tone.plot(pixels, np.cumsum(counts) / counts.sum(), color="k", ls="--", lw=0.8,
                          label="pixel CDF")
                tone.set_zorder(twin.get_zorder() + 1)
                tone.patch.set_visible(False)
            tone.plot(pixels, pixels / 255.0, color="k", ls=":", lw=0.8, label="uniform")
            for k, level in enumerate(levels_all):
                curves = [tone_curve(r["thresholds"]) for r in crow
                          if r["encoding"] == "glt" and r["levels"] == level and r.get("thresholds")]
                if curves:
                    tone.step(pixels, np.mean(curves, 0), where="post", lw=1.3,
                              color=["tab:red", "tab:orange", "tab:olive", "tab:cyan"][k % 4],
                              label=f"GLT, {level} levels")
            tone.set_xlim(0, 255)
            tone.set_ylim(0, 1.02)
            tone.set_xlabel("pixel value")
            tone.set_ylabel("share of +1 planes")
            tone.set_title(f"learned tone curve, {condition} (grey: pixel histogram)", fontsize=9)
            if i == 0:
                ax.legend(fontsize=7, loc="lower right")
                tone.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = str(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


README_START, README_END = "<!-- encoding-study:start -->", "<!-- encoding-study:end -->"


def write_report(results: dict, results_path: Path, table_path=None, figure_path=None, *, readme=None,
                 command: str = "python benchmarks/encoding_study.py --report") -> str:
    """Write the table (.md) and figure (.png) beside ``results_path``; with ``readme``, also
    replace that file's table between the encoding-study markers."""
    from glt_keras._io import atomic_write

    table = build_table(results)
    atomic_write(table_path or results_path.with_suffix(".md"), table)
    plot_study(results, figure_path or results_path.with_suffix(".png"))
    if readme is not None:
        from glt_keras.bench import update_readme

        update_readme(readme, table.rstrip("\n") + "\n", command=command, start=README_START, end=README_END)
    return table


# ----------------------------------------------------------------------------- main
def _shard(text):
    index, _, count = text.partition("/")
    index, count = int(index), int(count)
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"--shard I/N needs 0 <= I < N, got {text}")
    return index, count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="*", default=[], help=f"zoo names or recipe files (default: {' '.join(DEFAULT_RECIPES)})")
    parser.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    parser.add_argument("--encodings", nargs="+", default=list(DEFAULT_ENCODINGS), choices=ENCODINGS)
    parser.add_argument("--levels", nargs="+", type=int, default=list(LEVELS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--epochs", type=int, help="epochs of every cell (default: SCHEDULES)")
    parser.add_argument("--epoch-images", type=int, help="images per epoch (default: SCHEDULES / the recipe's)")
    parser.add_argument("--subset", type=int, help="images per split (smoke runs)")
    parser.add_argument("--steps-per-epoch", type=int, help="(smoke runs)")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS,
                        help="the study's JSON (default: benchmarks/results/encoding_study.json); "
                             "the table and figure are written beside it (.md, .png)")
    parser.add_argument("--table", type=Path, help="markdown table path (default: RESULTS with .md)")
    parser.add_argument("--figure", type=Path, help="figure path (default: RESULTS with .png)")
    parser.add_argument("--out", type=Path, default=Path("runs/encoding_study"), help="the cells' run folders")
    parser.add_argument("--report", action="store_true", help="only write the table and figure from RESULTS")
    parser.add_argument("--readme", type=Path, help="with --report: also put the table in this README, between "
                                                    f"its {README_START} / {README_END} markers")
    parser.add_argument("--dry-run", action="store_true", help="list the cells left to train, train none")
    parser.add_argument("--shard", type=_shard, metavar="I/N", help="only every N-th cell, from the I-th")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep finished cells' epoch checkpoints (default: deleted once recorded)")
    parser.add_argument("--data-dir")
    parser.add_argument("--threads", type=int, default=0, help="TensorFlow intra-op threads (0: all cores)")
    parser.add_argument("--verbose", type=int, default=2, choices=(0, 1, 2), help="Keras fit verbosity")
    args = parser.parse_args(argv)

    results_path = Path(args.results)
    command = "python benchmarks/encoding_study.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.readme is not None and not args.report:
        parser.error("--readme goes with --report (a training run rewrites only the table and figure)")
    if args.report:
        try:
            print(write_report(load_results(results_path), results_path, args.table, args.figure,
                               readme=args.readme, command=command))
        except (ValueError, OSError) as error:  # no README or no markers: one line, the file left as it was
            parser.error(str(error))
        return 0

    import glt_keras  # noqa: F401  (Keras flavour first)
    from glt_keras.recipe import load_recipe
    from glt_keras.training.cli import _threads

    _threads(args.threads)
    recipes = args.recipes or list(DEFAULT_RECIPES)
    bases = {}
    for spec in recipes:
        base = load_recipe(spec)
        bases[base.name] = base
    cells = plan_cells(list(bases), args.conditions, args.encodings, args.levels, args.seeds,
                       epochs=args.epochs, epoch_images=args.epoch_images, subset=args.subset,
                       steps_per_epoch=args.steps_per_epoch)
    if args.shard:
        index, count = args.shard
        cells = cells[index::count]
    results = load_results(results_path)
    for row in results["cells"].values():  # a recipe edited since: its recorded cells are not these
        base = bases.get(row["recipe"])
        if base is not None and row.get("base_hash") not in (None, base_hash(base)):
            parser.error(f"{results_path} holds cells of {row['recipe']} trained from another version of "
                         f"its recipe (hash {row['base_hash']}, now {base_hash(base)}); use another --results.")
    pending = [c for c in cells if c.key not in results["cells"]]
    print(f"encoding study: {len(cells)} cells, {len(cells) - len(pending)} already in {results_path}, "
          f"{len(pending)} to train.")
    if args.dry_run:
        for c in pending:
            print("  " + c.key)
        return 0
    update_results(results_path, lambda r: None if command in r["commands"] else r["commands"].append(command))
    from tqdm.auto import tqdm

    with tqdm(total=len(cells), initial=len(cells) - len(pending), desc="cells", unit="cell",
              dynamic_ncols=True) as bar:
        for cell in pending:
            if cell.key in load_results(results_path)["cells"]:  # another shard / process did it
                bar.update(1)
                continue
            bar.set_postfix_str(cell.key, refresh=True)
            row = run_cell(bases[cell.recipe], cell, out=args.out, results_path=results_path,
                           data_dir=args.data_dir, verbose=args.verbose, keep_checkpoints=args.keep_checkpoints)
            bar.write(f"{cell.key}: test {100 * (_metric(row) or 0):.2f}%  ({row['train_seconds']} s)")
            bar.update(1)
            write_report(load_results(results_path), results_path, args.table, args.figure)
    results = load_results(results_path)
    print(build_table(results) if pending else write_report(results, results_path, args.table, args.figure))
    return 0


if __name__ == "__main__":
    sys.exit(main())
