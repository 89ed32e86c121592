"""A run's epoch checkpoints (model + optimizer state, written atomically, restored with
fallback to the last intact epoch), the checks of its weight files, and the weight file a
recipe starts from (``pruning.init_weights`` / ``training.init_weights``: :func:`resolve_init_weights`)."""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import tensorflow as tf

from .._io import atomic_write


class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial or corrupt."""

    user_error = True  # the command line states it in one line (glt_keras.cli.is_user_error)


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


def resolve_init_weights(spec, root=None, *, key="pruning.init_weights"):
    """``pruning.init_weights`` (or ``training.init_weights``) -> an existing weight file (a path relative to the project
    root or absolute; a run folder means its ``best_weights.h5``). Raises a
    FileNotFoundError naming the file and the command that produces it."""
    from pathlib import Path

    from ..recipe import ZOO_DIR

    root = Path(root) if root is not None else ZOO_DIR.parent
    path = Path(spec)
    if not path.is_absolute():
        path = root / path
    if path.is_dir() or (not path.suffix and not path.exists()):
        path = path / "best_weights.h5"
    if path.exists():
        return path
    zoo_dir = ZOO_DIR.resolve()
    if path.parent.parent.resolve() == zoo_dir:
        base = path.parent.name
        how = (
            f"it holds the published {base} zoo model. Produce it with:\n"
            f"  glt-keras train {base} && glt-keras zoo publish runs/{base}"
        )
    elif path.name == "best_weights.h5":
        how = f"it is written by a training run: glt-keras train <recipe> --out {path.parent}"
    else:
        how = "train and save the model it names first"
    raise FileNotFoundError(f"{key}: {path} does not exist; {how}")
