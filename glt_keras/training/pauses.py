"""Pausing a training run without charging the pause to it.

``kill -TSTP <pid>`` stops a ``glt-keras train`` process (as Ctrl-Z does in its terminal) and
``kill -CONT <pid>`` (or ``fg``) resumes it; the run's ``history.csv`` then records each epoch's
``seconds`` without the stop, and the stop itself as ``paused_seconds``. A model card's training
cost stays the time the training took, also when two runs take turns on a machine's cores.

A plain ``kill -STOP`` cannot be caught: a run stopped that way is charged for the stop.

Example:
    >>> with PauseClock() as clock:
    ...     pass  # model.fit(...)
    >>> clock.paused_seconds
    0.0
"""
from __future__ import annotations

import os
import signal
import threading
import time


class PauseClock:
    """Seconds this process spent stopped by SIGTSTP, while the ``with`` block runs.

    On SIGTSTP the handler stops the whole process with SIGSTOP and times the stop until
    SIGCONT. Python runs the handler between two bytecodes of the main thread, so the stop
    begins after the training step under way (a fraction of a second); outside the main
    thread (where handlers cannot be installed) the clock stays at 0 and SIGTSTP keeps its
    default action."""

    def __init__(self):
        self.paused_seconds = 0.0
        self._previous = None

    def __enter__(self) -> "PauseClock":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTSTP, self._stop)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTSTP, self._previous)
            self._previous = None

    def _stop(self, signum, frame) -> None:
        stopped = time.monotonic()
        os.kill(os.getpid(), signal.SIGSTOP)  # returns once the process is continued
        self.paused_seconds += time.monotonic() - stopped
