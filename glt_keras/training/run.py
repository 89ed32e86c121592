"""Fit-loop glue: recipe -> data -> model -> optimizer -> callbacks -> checkpoints -> logs.

A run folder holds everything of one training run::

    run_dir/
      recipe.yaml            the recipe as run (with CLI overrides)
      checkpoints/last.json  pointer to the last complete epoch checkpoint
      checkpoints/epoch_K/   model + optimizer state after epoch K (written atomically)
      best_weights.h5        best weights on the validation split
      history.csv            one row per epoch, no gaps across resumes
      thresholds.json        the thermometer's thresholds after every epoch
      tensorboard/           TensorBoard logs
      curves.png, thermometer.png, thresholds.png, pruning.png   plots
      summary.json           wall time, epochs, throughput, best validation metrics

    with a ``pruning:`` block in the recipe (see :mod:`glt_keras.training.pruning`), also:
      shrunk_weights.h5      the physically shrunk network (from best_weights.h5)
      shrunk_recipe.yaml     its recipe (explicit shrunk widths; pruning.full_model = the
                             full-width network trained here)
      shrunk_model.json      {"widths", "report" (before / after sizes), ...}
      shrunk/                recipe.yaml + best_weights.h5 of the shrunk network, logs:
                             ``glt-keras zoo publish runs/<name>/shrunk``
    (best_weights.h5 stays the masked full-width network: ``glt-keras eval run_dir`` works.)
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import larq as lq
import tensorflow as tf
import yaml

from .._io import atomic_write
from ..data.augment import random_subset, resize_uint8
from ..layers.encoding import LearnedThermometer, plot_transfer_curve
from ..models import load_weights, save_weights
from ..recipe import Recipe, load_recipe


#: The label of an image that has none (``labels: teacher``): only the teachers' targets train on it.
UNLABELED = -1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial or corrupt."""

    user_error = True  # the command line states it in one line (glt_keras.cli.is_user_error)


#: What a run leaves in its folder: a fresh start there needs ``overwrite=True``.
RUN_FILES = ("checkpoints", "history.csv", "best_weights.h5", "summary.json", "thresholds.json")


# ----------------------------------------------------------------------------- data
@dataclass
class Splits:
    train: tuple
    val: tuple | None
    test: tuple | None
    class_names: list


def _load_source(spec: dict, classes: list, data_dir, size_hw):
    """One data source of a recipe, its labels mapped onto the recipe's classes.

    ``label_map`` maps the source's class names to recipe class names (``"*"`` for
    every other class); without it the source's classes must be the recipe's.
    """
    from ..data import load_arrays, load_image_folder

    if "paste" in spec:
        return _pasted_source(spec["paste"], classes, data_dir, size_hw)
    if "folder" in spec:
        ds = load_image_folder(spec["folder"], image_size=size_hw)
    elif "tfds" in spec:
        if spec["tfds"] != "stl10":
            raise ValueError(f"data source {spec}: only tfds 'stl10' is supported.")
        from ..data import load_tfds_stl10

        ds = load_tfds_stl10(spec["split"], data_dir=spec.get("data_dir"), manual_dir=spec.get("manual_dir"))
    else:
        ds = load_arrays(spec["dataset"], spec["split"], data_dir=data_dir)
    label_map = spec.get("label_map")
    if spec.get("labels") == "teacher":  # no hard label: the recipe's teachers label every view
        x, y = ds.x, np.full(len(ds.x), UNLABELED, np.int64)
    elif label_map is None:
        if list(ds.class_names) != list(classes):
            raise ValueError(
                f"data source {spec}: classes {list(ds.class_names)} differ from the recipe's "
                f"{classes}; give a label_map."
            )
        x, y = ds.x, ds.y
    else:
        index = {c: i for i, c in enumerate(classes)}
        default = label_map.get("*")
        mapped = np.array(
            [index.get(label_map.get(name, default), -1) if label_map.get(name, default) else -1
             for name in ds.class_names]
        )
        y = mapped[ds.y]
        keep = y >= 0
        x, y = ds.x[keep], y[keep]
    if spec.get("max_per_class"):
        rng = np.random.default_rng(spec.get("seed", 0))
        keep = np.concatenate(
            [rng.permutation(np.flatnonzero(y == c))[: spec["max_per_class"]] for c in np.unique(y)]
        )
        keep.sort()
        x, y = x[keep], y[keep]
    if size_hw is not None:
        x = resize_uint8(x, size_hw)
    return x, y.astype("int32")


def _pasted_source(spec: dict, classes: list, data_dir, size_hw):
    """Synthetic positives: people pasted into scenes without people.

    ``{scenes: {dataset, split, class}, persons: PERSONS, n, label, height_range, seed}``;
    PERSONS is ``{dataset, split, class}`` (windows, pasted with an elliptical mask) or
    ``{dataset: pennfudan | coco128, masks: true}`` (people cut out by their masks), or a
    list of those. ``label: teacher`` leaves the label to the recipe's teachers.
    """
    from ..data import load_arrays, paste_augment, person_cutouts

    def pick(part):
        ds = load_arrays(part["dataset"], part["split"], data_dir=data_dir)
        return ds.x[ds.y == list(ds.class_names).index(part["class"])]

    scenes = pick(spec["scenes"])
    if size_hw is not None:
        scenes = resize_uint8(scenes, size_hw)
    parts = spec["persons"] if isinstance(spec["persons"], list) else [spec["persons"]]
    if all(part.get("masks") for part in parts):
        persons = [cut for part in parts for cut in person_cutouts(part["dataset"], data_dir=data_dir)]
    elif len(parts) == 1:
        persons = pick(parts[0])
    else:
        raise ValueError(f"paste: persons {parts}: either one set of windows or cut-outs with masks: true.")
    x, _ = paste_augment(scenes, persons, n=int(spec["n"]), seed=int(spec.get("seed", 0)),
                         height_range=tuple(spec.get("height_range", (0.2, 0.9))))
    label = spec.get("label", "person")
    return x, np.full(len(x), UNLABELED if label == "teacher" else classes.index(label), "int32")


def _holdout(x, y, fraction, seed):
    rng = np.random.default_rng(seed)
    val_idx = []
    for c in np.unique(y[y >= 0]):  # images labelled by the teachers only stay in training
        idx = rng.permutation(np.flatnonzero(y == c))
        val_idx.append(idx[: max(1, int(round(len(idx) * fraction)))])
    val_idx = np.sort(np.concatenate(val_idx))
    mask = np.ones(len(y), bool)
    mask[val_idx] = False
    return (x[mask], y[mask]), (x[val_idx], y[val_idx])


def load_splits(recipe: Recipe, *, data_dir=None, subset: int | None = None) -> Splits:
    """Train / validation / test arrays for a recipe (``subset``: at most that many each)."""
    data = recipe.data
    if not data.get("train"):
        raise ValueError(f"recipe {recipe.name}: data.train lists no source.")
    train_size = data.get("train_size")
    train_hw = tuple(train_size) if train_size else None
    sources = data["train"] if isinstance(data["train"], list) else [data["train"]]
    parts = [_load_source(s, recipe.classes, data_dir, train_hw) for s in sources]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    val = None
    if data.get("val"):
        val = _load_source(data["val"], recipe.classes, data_dir, recipe.input_shape[:2])
    elif data.get("holdout"):
        (x, y), val = _holdout(x, y, float(data["holdout"]), recipe.training["seed"])
    test = None
    if data.get("test"):
        test = _load_source(data["test"], recipe.classes, data_dir, recipe.input_shape[:2])

    def cut(pair):
        if pair is None or not subset:
            return pair
        rng = np.random.default_rng(0)
        idx = np.sort(rng.permutation(len(pair[1]))[:subset])
        return pair[0][idx], pair[1][idx]

    return Splits(cut((x, y)), cut(val), cut(test), list(recipe.classes))


def extra_eval_sets(recipe: Recipe, *, data_dir=None) -> dict:
    """The recipe's ``data.extra_eval`` sets (e.g. VWW's in-domain held-out photos), at its input
    size: ``{"dataset:split" (or the folder's name): (x, y)}``."""
    sets = {}
    for spec in recipe.data.get("extra_eval") or []:
        name = f"{spec['dataset']}:{spec['split']}" if "dataset" in spec else Path(spec["folder"]).name
        sets[name] = _load_source(spec, recipe.classes, data_dir, recipe.input_shape[:2])
    return sets


def make_train_dataset(recipe: Recipe, x, y, *, batch_size, balance_by=None):
    """The augmented training stream; ``balance_by``: the classes to balance on where ``y``
    has none (``data.balance: teacher``)."""
    from ..data import make_dataset

    aug = dict(recipe.data.get("augment") or {})
    return make_dataset(
        x, y, batch_size=batch_size, training=True, image_size=recipe.input_shape[:2],
        seed=recipe.training["seed"], balance=bool(recipe.data.get("balance", False)),
        balance_by=balance_by, num_classes=len(recipe.classes), drop_remainder=True, **aug,
    )


def make_eval_dataset(recipe: Recipe, x, y, *, batch_size=128):
    from ..data import make_dataset

    return make_dataset(x, y, batch_size=batch_size, training=False, image_size=recipe.input_shape[:2])


# ----------------------------------------------------------------------------- optimizer
@tf.keras.utils.register_keras_serializable(package="glt_keras")
class WarmupCosine(tf.keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to ``peak`` over ``warmup_steps``, then cosine decay to ``peak * min_fraction``."""

    def __init__(self, peak, total_steps, warmup_steps=0, min_fraction=0.01):
        self.peak = float(peak)
        self.total_steps = int(max(1, total_steps))
        self.warmup_steps = int(warmup_steps)
        self.min_fraction = float(min_fraction)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warm = self.peak * (step + 1.0) / max(1, self.warmup_steps)
        progress = tf.clip_by_value(
            (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps), 0.0, 1.0
        )
        cosine = 0.5 * (1.0 + tf.cos(math.pi * progress))
        decayed = self.peak * (self.min_fraction + (1.0 - self.min_fraction) * cosine)
        return tf.where(step < self.warmup_steps, warm, decayed)

    def get_config(self):
        return dict(peak=self.peak, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                    min_fraction=self.min_fraction)


def make_optimizer(training: dict, steps_per_epoch: int, epochs: int, model=None):
    """Larq CaseOptimizer: Adam on latent binary weights, Adam on the real-valued rest.

    A ``model`` without binary weights (a real-valued teacher) gets the plain Adam:
    larq's CaseOptimizer refuses an optimizer that claims no variable."""
    total = steps_per_epoch * epochs
    warmup = int(training.get("warmup_epochs", 0) * steps_per_epoch)
    floor = training.get("min_lr_fraction", 0.01)
    binary = tf.keras.optimizers.legacy.Adam(WarmupCosine(training["binary_lr"], total, warmup, floor))
    real = tf.keras.optimizers.legacy.Adam(WarmupCosine(training["real_lr"], total, warmup, floor))
    if model is not None and not any(lq.optimizers.Bop.is_binary_variable(v) for v in model.trainable_variables):
        return real
    return lq.optimizers.CaseOptimizer((lq.optimizers.Bop.is_binary_variable, binary), default_optimizer=real)


# ----------------------------------------------------------------------------- checkpoints
class EpochCheckpoint(tf.keras.callbacks.Callback):
    """Model + optimizer state after every epoch, written to a temp folder then renamed.

    ``checkpoints/last.json`` names the last complete one; older ones are removed
    except the previous, so a checkpoint damaged after writing still has a fallback.
    """

    def __init__(self, directory: Path, checkpoint: tf.train.Checkpoint, epoch_var: tf.Variable):
        super().__init__()
        self.directory = Path(directory)
        self.checkpoint = checkpoint
        self.epoch_var = epoch_var

    def on_epoch_end(self, epoch, logs=None):
        save_checkpoint(self.directory, self.checkpoint, self.epoch_var, epoch + 1)


def save_checkpoint(directory: Path, checkpoint, epoch_var, epoch: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    epoch_var.assign(epoch)
    final = directory / f"epoch_{epoch}"
    tmp = directory / f"epoch_{epoch}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    checkpoint.write(str(tmp / "ckpt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write(directory / "last.json", json.dumps({"epoch": epoch, "path": final.name}))
    for old in directory.glob("epoch_*"):
        if old.name not in (final.name, f"epoch_{epoch - 1}"):
            shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_candidates(directory: Path) -> list:
    """Epoch checkpoints to resume from, best first: the one ``last.json`` names, then every
    other complete ``epoch_K`` (newest first), so a damaged latest one has a fallback."""
    directory = Path(directory)
    found = {}
    for path in directory.glob("epoch_*"):
        if path.is_dir() and path.name[6:].isdigit() and (path / "ckpt.index").exists():
            found[path.name] = int(path.name[6:])
    order = sorted(found, key=found.get, reverse=True)
    named = _pointer_target(directory)
    if named in found:
        order.remove(named)
        # A later epoch than the pointer's was being written when the run stopped: not trusted.
        order = [named] + [n for n in order if found[n] < found[named]]
    return [(found[n], directory / n) for n in order]


def _pointer_target(directory: Path):
    """The checkpoint folder name ``last.json`` names, or None when it is missing or unreadable."""
    try:
        return str(json.loads((Path(directory) / "last.json").read_text())["path"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def restore_checkpoint(directory: Path, checkpoint) -> int:
    """Restore the last intact epoch checkpoint; returns its epoch. When the latest one is
    damaged (or ``last.json`` is), falls back to the previous intact one and says so on
    stderr; ``CheckpointError`` when none can be read."""
    directory = Path(directory)
    pointer = directory / "last.json"
    candidates = checkpoint_candidates(directory)
    if not candidates:
        raise CheckpointError(f"No checkpoint to resume from: {pointer} does not exist and "
                              f"{directory} holds no complete epoch_K checkpoint.")
    failures = []
    for epoch, path in candidates:
        try:
            checkpoint.read(str(path / "ckpt")).assert_existing_objects_matched()
        except Exception as err:  # TF raises several types for damaged files
            failures.append(f"{path.name}: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")
            continue
        if failures or _pointer_target(directory) != path.name:
            why = "; ".join(failures) if failures else f"{pointer} is missing or unreadable"
            print(f"warning: checkpoint {candidates[0][1].name if failures else pointer.name} is damaged or "
                  f"corrupt ({why}); resuming from the intact {path.name} (epoch {epoch}).", file=sys.stderr)
        return epoch
    raise CheckpointError(
        f"Checkpoint {candidates[0][1]} is corrupt or does not match this model, and so is every "
        f"earlier one in {directory} ({'; '.join(failures)})."
    )


def verify_weights_file(path: Path) -> None:
    """Read every array of an HDF5 weight file: ``CheckpointError`` if it is truncated or corrupt."""
    from ..models import _check_readable_h5

    try:
        _check_readable_h5(path)
    except OSError as err:
        cause = err.__cause__ or err
        raise CheckpointError(f"weight file {path} is truncated or corrupt ({type(cause).__name__}: "
                              f"{str(cause).splitlines()[0] if str(cause) else ''}).") from err


def _check_best_weights(run_dir: Path) -> None:
    """A run never reports success over a damaged best_weights.h5: it is set aside and named."""
    best = run_dir / "best_weights.h5"
    if best.exists():
        try:
            verify_weights_file(best)
        except CheckpointError as err:
            aside = _set_aside(best)
            raise CheckpointError(f"{err} Moved to {aside.name}; the epoch checkpoints in "
                                  f"{run_dir / 'checkpoints'} are kept.") from None


def _set_aside(path: Path) -> Path:
    """Rename a damaged file out of the way (never deleted: it is the user's data)."""
    aside = path.with_name(path.stem + f".damaged-{time.strftime('%Y%m%d-%H%M%S')}" + path.suffix)
    os.replace(path, aside)
    return aside


# ----------------------------------------------------------------------------- logs and plots
def extend_schedule(previous_summary: dict, start_epoch: int, planned_epochs: int) -> list:
    """The run's learning-rate plans, one ``{"first_epoch", "planned_epochs"}`` entry per
    change of the recipe's ``epochs``: a run resumed with a longer ``--epochs`` continues
    its cosine from the saved step over the new length (a warm restart at a lower rate),
    which the model card must say, since ``glt-keras train NAME`` alone does not redo it."""
    schedule = list(previous_summary.get("schedule") or [])
    if not schedule and start_epoch > 0 and previous_summary.get("planned_epochs"):
        schedule = [{"first_epoch": 1, "planned_epochs": int(previous_summary["planned_epochs"])}]  # older runs
    if not schedule or schedule[-1]["planned_epochs"] != int(planned_epochs):
        schedule.append({"first_epoch": int(start_epoch) + 1, "planned_epochs": int(planned_epochs)})
    return schedule


class RunLogger(tf.keras.callbacks.Callback):
    """history.csv (gap-free across resumes), thresholds.json, best weights and PNG plots."""

    def __init__(self, run_dir: Path, model, start_epoch: int, monitor="val_accuracy", extra=None,
                 *, recipe_name="", planned_epochs=0, images_per_epoch=0, best_if=None, schedule=None,
                 sessions=None, smoothing=1):
        """``extra()``: more values for every history row. ``best_if(row)``: whether an
        epoch's row may become the best weights (default: every epoch). ``schedule``: the
        run's learning-rate plans (``extend_schedule``), kept in summary.json. ``sessions``:
        how many sessions (this one included) trained the run, written at every epoch so that
        a session killed mid-run still counts. ``smoothing`` > 1 adds ``val_accuracy_smooth``, the
        mean validation accuracy of the last ``smoothing`` epochs, to every row (monitor it to
        select on a score less noisy than one epoch's on a small validation set)."""
        super().__init__()
        self.smoothing = int(smoothing)
        self.schedule = schedule
        self.sessions = sessions
        self.best_if = best_if or (lambda row: True)
        self.recipe_name = recipe_name
        self.planned_epochs = planned_epochs
        self.images_per_epoch = images_per_epoch
        self.run_dir = Path(run_dir)
        self.student = model
        self.monitor = monitor
        self.extra = extra or (lambda: {})
        self.history_path = self.run_dir / "history.csv"
        self.rows = _read_history(self.history_path, before_epoch=start_epoch)
        self.best = max((r.get(monitor, -np.inf) for r in self.rows if self.best_if(r)), default=-np.inf)
        best_path = self.run_dir / "best_weights.h5"
        if best_path.exists():
            try:
                verify_weights_file(best_path)
            except CheckpointError as err:  # the next epoch writes new best weights
                aside = _set_aside(best_path)
                self.best = -np.inf
                print(f"warning: {err} Moved to {aside.name}; the next epoch writes new best weights.",
                      file=sys.stderr)
        self.threshold_path = self.run_dir / "thresholds.json"
        self.thresholds = json.loads(self.threshold_path.read_text()) if self.threshold_path.exists() else {}
        self.thresholds = {k: v for k, v in self.thresholds.items() if int(k) <= start_epoch}
        self._t0 = None

    def write_summary(self, **extra):
        """summary.json after every epoch, so a run in progress can be published honestly."""
        previous = {}
        if (self.run_dir / "summary.json").exists():
            previous = json.loads((self.run_dir / "summary.json").read_text())
        seconds = sum(r.get("seconds", 0) for r in self.rows)
        images = self.images_per_epoch * len(self.rows)
        summary = {
            **previous,
            "recipe": self.recipe_name,
            "epochs": int(self.rows[-1]["epoch"]) if self.rows else 0,
            "planned_epochs": self.planned_epochs,
            "train_seconds": round(seconds, 1),
            "images_per_second": round(images / max(seconds, 1e-9), 1),
            "best_" + self.monitor: float(self.best),
            **({"schedule": self.schedule} if self.schedule else {}),
            **({"sessions": self.sessions} if self.sessions else {}),
            **extra,
        }
        atomic_write(self.run_dir / "summary.json", json.dumps(summary, indent=2))
        return summary

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.time()

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch + 1, "seconds": round(time.time() - self._t0, 1)}
        row.update({k: float(v) for k, v in (logs or {}).items()})
        row.update(self.extra())
        if self.smoothing > 1 and "val_accuracy" in row:
            recent = [r["val_accuracy"] for r in self.rows[-(self.smoothing - 1):] if "val_accuracy" in r]
            row["val_accuracy_smooth"] = float(np.mean(recent + [row["val_accuracy"]]))
        # larq's CaseOptimizer keeps one optimizer per predicate: log each one's rate.
        optimizer = self.model.optimizer
        for i, inner in enumerate(getattr(optimizer, "optimizers", None) or [optimizer]):
            row[f"lr_{i}" if hasattr(optimizer, "optimizers") else "lr"] = float(inner._decayed_lr(tf.float32))
        self.rows.append(row)
        _write_history(self.history_path, self.rows)
        self.write_summary()
        if self.best_if(row) and row.get(self.monitor, -np.inf) > self.best:
            self.best = row[self.monitor]
            save_weights(self.student, self.run_dir / "best_weights.h5")
        thermometer = _thermometer(self.student)
        if thermometer is not None:
            self.thresholds[str(epoch + 1)] = np.round(thermometer.thresholds(), 3).tolist()
            atomic_write(self.threshold_path, json.dumps(self.thresholds))
        plot_run(self.run_dir, self.rows, self.thresholds, thermometer)


def _thermometer(model):
    for layer in model.layers:
        if isinstance(layer, LearnedThermometer):
            return layer
    return None


def _read_history(path: Path, before_epoch: int):
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
    return [r for r in rows if r["epoch"] <= before_epoch]


def _write_history(path: Path, rows):
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, text.getvalue())


def plot_run(run_dir: Path, rows, thresholds, thermometer=None):
    """curves.png (loss / accuracy per epoch), thermometer.png, thresholds.png, pruning.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=90)
    for key, style in (("loss", "-"), ("val_loss", "--")):
        if key in rows[-1]:
            axes[0].plot(epochs, [r.get(key, np.nan) for r in rows], style, label=key)
    for key, style in (("accuracy", "-"), ("val_accuracy", "--")):
        if key in rows[-1]:
            axes[1].plot(epochs, [r.get(key, np.nan) for r in rows], style, label=key)
    for ax, title in zip(axes, ("loss", "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, run_dir / "curves.png")
    if thermometer is not None:
        plot_transfer_curve(thermometer, run_dir / "thermometer.png")
    if thresholds:
        keys = sorted(thresholds, key=int)
        arr = np.array([thresholds[k] for k in keys])  # (E, C, M)
        fig, ax = plt.subplots(figsize=(6, 4), dpi=90)
        colors = ["tab:red", "tab:green", "tab:blue"]
        for c in range(arr.shape[1]):
            for m in range(arr.shape[2]):
                ax.plot([int(k) for k in keys], arr[:, c, m], color=colors[c % 3], lw=1)
        ax.set_xlabel("epoch")
        ax.set_ylabel("threshold (pixel value)")
        ax.set_title("learned thresholds per epoch (R, G, B)")
        _save(fig, run_dir / "thresholds.png")
    if "pruned_fraction" in rows[-1]:
        fig, ax = plt.subplots(figsize=(5, 3), dpi=90)
        ax.plot(epochs, [r.get("pruned_fraction", 0) for r in rows])
        ax.set_xlabel("epoch")
        ax.set_ylabel("pruned fraction of blocks")
        _save(fig, run_dir / "pruning.png")


def _save(fig, path):
    import matplotlib.pyplot as plt

    tmp = path.with_name(path.stem + ".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- strategy
def get_strategy(name: str | None):
    """``None``/``default``, ``mirrored`` (all local devices) or ``multiworker`` (TF_CONFIG)."""
    if name in (None, "", "default"):
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("--strategy multiworker needs the TF_CONFIG environment variable.")
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"Unknown strategy {name!r}: use default, mirrored or multiworker.")


# ----------------------------------------------------------------------------- training
def _compile(model, optimizer, recipe: Recipe, teacher=None, *, targets_from_data=False):
    smoothing = recipe.training.get("label_smoothing", 0.0)
    if targets_from_data:
        from .distill import TargetDistiller

        distiller = TargetDistiller(model, alpha=recipe.kd["alpha"], temperature=recipe.kd["temperature"])
        distiller.compile(optimizer=optimizer, metrics=[tf.keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
        return distiller
    if teacher is not None:
        from .distill import Distiller

        distiller = Distiller(model, teacher, alpha=recipe.kd["alpha"], temperature=recipe.kd["temperature"])
        distiller.compile(optimizer=optimizer, metrics=[tf.keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
        return distiller
    if smoothing:
        def loss(y_true, y_pred):
            onehot = tf.one_hot(tf.cast(tf.reshape(y_true, [-1]), tf.int32), recipe.model["num_classes"])
            return tf.keras.losses.categorical_crossentropy(onehot, y_pred, from_logits=True,
                                                            label_smoothing=smoothing)
    else:
        loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=optimizer, loss=loss,
                  metrics=[tf.keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    return model


def train(
    recipe: Recipe | str,
    *,
    out_dir=None,
    epochs: int | None = None,
    batch_size: int | None = None,
    resume: bool = False,
    data_dir=None,
    strategy: str | None = None,
    subset: int | None = None,
    steps_per_epoch: int | None = None,
    teacher_model=None,
    callbacks=(),
    verbose: int = 1,
    overwrite: bool = False,
) -> dict:
    """Train a recipe; returns the run summary. See the module docstring for the run folder.

    ``resume=True`` continues from the last intact epoch checkpoint with optimizer
    state (in an empty folder it starts the run); a finished run resumed does nothing. A
    folder that holds a run's files but no readable checkpoint is refused, as is a fresh
    start into a folder holding a run unless ``overwrite=True`` (which deletes that run's
    checkpoints, history and best weights first). ``subset`` / ``steps_per_epoch`` make
    quick runs for tests and smoke checks.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    from . import pruning as pruning_lib

    # A shrunk recipe (pruning.full_model) trains its full-width network with pruning.
    recipe = pruning_lib.training_recipe(recipe)
    prune = pruning_lib.pruning_settings(recipe)
    if epochs is not None:
        recipe = recipe.with_changes(training={"epochs": int(epochs)})
    if batch_size is not None:
        recipe = recipe.with_changes(training={"batch_size": int(batch_size)})
    cfg = recipe.training
    run_dir = Path(out_dir or Path("runs") / recipe.name)
    ckpt_dir = run_dir / "checkpoints"
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"run folder {run_dir} is a file; choose another --out.")
    previous = [n for n in RUN_FILES if (run_dir / n).exists()]
    if previous and not resume and not overwrite:
        raise FileExistsError(
            f"{run_dir} already holds a run ({', '.join(previous)}); pass --resume to continue it, "
            "--overwrite to delete it and start again, or choose another --out."
        )
    if previous and resume and not checkpoint_candidates(ckpt_dir):
        raise CheckpointError(
            f"cannot resume {run_dir}: {ckpt_dir / 'last.json'} is missing and no epoch checkpoint "
            f"remains, but the folder holds a run ({', '.join(previous)}); nothing was changed. "
            "Pass --overwrite without --resume to start it again from scratch."
        )
    if previous and overwrite and not resume:
        for name in RUN_FILES:
            target = run_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    resuming = resume and bool(checkpoint_candidates(ckpt_dir))
    init_weights = None
    if not resuming:  # resolved before any output, so a missing file fails at once
        if prune and prune.get("init_weights"):
            init_weights = pruning_lib.resolve_init_weights(prune["init_weights"])
        elif cfg.get("init_weights"):
            init_weights = pruning_lib.resolve_init_weights(cfg["init_weights"], key="training.init_weights")
    teachers = None
    if recipe.kd.get("teachers"):  # checked before any output: a bad file fails at once
        if recipe.kd.get("teacher") or teacher_model is not None:
            raise ValueError(f"recipe {recipe.name}: kd.teacher and kd.teachers both set; choose one.")
        from .teachers import load_teachers

        teachers = load_teachers(recipe.kd["teachers"], classes=recipe.classes,
                                 base_dir=Path(recipe.path).parent if recipe.path else None)
        if verbose:
            print(f"{recipe.name}: teachers {teachers}.")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))

    tf.keras.utils.set_random_seed(cfg["seed"])
    splits = load_splits(recipe, data_dir=data_dir, subset=subset)
    strategy_obj = get_strategy(strategy)
    global_batch = cfg["batch_size"]
    if len(splits.train[1]) < global_batch:
        raise ValueError(
            f"recipe {recipe.name}: the training set has {len(splits.train[1])} images, fewer than "
            f"one batch of {global_batch}; lower --batch-size or add data."
        )
    unlabeled = int((splits.train[1] == UNLABELED).sum())
    if unlabeled and teachers is None:
        raise ValueError(f"recipe {recipe.name}: {unlabeled} training images have labels: teacher, "
                         "but kd.teachers names no teacher.")
    balance_by = None
    if recipe.data.get("balance") == "teacher":
        if teachers is None:
            raise ValueError(f"recipe {recipe.name}: data.balance: teacher needs kd.teachers.")
        from .teachers import sampling_classes

        balance_by = sampling_classes(*splits.train, teachers, cache=run_dir / "teacher_classes.npz",
                                      verbose=verbose)
    elif unlabeled and recipe.data.get("balance"):
        raise ValueError(f"recipe {recipe.name}: data.balance: true samples by hard label, and {unlabeled} "
                         "training images are labelled by the teachers only; use balance: teacher.")
    train_ds = make_train_dataset(recipe, *splits.train, batch_size=global_batch, balance_by=balance_by)
    if teachers is not None:
        from .teachers import with_teacher_targets

        train_ds = with_teacher_targets(train_ds, teachers)
    # data.epoch_images: a shorter "epoch" than one pass (checkpoints and validation
    # more often on big sets; a defined length for class-balanced sampling).
    epoch_images = recipe.data.get("epoch_images") or len(splits.train[1])
    n_steps = steps_per_epoch or max(1, int(epoch_images) // global_batch)
    val_ds = make_eval_dataset(recipe, *splits.val) if splits.val is not None else None
    real_layers = recipe.model.get("real_layers") or []
    if init_weights is not None and cfg.get("real_from_binary") and real_layers:
        # init_weights is the fully binary network: its real layers start as the binary convs they replace.
        from .mixbin import binary_start

        init_weights = binary_start(recipe, real_layers, init_weights, run_dir / "start_weights.h5",
                                    calibration=random_subset(256, splits.train[0], seed=cfg["seed"]))

    with strategy_obj.scope():
        model = recipe.build_model(classifier_activation=None)
        if init_weights is not None:
            load_weights(model, init_weights)
            if verbose:
                print(f"{recipe.name}: fine-tuning from {init_weights}.")
        thermometer = _thermometer(model)
        if (thermometer is not None and cfg.get("threshold_init") == "quantiles" and not resume
                and init_weights is None):
            thermometer.init_from_data(random_subset(2000, splits.train[0], seed=cfg["seed"]))
        optimizer = make_optimizer(cfg, n_steps, cfg["epochs"], model)
        teacher = teacher_model
        if teacher is None and recipe.kd.get("teacher"):
            teacher = load_teacher(recipe, data_dir=data_dir, verbose=verbose, subset=subset,
                                   steps_per_epoch=steps_per_epoch, run_root=run_dir.parent)
        trainer = _compile(model, optimizer, recipe, teacher, targets_from_data=teachers is not None)
        epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=epoch_var)

    start_epoch = 0
    if resuming:
        # Create optimizer slots first so that every saved value has a home.
        start_epoch = restore_checkpoint(ckpt_dir, checkpoint)
        if verbose:
            print(f"Resuming {recipe.name} from epoch {start_epoch} ({ckpt_dir}).")
    elif resume and verbose:
        print(f"No checkpoint in {ckpt_dir}: starting {recipe.name} from scratch.")
    if start_epoch >= cfg["epochs"]:
        if verbose:
            print(f"{recipe.name}: already trained for {start_epoch} epochs.")
        _check_best_weights(run_dir)
        if prune and not (run_dir / "shrunk_model.json").exists():
            _export_pruned(recipe, model, run_dir, splits, verbose)  # killed before the export
        return json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}

    pruning_cb, extra, best_if = None, None, None
    if prune:
        pruning_cb = pruning_lib.pruning_callback(model, prune, n_steps, cfg["epochs"], verbose=verbose)
        extra = lambda: {"pruned_fraction": pruning_cb.pruned_fraction, "pruning_ratio": pruning_cb.ratio}  # noqa: E731
        target = float(prune["target_ratio"])
        # Best weights only once pruning has reached its target (an unpruned epoch would win).
        best_if = lambda row: row.get("pruning_ratio", -1.0) >= target - 1e-6  # noqa: E731
    previous_summary = {}
    if start_epoch > 0 and (run_dir / "summary.json").exists():
        previous_summary = json.loads((run_dir / "summary.json").read_text())
    monitor = "val_accuracy" if val_ds is not None else "accuracy"
    if val_ds is not None and int(cfg.get("select_smoothing", 1)) > 1:
        monitor = "val_accuracy_smooth"
    logger = RunLogger(run_dir, model, start_epoch, monitor=monitor, smoothing=int(cfg.get("select_smoothing", 1)),
                       recipe_name=recipe.name, planned_epochs=cfg["epochs"], images_per_epoch=n_steps * global_batch,
                       extra=extra, best_if=best_if,
                       schedule=extend_schedule(previous_summary, start_epoch, cfg["epochs"]),
                       # A summary without a count comes from a session killed before this fix.
                       sessions=(previous_summary.get("sessions") or int(start_epoch > 0)) + 1)
    all_callbacks = [
        # Pruning first: its masks are in place before the checkpoint and the logger run.
        *([pruning_cb] if pruning_cb is not None else []),
        EpochCheckpoint(ckpt_dir, checkpoint, epoch_var),
        logger,
        tf.keras.callbacks.TensorBoard(str(run_dir / "tensorboard"), profile_batch=0),
        *callbacks,
    ]
    # The logger must see the checkpoint written first: checkpoint, then log.
    t0 = time.time()
    trainer.fit(
        train_ds.repeat(),
        epochs=cfg["epochs"],
        initial_epoch=start_epoch,
        steps_per_epoch=n_steps,
        validation_data=val_ds,
        callbacks=all_callbacks,
        verbose=verbose,
    )
    _check_best_weights(run_dir)
    summary = logger.write_summary(
        wall_seconds_this_session=round(time.time() - t0, 1),
        train_images=int(len(splits.train[1])),
        val_images=int(len(splits.val[1])) if splits.val is not None else 0,
    )
    if prune:
        _export_pruned(recipe, model, run_dir, splits, verbose)
    return summary


def _export_pruned(recipe: Recipe, model, run_dir: Path, splits: Splits, verbose=1) -> dict:
    """Shrink the best (else the final) masked weights of a pruning run: shrunk_weights.h5,
    shrunk_recipe.yaml, shrunk_model.json and shrunk/ (see the module docstring)."""
    from . import pruning as pruning_lib

    best = run_dir / "best_weights.h5"
    masked = recipe.build_model(classifier_activation=None)
    if best.exists():
        load_weights(masked, best)
        source = "best_weights.h5"
    else:
        if verbose:
            print(f"{recipe.name}: no epoch reached the pruning target with a best score; "
                  "shrinking the final weights.")
        masked.set_weights(model.get_weights())
        source = "final weights"
    pair = splits.val if splits.val is not None else splits.train
    check = next(iter(make_eval_dataset(recipe, pair[0][:16], pair[1][:16], batch_size=16)))[0]
    return pruning_lib.export_shrunk(recipe, masked, run_dir, check_inputs=check, source=source,
                                     verbose=verbose)


def load_teacher(recipe: Recipe, *, data_dir=None, verbose=1, subset=None, steps_per_epoch=None, run_root="runs"):
    """The recipe's real-valued teacher (``kd.teacher``): a run folder with best weights,
    or ``"twin"`` to train the real-valued twin of the student now (cached as
    ``<run_root>/<recipe>_teacher``, reused by every student of the same recipe name)."""
    spec = recipe.kd["teacher"]
    teacher_recipe = recipe.with_changes(
        name=f"{recipe.name}_teacher",
        model={"teacher": True},
        kd={"teacher": None},
        training={"epochs": recipe.kd.get("teacher_epochs", 20)},
        pruning=None,
    )
    run_dir = Path(spec) if spec != "twin" else Path(run_root) / teacher_recipe.name
    weights = run_dir / "best_weights.h5"
    if spec != "twin" and not weights.exists():
        raise FileNotFoundError(f"Teacher weights {weights} not found.")
    if spec == "twin":  # resumes an unfinished teacher; a finished one returns at once
        train(teacher_recipe, out_dir=run_dir, data_dir=data_dir, resume=True, verbose=verbose,
              subset=subset, steps_per_epoch=steps_per_epoch)
    teacher = teacher_recipe.build_model(classifier_activation=None)
    load_weights(teacher, weights)
    teacher.trainable = False
    return teacher


# ----------------------------------------------------------------------------- evaluation
def evaluate(model, x, y, *, class_names, batch_size=128, image_size=None) -> dict:
    """Accuracy, mean per-class accuracy, cross-entropy and confusion matrix."""
    from ..data import make_dataset

    ds = make_dataset(x, y, batch_size=batch_size, training=False, image_size=image_size)
    scores = model.predict(ds, verbose=0)
    if not np.allclose(scores.sum(-1), 1.0, atol=1e-3) or scores.min() < 0:
        probs = tf.nn.softmax(scores).numpy()
    else:
        probs = scores
    pred = probs.argmax(-1)
    n = len(class_names)
    confusion = np.zeros((n, n), dtype=int)
    np.add.at(confusion, (y, pred), 1)
    per_class = confusion.diagonal() / np.maximum(confusion.sum(1), 1)
    loss = float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0))))
    return {
        "images": int(len(y)),
        "accuracy": float((pred == y).mean()),
        "mean_per_class_accuracy": float(per_class[confusion.sum(1) > 0].mean()),
        "loss": loss,
        "confusion": confusion.tolist(),
        "class_names": list(class_names),
    }


def confusion_markdown(result: dict, max_classes: int = 12) -> str:
    names = result["class_names"]
    cm = np.array(result["confusion"])
    if len(names) > max_classes:
        return f"(confusion matrix of {len(names)} classes omitted; see JSON)"
    lines = ["| true \\ predicted | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for name, row in zip(names, cm):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines)
