"""kill -TSTP pauses a training run; the pause is logged, not charged to the epoch."""
import csv
import os
import signal
import subprocess
import time

import pytest
import tensorflow as tf

from glt_keras.training.pauses import PauseClock
from glt_keras.training.run import train

from test_training import tiny_recipe


def _pause_self(seconds: float) -> None:
    """SIGTSTP to this process; a child process continues it after ``seconds``."""
    subprocess.Popen(["sh", "-c", f"sleep {seconds}; kill -CONT {os.getpid()}"])
    os.kill(os.getpid(), signal.SIGTSTP)


def test_clock_times_a_stop_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTSTP)
    with PauseClock() as clock:
        t0 = time.monotonic()
        _pause_self(1.0)
        waited = time.monotonic() - t0
    assert 0.9 <= clock.paused_seconds <= waited + 0.01
    assert signal.getsignal(signal.SIGTSTP) == before


class PauseInEpoch(tf.keras.callbacks.Callback):
    def __init__(self, epoch, seconds):
        super().__init__()
        self.epoch, self.seconds = epoch, seconds

    def on_epoch_begin(self, epoch, logs=None):
        self._now = epoch + 1

    def on_train_batch_end(self, batch, logs=None):
        if self._now == self.epoch and batch == 0:
            _pause_self(self.seconds)


def test_paused_run_logs_the_pause_apart_from_the_epoch(tmp_path, image_folder):
    run = tmp_path / "run"
    summary = train(tiny_recipe(image_folder, epochs=2), out_dir=run, verbose=0, callbacks=[PauseInEpoch(2, 2.0)])
    with open(run / "history.csv") as f:
        rows = {int(float(r["epoch"])): r for r in csv.DictReader(f)}
    assert rows[1]["paused_seconds"] == ""  # no pause: no value
    paused = float(rows[2]["paused_seconds"])
    assert paused >= 1.9
    # Charged for the pause, epoch 2 would take 2 s more than epoch 1 (which also traces the
    # training step, so it is the slower one unpaused).
    assert float(rows[2]["seconds"]) < float(rows[1]["seconds"]) + 1.0
    assert summary["paused_seconds_this_session"] == pytest.approx(paused, abs=0.1)
    assert summary["train_seconds"] == pytest.approx(float(rows[1]["seconds"]) + float(rows[2]["seconds"]), abs=0.11)
