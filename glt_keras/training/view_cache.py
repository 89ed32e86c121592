"""Per-view teacher cache: fixed augmented views, labelled by the teacher files once.

Live teaching (``kd.teachers``) runs the teacher files on every augmented view the student
trains on: on a 2-core machine about one core for the whole run. With ``kd.view_cache: K``
every training image ``i`` has ``K`` fixed views instead; view ``(i, k)`` is made from
parameters that are a hash of (recipe seed, ``i``, ``k``)
(:func:`glt_keras.data.augment.view_params`) with the same ops as live augmentation. The
teachers label every view once; training samples images as always, draws ``k`` uniformly,
builds exactly view ``(i, k)`` and reads the teachers' probabilities of it from the cache, so
the target still describes the pixels the student sees, and no teacher runs during training::

    kd:
      teachers: [...]
      view_cache: 8        # fixed views per image; absent or 0: live teaching

The cache is ``<folder>/<key>.npz`` (probabilities ``(N, K, classes)`` float32), with a
readable ``<key>.json`` beside it; the folder is ``$GLT_CACHE_DIR/teacher_views`` (default
``~/.cache/glt_keras/teacher_views``, beside the decoded data) or ``--cache-dir``. The key
hashes everything that decides the views and the teachers' outputs (:func:`cache_meta`): the
training images' bytes, the input size, the augmentation settings, the seed, ``K``, each
teacher file's SHA-256 and settings, the TensorFlow version. Recipes that share all of them (a
model, its small and pruned variants, ablations of the student) share one file; anything else
gets its own, and the fill says how it differs from the nearest existing cache. A fill runs in
chunks, one teacher ensemble per worker thread, each chunk written atomically to
``<key>.parts/``: a killed fill continues where it stopped.

    >>> ensemble = recipe_teachers(recipe)                                        # doctest: +SKIP
    >>> cache = ensure_view_cache(recipe, x_train, ensemble)                       # doctest: +SKIP
    >>> train_ds = make_train_dataset(recipe, x_train, y_train, batch_size=64,
    ...                               view_targets=cache.probs)                    # doctest: +SKIP

``glt-keras train`` fills a missing cache before training; ``glt-keras teachers cache RECIPE``
fills it ahead of time.
"""
from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
import queue
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._io import atomic_write, sha256_of_array

__all__ = ["ViewCache", "ViewCacheError", "cache_key", "cache_meta", "default_cache_dir", "differences",
           "ensure_view_cache", "fill_view_cache", "load_view_cache", "view_count", "view_settings"]

FORMAT = 1  # the meaning of a view and of the file; a new definition makes new keys
CHUNK_VIEWS = 512  # views labelled (and written) per chunk
#: make_dataset keywords that change the pixels of a view (shuffle_buffer does not)
PIXEL_KEYS = ("crop", "pad", "flip", "scale", "brightness", "contrast", "mixup", "mosaic")


class ViewCacheError(ValueError):
    """A cache file that cannot be used for these views; the message names it and why."""


@dataclass
class ViewCache:
    path: Path
    meta: dict
    probs: np.ndarray  # (N, K, classes) float32: the teachers' probabilities of view (i, k)


def view_count(recipe) -> int:
    """``kd.view_cache`` of a recipe: views per image, 0 for live teaching."""
    return int(recipe.kd.get("view_cache") or 0)


def default_cache_dir() -> Path:
    from ..data.sources import cache_dir

    return cache_dir() / "teacher_views"


def view_settings(recipe) -> dict:
    """What makes a recipe's views besides the images: seed, input size, augmentation (with
    :func:`~glt_keras.data.make_dataset`'s defaults filled in)."""
    from ..data.augment import make_dataset

    defaults = {k: p.default for k, p in inspect.signature(make_dataset).parameters.items() if k in PIXEL_KEYS}
    aug = {**defaults, **{k: v for k, v in (recipe.data.get("augment") or {}).items() if k in PIXEL_KEYS}}
    return {"seed": int(recipe.training["seed"]), "image_size": [int(v) for v in recipe.input_shape[:2]],
            "augment": {"crop": str(aug["crop"]), "pad": int(aug["pad"]), "flip": bool(aug["flip"]),
                        "scale": [float(v) for v in aug["scale"]], "brightness": float(aug["brightness"]),
                        "contrast": float(aug["contrast"]),
                        # only when set: caches made before mixup and mosaic existed keep their keys
                        **({"mixup": float(aug["mixup"])} if aug["mixup"] else {}),
                        **({"mosaic": float(aug["mosaic"])} if aug["mosaic"] else {})}}


def cache_meta(x, ensemble, views: int, settings: dict) -> dict:
    """Everything that decides the views and the teachers' outputs on them (hashed into the key)."""
    import tensorflow as tf

    x = np.asarray(x)
    return {
        "format": FORMAT, "views": int(views),
        "images": {"shape": list(x.shape), "dtype": x.dtype.str, "sha256": sha256_of_array(x)},
        **settings,
        "teachers": [{"file": t.name, "sha256": t.sha256, "input_range": [float(v) for v in t.input_range],
                      "output": t.output, "class_index": [int(c) for c in t.class_index], "weight": float(w)}
                     for t, w in zip(ensemble.teachers, ensemble.weights)],
        "num_classes": int(ensemble.num_classes),
        "tensorflow": tf.__version__,
    }


def cache_key(meta: dict) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:20]


def differences(a, b, where: str = "") -> list:
    """Dotted names of the entries in which two metas differ (``teachers[1].sha256``)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in sorted(set(a) | set(b), key=str)
                for d in differences(a.get(key), b.get(key), f"{where}.{key}" if where else str(key))]
    if (isinstance(a, list) and isinstance(b, list) and len(a) == len(b)
            and any(isinstance(v, (dict, list)) for v in a + b)):
        return [d for i, (u, v) in enumerate(zip(a, b)) for d in differences(u, v, f"{where}[{i}]")]
    return [] if a == b else [where or "(all)"]


def load_view_cache(path, meta: dict) -> ViewCache:
    """The cache file ``path``, checked against ``meta``: a file made for other views or
    teachers is a :class:`ViewCacheError` naming what differs, never used."""
    path = Path(path)
    try:
        with np.load(path) as z:
            probs, stored = z["probs"], json.loads(str(z["meta"]))
    except Exception as err:  # a damaged file: zip, key or JSON errors
        raise ViewCacheError(f"teacher view cache {path} is unreadable ({type(err).__name__}: {err}); "
                             "delete it to compute it again.") from err
    changed = differences(stored, meta)
    if changed:
        raise ViewCacheError(f"teacher view cache {path} was made for other views or teachers (differs in "
                             f"{', '.join(changed)}); delete it to compute it again.")
    want = (meta["images"]["shape"][0], meta["views"], meta["num_classes"])
    if probs.shape != want or probs.dtype != np.float32 or not np.isfinite(probs).all():
        raise ViewCacheError(f"teacher view cache {path} holds {probs.dtype} {list(probs.shape)}, not float32 "
                             f"{list(want)}; delete it to compute it again.")
    return ViewCache(path, meta, probs)


def _part_name(chunk) -> str:
    return f"{chunk[0]:09d}-{chunk[1]:09d}.npy"


def _read_part(parts: Path, chunk, views: int, classes: int):
    try:
        probs = np.load(parts / _part_name(chunk))
    except Exception:  # missing or damaged: labelled again
        return None
    ok = probs.shape == (chunk[1] - chunk[0], views, classes) and probs.dtype == np.float32
    return probs if ok and np.isfinite(probs).all() else None


def _write(path: Path, save, **arrays):
    """``save(buffer, **arrays)`` (np.save / np.savez) written to ``path`` through a temporary file."""
    buffer = io.BytesIO()
    save(buffer, **arrays)
    atomic_write(path, buffer.getvalue())


def fill_view_cache(x, ensemble, meta: dict, path, *, workers: int | None = None, chunk_views: int = CHUNK_VIEWS,
                    verbose: int = 1, made_for: str = "") -> ViewCache:
    """Label every view ``(i, k)`` of ``x`` with ``ensemble`` and write the cache ``path``.

    Chunks of about ``chunk_views`` views go to ``workers`` threads (default: every core),
    each with its own copy of the ensemble; each chunk's probabilities are written atomically
    to ``<path stem>.parts/``, which a later call reuses (resume), and the final file replaces
    nothing until it is complete."""
    from tqdm.auto import tqdm

    from ..data.augment import make_views

    x = np.asarray(x)
    path = Path(path)
    n, views, classes = len(x), int(meta["views"]), int(meta["num_classes"])
    if not workers:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = max(1, int(workers))
    per_chunk = max(1, int(chunk_views) // views)
    plan = [(s, min(n, s + per_chunk)) for s in range(0, n, per_chunk)]
    parts = path.parent / f"{path.stem}.parts"
    meta_text = json.dumps(meta, sort_keys=True, indent=1)
    if (parts / "meta.json").is_file() and (parts / "meta.json").read_text() != meta_text:
        shutil.rmtree(parts)  # another definition under this name: start again
    atomic_write(parts / "meta.json", meta_text)
    todo = [c for c in plan if _read_part(parts, c, views, classes) is None]
    settings = dict(seed=meta["seed"], image_size=meta["image_size"], **meta["augment"])
    started = time.perf_counter()
    if todo:
        idx = np.concatenate([np.repeat(np.arange(s, e), views) for s, e in todo])
        batches = make_views(x, idx, np.tile(np.arange(views), len(idx) // views), batch_size=per_chunk * views,
                             **settings)
        if verbose:
            _announce(x, ensemble, meta, path, len(plan) - len(todo), len(plan), workers, settings)
        pool = queue.Queue()
        for copy in [ensemble] + [ensemble.copy() for _ in range(workers - 1)]:
            pool.put(copy)

        def label(chunk, images):
            teacher = pool.get()
            try:
                probs = teacher.predict(images)
            finally:
                pool.put(teacher)
            _write(parts / _part_name(chunk), np.save, arr=probs.reshape(chunk[1] - chunk[0], views, classes))
            return len(images)

        done = (n - sum(e - s for s, e in todo)) * views
        with ThreadPoolExecutor(workers) as executor, tqdm(total=n * views, initial=done, unit="view",
                                                           desc="teacher views", disable=not verbose) as bar:
            pending = set()
            try:
                for chunk, images in zip(todo, batches):
                    images = images.numpy()
                    assert len(images) == (chunk[1] - chunk[0]) * views, (chunk, images.shape)
                    pending.add(executor.submit(label, chunk, images))
                    while len(pending) > workers:
                        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                        bar.update(sum(f.result() for f in finished))
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    bar.update(sum(f.result() for f in finished))
            except BaseException:
                for future in pending:
                    future.cancel()
                raise
            finally:  # a resumed fill's cost is the sum of its calls
                _add_fill_seconds(parts, time.perf_counter() - started)
    chunks = [_read_part(parts, c, views, classes) for c in plan]
    if any(c is None for c in chunks) and path.is_file():  # another fill of this cache finished first
        shutil.rmtree(parts, ignore_errors=True)
        return load_view_cache(path, meta)
    if any(c is None for c in chunks):
        raise ViewCacheError(f"teacher view cache {path}: chunks in {parts} vanished while filling "
                             "(another fill of the same cache?); run it again.")
    probs = np.concatenate(chunks)
    _write(path, np.savez, probs=probs, meta=np.array(json.dumps(meta)))
    atomic_write(path.with_suffix(".json"), json.dumps(
        {"key": path.stem, "made_for": made_for, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
         "fill_seconds": round(_fill_seconds(parts), 3), "workers": workers, "meta": meta},
        indent=1))
    shutil.rmtree(parts, ignore_errors=True)
    if verbose:
        print(f"teacher view cache: wrote {path} ({n:,} images x {views} views).")
    return ViewCache(path, meta, probs)


def _fill_seconds(parts: Path) -> float:
    seconds = parts / "fill_seconds.txt"
    return float(seconds.read_text()) if seconds.is_file() else 0.0


def _add_fill_seconds(parts: Path, seconds: float) -> None:
    # Kept unrounded: a small fill resumed over several calls must not round each call to 0.
    atomic_write(parts / "fill_seconds.txt", repr(_fill_seconds(parts) + seconds))


def cost(cache: ViewCache) -> dict:
    """What a run records of its cache (summary.json, then the card): file, views, fill time."""
    info_file = Path(cache.path).with_suffix(".json")
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    return {"file": Path(cache.path).name, "views": int(np.prod(cache.probs.shape[:2])),
            "fill_seconds": info.get("fill_seconds"), "workers": info.get("workers")}


def _announce(x, ensemble, meta, path, done, total, workers, settings):
    """One line of what the fill does and about how long it takes (the teachers timed on 16 views)."""
    from ..data.augment import make_views

    n, views = len(x), meta["views"]
    sample = next(iter(make_views(x[:16], np.arange(min(16, n)), np.zeros(min(16, n), int), batch_size=16,
                                  **settings))).numpy()
    ensemble.predict(sample)  # warm-up: first invoke at this batch size
    t0 = time.perf_counter()
    ensemble.predict(sample)
    per_view = (time.perf_counter() - t0) / len(sample)
    left = per_view * n * views * (total - done) / total
    print(f"teacher view cache: {n:,} images x {views} views = {n * views:,} views for {ensemble}: "
          f"~{per_view * 1e3:.1f} ms a view, ~{_duration(left)} on one core"
          + (f", ~{_duration(left / workers)} with {workers} workers" if workers > 1 else "")
          + (f"; {done} of {total} chunks already done" if done else "") + f"; writing {path}.")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 2 * 3600 else f"{seconds / 3600:.1f} h"


def _nearest(folder: Path, meta: dict):
    """``(file, made_for, differences)`` of the existing cache closest to ``meta``, or None."""
    best = None
    for info in sorted(folder.glob("*.json")):
        try:
            other = json.loads(info.read_text())
            changed = differences(other["meta"], meta)
        except Exception:  # not one of ours
            continue
        if best is None or len(changed) < len(best[2]):
            best = (info.with_suffix(".npz"), other.get("made_for", ""), changed)
    return best


def ensure_view_cache(recipe, x, ensemble, *, cache_dir=None, workers=None, verbose: int = 1) -> ViewCache:
    """The recipe's teacher view cache for the training images ``x``: loaded when it exists,
    else filled now (see :func:`fill_view_cache`)."""
    views = view_count(recipe)
    if views < 1:
        raise ValueError(f"recipe {recipe.name}: kd.view_cache is not set; nothing to cache.")
    meta = cache_meta(x, ensemble, views, view_settings(recipe))
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    path = folder / f"{cache_key(meta)}.npz"
    if path.is_file():
        cache = load_view_cache(path, meta)
        if verbose:
            print(f"{recipe.name}: teacher view cache {path} ({len(x):,} images x {views} views).")
        return cache
    if verbose:
        nearest = _nearest(folder, meta) if folder.is_dir() else None
        if nearest:
            print(f"teacher view cache: none in {folder} for these views; the nearest, {nearest[0].name}"
                  f"{' (made for ' + nearest[1] + ')' if nearest[1] else ''}, differs in {', '.join(nearest[2])}.")
    return fill_view_cache(x, ensemble, meta, path, workers=workers, chunk_views=CHUNK_VIEWS, verbose=verbose,
                           made_for=recipe.name)
