"""People cut out of photos by their pixel masks, to paste into person-free scenes.

Two sources have person masks: Penn-Fudan (``pennfudan_256.tar.gz``: one instance id per person
in ``masks/*_mask.png``) and the COCO train2017 sample (``coco128_train2017_256.tar.gz``:
instance polygons in ``labels_polygons/*.txt``, normalised, whose class is the COCO category id:
1 = person, unlike the 0-based ids of ``labels_boxes/``). A cut-out is the
person's bounding box as RGB plus a float alpha mask of the same size, which
:func:`glt_keras.data.paste_augment` pastes instead of an elliptical window.

    >>> people = person_cutouts("pennfudan")          # doctest: +SKIP
    >>> rgb, alpha = people[0]; rgb.shape[:2] == alpha.shape
    True
"""
from __future__ import annotations

import io
import tarfile
from typing import Dict, Iterator, List, Tuple

import numpy as np

from .catalog import DATASETS
from .image_files import norm_member
from .sources import find_data_dir

__all__ = ["CUTOUT_SOURCES", "person_cutouts"]

Cutout = Tuple[np.ndarray, np.ndarray]  # (uint8 (h, w, 3), float32 (h, w) alpha in [0, 1])
CUTOUT_SOURCES = ("pennfudan", "coco128")
#: labels_polygons/ name classes by COCO category id (checked against labels_boxes/, 0-based).
COCO_PERSON_CATEGORY = 1


def _files(name: str, data_dir) -> Dict[str, bytes]:
    """Every file of a data set's archive (or extracted copy) by its name inside the archive."""
    info = DATASETS[name]
    root = find_data_dir(data_dir)
    archive = root / info.archive
    out: Dict[str, bytes] = {}
    if archive.is_file():
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                if member.isfile():
                    out[norm_member(member.name)] = tar.extractfile(member).read()
        return out
    for folder in info.folders:
        if (root / folder).is_dir():
            for f in sorted((root / folder).rglob("*")):
                if f.is_file():
                    out[info.prefix + f.relative_to(root / folder).as_posix()] = f.read_bytes()
            return out
    raise FileNotFoundError(f"Dataset {name!r} not found in {root} (looked for {info.archive} and "
                            f"folders {list(info.folders)}).")


def _open(data: bytes, mode: str):
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.convert(mode) if mode else im.copy()


def _crop(rgb: np.ndarray, alpha: np.ndarray, min_height: int, max_height: int) -> Cutout | None:
    from PIL import Image

    rows, cols = np.flatnonzero(alpha.any(1)), np.flatnonzero(alpha.any(0))
    if len(rows) == 0 or rows[-1] - rows[0] + 1 < min_height:
        return None
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    rgb, alpha = rgb[y0:y1, x0:x1], alpha[y0:y1, x0:x1].astype(np.float32)
    if rgb.shape[0] > max_height:
        w = max(1, round(rgb.shape[1] * max_height / rgb.shape[0]))
        rgb = np.asarray(Image.fromarray(rgb).resize((w, max_height), Image.Resampling.LANCZOS))
        alpha = np.asarray(Image.fromarray(alpha).resize((w, max_height), Image.Resampling.BILINEAR))
    return np.ascontiguousarray(rgb, np.uint8), np.clip(alpha, 0.0, 1.0).astype(np.float32)


def _pennfudan(files: Dict[str, bytes], min_height: int, max_height: int) -> Iterator[Cutout]:
    prefix = DATASETS["pennfudan"].prefix
    for name in sorted(n for n in files if n.startswith(prefix + "masks/") and n.endswith("_mask.png")):
        stem = name.rsplit("/", 1)[-1][: -len("_mask.png")]
        image = files.get(f"{prefix}images/{stem}.jpg")
        if image is None:
            raise FileNotFoundError(f"pennfudan: mask {name} has no image images/{stem}.jpg")
        rgb = np.asarray(_open(image, "RGB"))
        ids = np.asarray(_open(files[name], ""))  # instance ids, 0 = background
        if ids.shape != rgb.shape[:2]:
            raise ValueError(f"pennfudan: mask {name} is {ids.shape}, its image {rgb.shape[:2]}")
        for person in np.unique(ids[ids > 0]):
            cut = _crop(rgb, ids == person, min_height, max_height)
            if cut is not None:
                yield cut


def _coco128(files: Dict[str, bytes], min_height: int, max_height: int) -> Iterator[Cutout]:
    from PIL import Image, ImageDraw

    prefix = DATASETS["coco128"].prefix
    for name in sorted(n for n in files if n.startswith(prefix + "labels_polygons/") and n.endswith(".txt")):
        stem = name.rsplit("/", 1)[-1][:-4]
        image = files.get(f"{prefix}images/{stem}.jpg")
        if image is None:
            continue
        rgb = np.asarray(_open(image, "RGB"))
        h, w = rgb.shape[:2]
        for line in files[name].decode("utf-8").splitlines():
            values = line.split()
            if not values or int(values[0]) != COCO_PERSON_CATEGORY or len(values) < 7:
                continue
            xy = np.asarray(values[1:], np.float64).reshape(-1, 2) * (w, h)
            canvas = Image.new("L", (w, h), 0)
            ImageDraw.Draw(canvas).polygon([tuple(p) for p in xy], fill=255)
            cut = _crop(rgb, np.asarray(canvas) > 127, min_height, max_height)
            if cut is not None:
                yield cut


def person_cutouts(name: str, *, data_dir=None, min_height: int = 48, max_height: int = 160) -> List[Cutout]:
    """People cut out by their masks: ``[(rgb uint8 (h, w, 3), alpha float32 (h, w)), ...]``.

    ``name``: ``"pennfudan"`` or ``"coco128"``. People less than ``min_height`` pixels tall in
    the stored photos are left out (pasted larger they would be blurred); taller ones are
    scaled down to ``max_height``.
    """
    if name not in CUTOUT_SOURCES:
        raise ValueError(f"No person masks in {name!r}: person cut-outs come from {list(CUTOUT_SOURCES)}.")
    files = _files(name, data_dir)
    cuts = list((_pennfudan if name == "pennfudan" else _coco128)(files, min_height, max_height))
    if not cuts:
        raise ValueError(f"{name}: no person of at least {min_height} pixels found.")
    return cuts
