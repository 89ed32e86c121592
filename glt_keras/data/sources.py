"""Loading image data: the packed archives in ``shared/data`` and the original layouts, TFDS
STL-10 and COCO Visual Wake Words.

Everything here returns a :class:`~.catalog.Dataset`: ``x`` uint8 ``(N, H, W, 3)``, ``y`` int32
``(N,)``, the class names, and optional per-image metadata (source-photo ``groups``, ``sources``
tags, ``files`` names).

Decoding the JPEG/PNG archives is slow (CIFAR-10: ~60k files), so :func:`load_arrays` decodes
each archive once, in one streaming pass over the ``tar.gz`` (nothing is extracted to disk), and
writes every split it found to an uncompressed ``.npz`` in :func:`cache_dir`. The cache file name
holds the dataset name, the split, and the archive's size and mtime, so replacing the archive
invalidates the cache. Later calls load the ``.npz`` and never open the archive.

Where to find the data (see :func:`find_data_dir`): ``--data-dir`` / ``data_dir=``, else the
``GLT_DATA_DIR`` environment variable, else ``../shared/data`` next to the project.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import tarfile
import tempfile
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .catalog import (ASSEMBLERS, CIFAR10_CLASSES, DATASETS, PERSON_CLASSES, STL10_CLASSES, Dataset, DatasetInfo,
                      image_filter)
from .image_files import ImageSize, as_hw, decode_image, is_image, progress, read_folder, read_tar, walk_files

__all__ = [
    "cache_dir",
    "find_data_dir",
    "load_arrays",
    "load_coco_vww",
    "load_image_folder",
    "load_tfds_stl10",
    "person_scenes_sources",
]

# Bump when the decoded content of a cache file changes (resize filter in image_files.py, split
# rule in catalog.py, fields...).
CACHE_VERSION = 1
_HINT = "Pass --data-dir (data_dir=...) or set the GLT_DATA_DIR environment variable to the folder holding the data."


# --------------------------------------------------------------------------------------------
# Locations


def _project_root() -> Path:
    """The folder that contains the ``glt_keras`` package."""
    return Path(__file__).resolve().parents[2]


def find_data_dir(data_dir: Union[str, os.PathLike, None] = None) -> Path:
    """Where the data archives are.

    ``data_dir`` if given, else ``$GLT_DATA_DIR``, else ``../shared/data`` relative to the project
    root (the folder containing ``glt_keras``) or to the current directory, whichever exists.

    Raises:
        FileNotFoundError: naming every place looked at, and how to point at the data.
    """
    if data_dir is not None:
        candidates = [("data_dir argument / --data-dir", Path(data_dir).expanduser())]
    elif os.environ.get("GLT_DATA_DIR"):
        candidates = [("GLT_DATA_DIR", Path(os.environ["GLT_DATA_DIR"]).expanduser())]
    else:
        candidates = [("../shared/data next to the project", _project_root().parent / "shared" / "data"),
                      ("../shared/data from the current directory", Path.cwd().parent / "shared" / "data")]
    for _, path in candidates:
        if path.is_dir():
            return path.resolve()
    looked = "\n".join(f"  - {path}  ({why})" for why, path in candidates)
    raise FileNotFoundError(f"No data directory found. Looked in:\n{looked}\n{_HINT}")


def cache_dir() -> Path:
    """Where decoded arrays are cached: ``$GLT_CACHE_DIR``, else ``~/.cache/glt_keras`` (created)."""
    path = Path(os.environ.get("GLT_CACHE_DIR") or Path.home() / ".cache" / "glt_keras").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------------------------
# Cache


def _cache_path(name: str, split: str, key: str) -> Path:
    return cache_dir() / f"{name}_{split}_{key}_v{CACHE_VERSION}.npz"


def _source_key(kind: str, path: Path, files: Optional[List[Path]] = None) -> str:
    if kind == "archive":
        st = path.stat()
        return f"{st.st_size}_{int(st.st_mtime)}"
    # Extracted folder: file count, total size and newest mtime, plus a hash of its path.
    sizes = mtimes = 0
    for f in files:
        st = f.stat()
        sizes += st.st_size
        mtimes = max(mtimes, int(st.st_mtime))
    tag = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    return f"dir{tag}_{len(files)}_{sizes}_{mtimes}"


def _save_npz(path: Path, ds: Dataset) -> None:
    arrays = {"x": ds.x, "y": ds.y, "class_names": np.array(ds.class_names, dtype=str)}
    for field in ("groups", "sources", "files"):
        value = getattr(ds, field)
        if value is not None:
            arrays[field] = value
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _load_npz(path: Path) -> Dataset:
    with np.load(path, allow_pickle=False) as z:
        get = lambda k: z[k] if k in z.files else None  # noqa: E731
        return Dataset(z["x"], z["y"], [str(c) for c in z["class_names"]],
                       groups=get("groups"), sources=get("sources"), files=get("files"))


# --------------------------------------------------------------------------------------------
# CIFAR-10 original python pickles


def _cifar_pickle_batches(split: str) -> List[str]:
    return [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]


def _load_cifar_pickles(source: Path, split: str) -> Dataset:
    wanted = _cifar_pickle_batches(split)
    blobs: Dict[str, bytes] = {}
    if source.is_dir():
        for b in wanted:
            f = source / b
            if not f.is_file():
                raise FileNotFoundError(f"CIFAR-10 batch file {f} is missing")
            blobs[b] = f.read_bytes()
    else:
        with tarfile.open(source, "r:*") as tar:
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in wanted:
                    blobs[base] = tar.extractfile(member).read()
        missing = [b for b in wanted if b not in blobs]
        if missing:
            raise FileNotFoundError(f"CIFAR-10 archive {source} lacks {missing}")
    xs, ys = [], []
    for b in wanted:
        d = pickle.loads(blobs[b], encoding="bytes")
        xs.append(np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(d[b"labels"], np.int32))
    # The pickles' label order (airplane, automobile, ..., truck) is the alphabetical one.
    return Dataset(np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys), list(CIFAR10_CLASSES))


# --------------------------------------------------------------------------------------------
# Public loaders


def _check_name_split(name: str, split: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}. Known datasets: {', '.join(sorted(DATASETS))}")
    info = DATASETS[name]
    if split not in info.splits:
        raise ValueError(f"Dataset {name!r} has no split {split!r}. Valid splits: {', '.join(info.splits)}")
    return info


def load_arrays(name: str, split: str, *, data_dir=None, cache: bool = True) -> Dataset:
    """Load one split of a known dataset (see :data:`.catalog.DATASETS`) as uint8 arrays.

    Looks in the data dir (:func:`find_data_dir`) for the packed archive (e.g.
    ``cifar10_jpg.tar.gz``), else an extracted copy with the same layout (e.g. ``cifar10/train/
    <class>/*.jpg``), else for CIFAR-10 the original python pickles. Archives and folders are
    decoded once; all their splits are cached as ``.npz`` in :func:`cache_dir` (``cache=False``
    decodes again and writes nothing).
    """
    info = _check_name_split(name, split)
    root = find_data_dir(data_dir)
    archive = root / info.archive
    looked = [archive]
    if archive.is_file():
        kind, source, files = "archive", archive, None
    else:
        kind = source = files = None
        for folder in info.folders:
            candidate = root / folder
            looked.append(candidate)
            if candidate.is_dir():
                # An extracted copy: the archive's top folder (inria_person/, vww_like/, ...),
                # or for cifar10 a folder holding train/ and test/.
                kind, source = "folder", candidate
                break
        if kind is None and name == "cifar10":
            for candidate in (root / "cifar-10-batches-py", root / "cifar-10-python.tar.gz"):
                looked.append(candidate)
                if candidate.exists():
                    return _load_cifar_pickles(candidate, split)
        if kind is None:
            places = "\n".join(f"  - {p}" for p in looked)
            raise FileNotFoundError(f"Dataset {name!r} not found. Looked for:\n{places}\n{_HINT}")
        files = walk_files(source)

    key = _source_key(kind, source, files)
    path = _cache_path(name, split, key)
    if cache and path.is_file():
        try:
            return _load_npz(path)
        except Exception as e:  # a damaged cache file: decode again
            warnings.warn(f"Ignoring unreadable cache file {path}: {e}")

    if kind == "archive":
        images, texts = read_tar(source, image_filter(info), info.image_size)
    else:
        images, texts = read_folder(source, info.prefix, image_filter(info), info.image_size)
    if not images:
        raise ValueError(f"{name}: no images under {info.prefix or 'the top folder'} in {source}")
    result = ASSEMBLERS[name](info, images, texts)
    del images
    if cache:
        for s, ds in result.items():
            _save_npz(_cache_path(name, s, key), ds)
        _remove_stale_caches(name, key, splits=list(result))
    return result[split]


def _remove_stale_caches(name: str, key: str, splits) -> None:
    """One cached decode per dataset: a re-copied archive (new mtime) or a new cache version
    would otherwise leave the old decode behind for good (person_scenes train: 557 MB each)."""
    keep = {_cache_path(name, s, key) for s in splits}
    stale = re.compile(rf"{re.escape(name)}_({'|'.join(map(re.escape, splits))})_.+_v\d+\.npz")
    for path in cache_dir().glob(f"{name}_*.npz"):
        if path not in keep and stale.fullmatch(path.name):
            try:
                path.unlink()
            except OSError:  # another process's, or read-only: it only costs disk
                pass


def person_scenes_sources(split: str, data_dir=None) -> np.ndarray:
    """Per-image source tag (``"voc"`` or ``"intel"``) of ``load_arrays("person_scenes", split)``.

    Intel scenes are not person-annotated (some show small people); filter with e.g.
    ``ds.subset(person_scenes_sources("train") == "voc")``.
    """
    return load_arrays("person_scenes", split, data_dir=data_dir).sources


def load_image_folder(root, *, image_size: Optional[ImageSize], class_names: Optional[Sequence[str]] = None,
                      split: Optional[str] = None) -> Dataset:
    """Load an ``root/<class>/*.jpg|jpeg|png`` tree (extensions case-insensitive).

    Args:
        root: the folder holding one sub-folder per class (or, with ``split``, the folder holding
            ``<split>/<class>/...``, e.g. an original-layout CIFAR-10 copy with train/ and test/).
        image_size: int or (height, width): every image is squashed to it (antialiased). None keeps
            the original size, which must then be the same for all images.
        class_names: the classes to load, in label order; default: all class folders, sorted.
        split: optional sub-folder of ``root`` to read.

    Raises:
        FileNotFoundError: missing root / split / class folder.
        ValueError: no class folders, or an empty class folder (named).
        CorruptImageError: an image that cannot be decoded (named).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"Image folder {root} does not exist")
    if split is not None:
        sub = root / split
        if not sub.is_dir():
            present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
            raise FileNotFoundError(f"No split folder {sub} (folders in {root}: {present})")
        root = sub
    if class_names is None:
        class_names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_names:
            raise ValueError(f"No class folders in {root}: expected {root}/<class>/*.jpg")
    class_names = [str(c) for c in class_names]
    size_hw = as_hw(image_size)
    items: List[Tuple[Path, int]] = []
    for label, cls in enumerate(class_names):
        folder = root / cls
        if not folder.is_dir():
            raise FileNotFoundError(f"Class folder {folder} does not exist")
        files = sorted(f for f in folder.iterdir()
                       if f.is_file() and is_image(f.name) and not f.name.startswith("."))
        if not files:
            raise ValueError(f"Class folder {folder} has no images (.jpg, .jpeg or .png)")
        items.extend((f, label) for f in files)
    arrays = []
    with progress(len(items), f"decoding {root}") as bar:
        for f, _ in items:
            arrays.append(decode_image(f.read_bytes(), size_hw, f"'{f}'"))
            bar.update(1)
    if size_hw is None:
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"Images in {root} have different sizes {sorted(shapes)[:4]}...; pass image_size")
    x = np.stack(arrays) if arrays else np.zeros((0,) + (size_hw or (1, 1)) + (3,), np.uint8)
    y = np.array([label for _, label in items], np.int32)
    files = np.array([f.relative_to(root).as_posix() for f, _ in items], dtype=str)
    return Dataset(x, y, class_names, files=files)


def _resize_batch(x: np.ndarray, size_hw: Tuple[int, int]) -> np.ndarray:
    from PIL import Image

    if x.shape[1:3] == tuple(size_hw):
        return x
    out = np.empty((len(x), size_hw[0], size_hw[1], 3), np.uint8)
    for i, img in enumerate(x):
        out[i] = np.asarray(Image.fromarray(img).resize((size_hw[1], size_hw[0]), Image.Resampling.LANCZOS))
    return out


def load_tfds_stl10(split: str, *, data_dir=None, manual_dir=None, image_size: ImageSize = 96,
                    download: bool = False) -> Dataset:
    """STL-10 through TensorFlow Datasets (``tfds.load("stl10")``), as uint8 arrays.

    Args:
        split: a TFDS split string: ``"train"``, ``"test"``, ``"unlabelled"``, or slices
            such as ``"train[:10%]"``.
        data_dir: the TFDS data dir holding a prepared ``stl10/`` (default ``~/tensorflow_datasets``).
        manual_dir: a folder with the downloaded STL-10 files; allows preparing without network.
        image_size: int or (height, width); images are resized (antialiased) when not 96x96.
        download: allow TFDS to download and prepare the data over the network.

    Raises:
        FileNotFoundError: the data are not prepared / not available offline.
    """
    import tensorflow_datasets as tfds

    kwargs = {}
    if manual_dir is not None:
        kwargs["download_and_prepare_kwargs"] = {
            "download_config": tfds.download.DownloadConfig(manual_dir=str(manual_dir))}
    try:
        ds, info = tfds.load("stl10", split=split, data_dir=None if data_dir is None else str(data_dir),
                             as_supervised=True, with_info=True,
                             download=bool(download or manual_dir is not None), **kwargs)
    except Exception as e:  # tfds raises AssertionError / DatasetNotFoundError / network errors
        where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
        raise FileNotFoundError(
            f"STL-10 is not available offline: TFDS could not load 'stl10' split {split!r} from "
            f"data_dir={where}" + (f" (manual_dir={manual_dir})" if manual_dir else "") +
            f" [{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}]. Prepare it on a "
            "machine with network (`tfds build stl10`) and copy the tensorflow_datasets folder, "
            "then pass data_dir=...; or call with download=True where the network is reachable."
        ) from e
    xs, ys = [], []
    for images, labels in tfds.as_numpy(ds.batch(1024)):
        xs.append(np.asarray(images, np.uint8))
        ys.append(np.asarray(labels, np.int32))
    x = np.concatenate(xs) if xs else np.zeros((0, 96, 96, 3), np.uint8)
    y = np.concatenate(ys) if ys else np.zeros((0,), np.int32)
    x = _resize_batch(x, as_hw(image_size))
    class_names = [str(c) for c in info.features["label"].names]
    if class_names == [str(i) for i in range(len(class_names))]:  # metadata without names (mocks)
        class_names = list(STL10_CLASSES)
    return Dataset(x, y, class_names)


def load_coco_vww(instances_json, images_dir, *, image_size: ImageSize = 96,
                  min_area_fraction: float = 0.005) -> Dataset:
    """Visual Wake Words from COCO ``instances_*.json`` + images, built with pycocotools.

    An image is ``person`` (1) when any ``person`` annotation's bounding box area (w*h) is more
    than ``min_area_fraction`` (0.5%) of the image area (``width*height`` of the image entry), else
    ``non_person`` (0). (The TF-slim reference script compares the annotation's ``area`` field;
    the box area is what the VWW paper describes.) Images are squashed to ``image_size``.
    ``groups`` holds the COCO image ids, ``files`` the file names.
    """
    from pycocotools.coco import COCO

    instances_json, images_dir = Path(instances_json), Path(images_dir)
    if not instances_json.is_file():
        raise FileNotFoundError(f"COCO annotation file {instances_json} does not exist")
    if not images_dir.is_dir():
        raise FileNotFoundError(f"COCO image folder {images_dir} does not exist")
    coco = COCO(str(instances_json))
    person_ids = coco.getCatIds(catNms=["person"])
    if not person_ids:
        raise ValueError(f"{instances_json} has no 'person' category")
    size_hw = as_hw(image_size)
    image_ids = sorted(coco.getImgIds())
    x = np.empty((len(image_ids), size_hw[0], size_hw[1], 3), np.uint8)
    y = np.zeros(len(image_ids), np.int32)
    files = []
    with progress(len(image_ids), f"decoding {images_dir}") as bar:
        for i, image_id in enumerate(image_ids):
            entry = coco.loadImgs(image_id)[0]
            image_area = float(entry["width"]) * float(entry["height"])
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id], catIds=person_ids, iscrowd=None))
            y[i] = int(any(a["bbox"][2] * a["bbox"][3] > min_area_fraction * image_area for a in anns))
            path = images_dir / entry["file_name"]
            if not path.is_file():
                raise FileNotFoundError(f"COCO image {path} (id {image_id}) is missing")
            x[i] = decode_image(path.read_bytes(), size_hw, f"'{path}'")
            files.append(entry["file_name"])
            bar.update(1)
    return Dataset(x, y, list(PERSON_CLASSES), groups=np.array(image_ids, np.int64),
                   files=np.array(files, dtype=str))
