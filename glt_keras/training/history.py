"""A run's record: history.csv (one row per epoch, gap-free across resumes), thresholds.json,
best weights, summary.json, the learning-rate plans of resumed runs, and the PNG plots."""
from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from .._io import atomic_write
from ..layers.encoding import LearnedThermometer, plot_transfer_curve
from ..models import save_weights
from .checkpoints import CheckpointError, _set_aside, verify_weights_file


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


#: The PNG plots are redrawn after the first epoch, then at most this often, and when training
#: ends: drawing them takes a few tenths of a second, a few percent of a short epoch.
PLOT_INTERVAL_SECONDS = 60.0


class RunLogger(tf.keras.callbacks.Callback):
    """history.csv (gap-free across resumes), thresholds.json, best weights and PNG plots."""

    def __init__(self, run_dir: Path, model, start_epoch: int, monitor="val_accuracy", extra=None,
                 *, recipe_name="", planned_epochs=0, images_per_epoch=0, best_if=None, schedule=None,
                 sessions=None, smoothing=1, save_best=None, pause_clock=None):
        """``extra()``: more values for every history row. ``best_if(row)``: whether an
        epoch's row may become the best weights (default: every epoch). ``schedule``: the
        run's learning-rate plans (``extend_schedule``), kept in summary.json. ``sessions``:
        how many sessions (this one included) trained the run, written at every epoch so that
        a session killed mid-run still counts. ``smoothing`` > 1 adds ``val_accuracy_smooth``, the
        mean validation accuracy of the last ``smoothing`` epochs, to every row (monitor it to
        select on a score less noisy than one epoch's on a small validation set), and
        ``val_accuracy_ema_smooth`` where the epoch has ``val_accuracy_ema`` (a weight average,
        :mod:`.weight_average`). ``save_best(path)`` writes the best weights (default: the
        model's own; a weight average saves the averaged ones). ``pause_clock``: a
        :class:`~.pauses.PauseClock`, whose stops are left out of the epochs' ``seconds`` (and
        logged as ``paused_seconds``)."""
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
        self.save_best = save_best or (lambda path: save_weights(model, path))
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
        self.pause_clock = pause_clock
        self._paused0 = 0.0
        self._plotted_at = None  # time.monotonic() of the last plot

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

    def _paused(self) -> float:
        return self.pause_clock.paused_seconds if self.pause_clock is not None else 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.time()
        self._paused0 = self._paused()

    def on_epoch_end(self, epoch, logs=None):
        paused = self._paused() - self._paused0
        row = {"epoch": epoch + 1, "seconds": round(time.time() - self._t0 - paused, 1),
               **({"paused_seconds": round(paused, 1)} if paused > 0 else {})}
        row.update({k: float(v) for k, v in (logs or {}).items()})
        row.update(self.extra())
        for key in ("val_accuracy", "val_accuracy_ema"):
            if self.smoothing > 1 and key in row:
                recent = [r[key] for r in self.rows[-(self.smoothing - 1):] if key in r]
                row[key + "_smooth"] = float(np.mean(recent + [row[key]]))
        # larq's CaseOptimizer keeps one optimizer per predicate: log each one's rate.
        optimizer = self.model.optimizer
        for i, inner in enumerate(getattr(optimizer, "optimizers", None) or [optimizer]):
            row[f"lr_{i}" if hasattr(optimizer, "optimizers") else "lr"] = float(inner._decayed_lr(tf.float32))
        self.rows.append(row)
        _write_history(self.history_path, self.rows)
        self.write_summary()
        if self.best_if(row) and row.get(self.monitor, -np.inf) > self.best:
            self.best = row[self.monitor]
            self.save_best(self.run_dir / "best_weights.h5")
        thermometer = _thermometer(self.student)
        if thermometer is not None:
            self.thresholds[str(epoch + 1)] = np.round(thermometer.thresholds(), 3).tolist()
            atomic_write(self.threshold_path, json.dumps(self.thresholds))
        if self._plotted_at is None or time.monotonic() - self._plotted_at >= PLOT_INTERVAL_SECONDS:
            self._plot()

    def on_train_end(self, logs=None):
        self._plot()  # the last epochs

    def _plot(self):
        plot_run(self.run_dir, self.rows, self.thresholds, _thermometer(self.student))
        self._plotted_at = time.monotonic()


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
    for key, style in (("accuracy", "-"), ("val_accuracy", "--"), ("val_accuracy_ema", ":")):
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
