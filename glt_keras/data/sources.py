"""Image data sources: the packed archives in ``shared/data`` and the original layouts.

Everything here returns a :class:`Dataset`: ``x`` uint8 ``(N, H, W, 3)``, ``y`` int32 ``(N,)``,
the class names, and optional per-image metadata (source-photo ``groups``, ``sources`` tags,
``files`` names).

Decoding the JPEG/PNG archives is slow (CIFAR-10: ~60k files), so :func:`load_arrays` decodes
each archive once, in one streaming pass over the ``tar.gz`` (nothing is extracted to disk), and
writes every split it found to an uncompressed ``.npz`` in :func:`cache_dir`. The cache file name
holds the dataset name, the split, and the archive's size and mtime, so replacing the archive
invalidates the cache. Later calls load the ``.npz`` and never open the archive.

Where to find the data (see :func:`find_data_dir`): ``--data-dir`` / ``data_dir=``, else the
``GLT_DATA_DIR`` environment variable, else ``../shared/data`` next to the project.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import re
import tarfile
import tempfile
import warnings
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "DATASETS",
    "CorruptImageError",
    "Dataset",
    "DatasetInfo",
    "cache_dir",
    "find_data_dir",
    "inria_group_key",
    "load_arrays",
    "load_coco_vww",
    "load_image_folder",
    "load_tfds_stl10",
    "person_scenes_sources",
]

# Bump when the decoded content of a cache file changes (resize filter, split rule, fields...).
CACHE_VERSION = 1

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_TEXT_EXTENSIONS = (".txt", ".csv")
_HINT = "Pass --data-dir (data_dir=...) or set the GLT_DATA_DIR environment variable to the folder holding the data."

ImageSize = Union[int, Tuple[int, int]]


class CorruptImageError(ValueError):
    """An image file could not be decoded; the message names the file."""


# --------------------------------------------------------------------------------------------
# Dataset container


@dataclasses.dataclass
class Dataset:
    """Decoded images and labels.

    Attributes:
        x: uint8 array ``(N, H, W, 3)``.
        y: int32 array ``(N,)`` of class indices into ``class_names``.
        class_names: class names in label order.
        groups: optional int array ``(N,)``: id of the source photo of each image (images that
            share a photo must not be split between train and test), or None.
        sources: optional str array ``(N,)``: where each image comes from (e.g. ``voc`` /
            ``intel`` for ``person_scenes``), or None.
        files: optional str array ``(N,)``: each image's path inside its archive / folder.
    """

    x: np.ndarray
    y: np.ndarray
    class_names: List[str]
    groups: Optional[np.ndarray] = None
    sources: Optional[np.ndarray] = None
    files: Optional[np.ndarray] = None

    def __post_init__(self):
        self.x = np.asarray(self.x)
        self.y = np.asarray(self.y, dtype=np.int32)
        self.class_names = [str(c) for c in self.class_names]
        if self.x.ndim != 4 or self.x.shape[-1] != 3:
            raise ValueError(f"Dataset.x must have shape (N, H, W, 3), got {self.x.shape}")
        if len(self.x) != len(self.y):
            raise ValueError(f"Dataset.x has {len(self.x)} images but y has {len(self.y)} labels")
        for field in ("groups", "sources", "files"):
            value = getattr(self, field)
            if value is not None and len(value) != len(self.y):
                raise ValueError(f"Dataset.{field} has {len(value)} entries, expected {len(self.y)}")

    def __len__(self) -> int:
        return int(len(self.y))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> Tuple[int, int]:
        """(height, width) of the images."""
        return int(self.x.shape[1]), int(self.x.shape[2])

    def class_counts(self) -> np.ndarray:
        """Number of images per class, in ``class_names`` order."""
        return np.bincount(self.y, minlength=self.num_classes)

    def subset(self, index) -> "Dataset":
        """A new Dataset with the images selected by a boolean mask or an index array."""
        index = np.asarray(index)

        def pick(a):
            return None if a is None else a[index]

        return Dataset(self.x[index], self.y[index], list(self.class_names),
                       pick(self.groups), pick(self.sources), pick(self.files))

    def __repr__(self) -> str:
        return (f"Dataset(n={len(self)}, image_size={self.image_size}, "
                f"classes={self.num_classes}, counts={self.class_counts().tolist()})")


# --------------------------------------------------------------------------------------------
# Known datasets

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]
PERSON_CLASSES = ["non_person", "person"]
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
# Folder names of caltech101_128.tar.gz, sorted the way ``sorted()`` sorts them (upper case first).
CALTECH101_CLASSES = sorted("""
BACKGROUND_Google Faces Faces_easy Leopards Motorbikes accordion airplanes anchor ant barrel bass
beaver binocular bonsai brain brontosaurus buddha butterfly camera cannon car_side ceiling_fan
cellphone chair chandelier cougar_body cougar_face crab crayfish crocodile crocodile_head cup
dalmatian dollar_bill dolphin dragonfly electric_guitar elephant emu euphonium ewer ferry flamingo
flamingo_head garfield gerenuk gramophone grand_piano hawksbill headphone hedgehog helicopter ibis
inline_skate joshua_tree kangaroo ketch lamp laptop llama lobster lotus mandolin mayfly menorah
metronome minaret nautilus octopus okapi pagoda panda pigeon pizza platypus pyramid revolver rhino
rooster saxophone schooner scissors scorpion sea_horse snoopy soccer_ball stapler starfish
stegosaurus stop_sign strawberry sunflower tick trilobite umbrella watch water_lilly wheelchair
wild_cat windsor_chair wrench yin_yang
""".split())
assert len(CALTECH101_CLASSES) == 102
IMAGENETTE_CLASSES = ["cassette_player", "chain_saw", "church", "english_springer", "french_horn",
                      "garbage_truck", "gas_pump", "golf_ball", "parachute", "tench"]
#: The VWW rule: an image shows a person when a person box covers more than this share of it.
VWW_PERSON_AREA = 0.005


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What :func:`load_arrays` knows about one dataset."""

    name: str
    archive: str  # file name in the data dir
    class_names: Tuple[str, ...]
    splits: Tuple[str, ...]
    image_size: Tuple[int, int]  # (height, width) of the cached images
    prefix: str  # top folder inside the archive ("" if none)
    folders: Tuple[str, ...]  # names of an extracted copy inside the data dir
    description: str = ""


DATASETS: Dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(
        "cifar10", "cifar10_jpg.tar.gz", tuple(CIFAR10_CLASSES), ("train", "test"), (32, 32),
        prefix="", folders=("cifar10", "cifar10_jpg", "CIFAR-10-images"),
        description="CIFAR-10 (JPEG copy), 50,000 train / 10,000 test, 32x32. The original "
                    "python pickles (cifar-10-batches-py/ or cifar-10-python.tar.gz) work too."),
    "vww_val500": DatasetInfo(
        "vww_val500", "vww_val500.tar.gz", tuple(PERSON_CLASSES), ("val",), (96, 96),
        prefix="vww_val500/", folders=("vww_val500",),
        description="Visual Wake Words validation half (250 person / 250 non-person), 96x96. "
                    "Validation only: never train on it."),
    "person_scenes": DatasetInfo(
        "person_scenes", "person_scenes_128.tar.gz", tuple(PERSON_CLASSES), ("train", "val"),
        (128, 128), prefix="vww_like/", folders=("vww_like", "person_scenes_128"),
        description="VWW-style full scenes (759 person VOC / 11,779 no-person VOC+Intel), "
                    "squashed to 128x128; ~90/10 train/val by file-name hash; sources voc/intel."),
    "inria_person": DatasetInfo(
        "inria_person", "inria_person_64x128.tar.gz", tuple(PERSON_CLASSES), ("train", "test"),
        (128, 64), prefix="inria_person/", folders=("inria_person",),
        description="INRIA Person 64x128 (w x h) windows, 2,416 pos / 4,146 neg; ~85/15 "
                    "train/test split by source photo (groups = photo id)."),
    "caltech101": DatasetInfo(
        "caltech101", "caltech101_128.tar.gz", tuple(CALTECH101_CLASSES), ("train", "test"),
        (112, 112), prefix="caltech101/", folders=("caltech101", "caltech101_128"),
        description="Caltech-101 + BACKGROUND_Google (102 classes), fixed train.txt/test.txt "
                    "split, squashed to 112x112 (take 96x96 crops)."),
    "imagenette": DatasetInfo(
        "imagenette", "imagenette_96.tar.gz", tuple(IMAGENETTE_CLASSES), ("train", "val"), (96, 96),
        prefix="imagenette/", folders=("imagenette", "imagenette_96"),
        description="Imagenette v2 (10 easy ImageNet classes), official train/val split, 96x96. "
                    "About one photo in six shows people (no person labels: a teacher labels them)."),
    "pennfudan": DatasetInfo(
        "pennfudan", "pennfudan_256.tar.gz", tuple(PERSON_CLASSES), ("train",), (128, 128),
        prefix="pennfudan/", folders=("pennfudan", "pennfudan_256"),
        description="Penn-Fudan pedestrians: 170 street photos, every one showing people "
                    "(label person), squashed to 128x128. Their masks: glt_keras.data.person_cutouts."),
    "coco128": DatasetInfo(
        "coco128", "coco128_train2017_256.tar.gz", tuple(PERSON_CLASSES), ("train",), (128, 128),
        prefix="coco128_train2017/", folders=("coco128_train2017", "coco128_train2017_256"),
        description="The first 128 COCO train2017 images (never VWW's), squashed to 128x128; person "
                    "if a class-0 box covers more than 0.5% of the image (the VWW rule)."),
}

PERSON_SCENES_VAL_FRACTION = 0.10
INRIA_TEST_FRACTION = 0.15


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
# Decoding helpers


def _as_hw(image_size: Optional[ImageSize]) -> Optional[Tuple[int, int]]:
    if image_size is None:
        return None
    if isinstance(image_size, (int, np.integer)):
        return int(image_size), int(image_size)
    h, w = image_size
    return int(h), int(w)


def _decode_image(data: bytes, size_hw: Optional[Tuple[int, int]], name: str) -> np.ndarray:
    """Bytes -> uint8 RGB (H, W, 3), squashed to ``size_hw`` with an antialiased PIL resize."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if size_hw is not None:
                h, w = size_hw
                if im.format == "JPEG" and im.width >= 2 * w and im.height >= 2 * h:
                    im.draft("RGB", (w, h))  # DCT-domain downscale, still >= the target size
            im.load()
            if im.mode != "RGB":
                if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                    rgba = im.convert("RGBA")
                    im = Image.new("RGB", rgba.size, (0, 0, 0))
                    im.paste(rgba, mask=rgba.getchannel("A"))
                else:
                    im = im.convert("RGB")
            if size_hw is not None and (im.height, im.width) != tuple(size_hw):
                im = im.resize((size_hw[1], size_hw[0]), Image.Resampling.LANCZOS)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise CorruptImageError(f"Cannot decode image {name}: {e}") from e


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _progress(total=None, desc="", unit="img", unit_scale=False):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, mininterval=1.0,
                dynamic_ncols=True, leave=False)


class _CountingReader:
    """File wrapper that reports bytes read to a tqdm bar (for streaming a .tar.gz)."""

    def __init__(self, f, bar):
        self._f, self._bar = f, bar

    def read(self, n=-1):
        data = self._f.read(n)
        self._bar.update(len(data))
        return data


def _norm_member(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def _read_tar(path: Path, want: Callable[[str], bool], size_hw: Tuple[int, int]):
    """Stream a tar(.gz): decode the wanted images and keep small text files; nothing hits disk."""
    images: Dict[str, np.ndarray] = {}
    texts: Dict[str, bytes] = {}
    with open(path, "rb") as raw, _progress(os.path.getsize(path), f"decoding {path.name}",
                                            unit="B", unit_scale=True) as bar:
        try:
            with tarfile.open(fileobj=_CountingReader(raw, bar), mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    name = _norm_member(member.name)
                    base = name.rsplit("/", 1)[-1]
                    if base.startswith("._"):  # macOS resource forks
                        continue
                    if _is_image(name):
                        if want(name):
                            data = tar.extractfile(member).read()
                            images[name] = _decode_image(data, size_hw, f"'{name}' in archive {path}")
                            if len(images) % 2000 == 0:
                                bar.set_postfix(images=len(images), refresh=False)
                    elif name.lower().endswith(_TEXT_EXTENSIONS) and member.size < (16 << 20):
                        texts[name] = tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, zlib.error) as e:
            raise OSError(f"Archive {path} is damaged or not a tar archive: {e}") from e
    return images, texts


def _walk_files(root: Path) -> List[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    return files


def _read_folder(root: Path, prefix: str, want: Callable[[str], bool], size_hw: Tuple[int, int]):
    """Same as :func:`_read_tar` for an extracted copy; names get the archive's ``prefix``."""
    images: Dict[str, np.ndarray] = {}
    texts: Dict[str, bytes] = {}
    files = _walk_files(root)
    wanted = []
    for f in files:
        name = prefix + f.relative_to(root).as_posix()
        if _is_image(name):
            if want(name):
                wanted.append((name, f))
        elif name.lower().endswith(_TEXT_EXTENSIONS):
            texts[name] = f.read_bytes()
    with _progress(len(wanted), f"decoding {root}") as bar:
        for name, f in wanted:
            images[name] = _decode_image(f.read_bytes(), size_hw, f"'{f}'")
            bar.update(1)
    return images, texts


def _hash_fraction(key: str) -> float:
    """A stable number in [0, 1) from a string (same on every machine and Python version)."""
    digest = hashlib.sha1(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def _stack(names: Sequence[str], images: Dict[str, np.ndarray], size_hw: Tuple[int, int]) -> np.ndarray:
    x = np.empty((len(names), size_hw[0], size_hw[1], 3), dtype=np.uint8)
    for i, name in enumerate(names):
        x[i] = images[name]
    return x


# --------------------------------------------------------------------------------------------
# Per-dataset assembly: (decoded images by archive name, text files) -> {split: Dataset}


def _class_of(name: str, prefix: str, depth: int) -> str:
    """The folder name ``depth`` levels below ``prefix``."""
    parts = name[len(prefix):].split("/")
    return parts[depth] if len(parts) > depth + 1 else ""


def _by_folder(info: DatasetInfo, images, split_of: Callable[[str], str], class_depth: int):
    """Group images by split and label them by their class folder."""
    index = {c: i for i, c in enumerate(info.class_names)}
    per_split: Dict[str, List[str]] = {s: [] for s in info.splits}
    for name in sorted(images):
        cls = _class_of(name, info.prefix, class_depth)
        if cls not in index:
            raise ValueError(f"{info.name}: unexpected class folder {cls!r} for {name!r} "
                             f"(expected one of {list(info.class_names)})")
        per_split[split_of(name)].append(name)
    out = {}
    for split, names in per_split.items():
        y = np.array([index[_class_of(n, info.prefix, class_depth)] for n in names], np.int32)
        out[split] = Dataset(_stack(names, images, info.image_size), y, list(info.class_names),
                             files=np.array(names, dtype=str))
    return out


def _assemble_cifar10(info, images, texts):
    return _by_folder(info, images, lambda n: n.split("/", 1)[0], class_depth=1)


def _assemble_vww_val500(info, images, texts):
    return _by_folder(info, images, lambda n: "val", class_depth=0)


def _person_scenes_split(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    return "val" if _hash_fraction(base) < PERSON_SCENES_VAL_FRACTION else "train"


def _assemble_person_scenes(info, images, texts):
    folder_label = {"person": 1, "no_person": 0}
    per_split: Dict[str, List[str]] = {s: [] for s in info.splits}
    for name in sorted(images):
        folder = _class_of(name, info.prefix, 0)
        if folder not in folder_label:
            raise ValueError(f"person_scenes: unexpected folder {folder!r} for {name!r} "
                             "(expected person/ or no_person/)")
        per_split[_person_scenes_split(name)].append(name)
    out = {}
    for split, names in per_split.items():
        y = np.array([folder_label[_class_of(n, info.prefix, 0)] for n in names], np.int32)
        sources = np.array([n.rsplit("/", 1)[-1].split("_", 1)[0] for n in names], dtype=str)
        out[split] = Dataset(_stack(names, images, info.image_size), y, list(info.class_names),
                             sources=sources, files=np.array(names, dtype=str))
    return out


_NEG_PATCH = re.compile(r"^(\d+)_\d+$")  # N_k.jpg: patch k of photo N


def inria_group_key(name: str) -> str:
    """Source-photo key of an INRIA file name.

    Positives ``crop001001a.jpg``, ``person_123c.jpg``, ``person_and_bike_209b.jpg``: the trailing
    letter numbers the person (and its mirror) inside photo ``crop001001`` / ``person_123`` / ...
    Negatives ``N_k.jpg`` are patches of photo N; other negative names (``00000002a.jpg``,
    ``D2004-...jpg``, ``01-03d.jpg``) are one photo each (a trailing letter is dropped, which can
    only merge photos, never split one).
    """
    stem = name.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    if "/positive/" in "/" + name:
        return "pos:" + re.sub(r"[a-z]$", "", stem)
    m = _NEG_PATCH.match(stem)
    if m:
        return "neg:" + m.group(1)
    return "neg:" + re.sub(r"[a-z]$", "", stem)


def _assemble_inria_person(info, images, texts):
    folder_label = {"positive": 1, "negative": 0}
    names = sorted(images)
    for n in names:
        if _class_of(n, info.prefix, 0) not in folder_label:
            raise ValueError(f"inria_person: unexpected folder for {n!r} (expected positive/ or negative/)")
    keys = [inria_group_key(n) for n in names]
    group_ids = {k: i for i, k in enumerate(sorted(set(keys)))}
    out = {}
    for split in info.splits:
        sel = [i for i, k in enumerate(keys)
               if (_hash_fraction(k) < INRIA_TEST_FRACTION) == (split == "test")]
        split_names = [names[i] for i in sel]
        y = np.array([folder_label[_class_of(n, info.prefix, 0)] for n in split_names], np.int32)
        groups = np.array([group_ids[keys[i]] for i in sel], np.int64)
        out[split] = Dataset(_stack(split_names, images, info.image_size), y, list(info.class_names),
                             groups=groups, files=np.array(split_names, dtype=str))
    return out


def _assemble_caltech101(info, images, texts):
    out = {}
    index = {c: i for i, c in enumerate(info.class_names)}
    for split in info.splits:
        list_name = f"{info.prefix}{split}.txt"
        if list_name not in texts:
            raise FileNotFoundError(f"caltech101: split list {list_name!r} is missing from the data")
        names, skipped = [], []
        for line in texts[list_name].decode("utf-8").splitlines():
            line = line.strip()
            if not line:
                continue
            if not _is_image(line):  # e.g. "BACKGROUND_Google/tmp" in train.txt: not an image
                skipped.append(line)
                continue
            full = info.prefix + line
            if full not in images:
                raise FileNotFoundError(f"caltech101: {list_name} lists {line!r}, which is not in the data")
            if line.split("/", 1)[0] not in index:
                raise ValueError(f"caltech101: unknown class folder in {list_name}: {line!r}")
            names.append(full)
        if skipped:
            warnings.warn(f"caltech101: skipped {len(skipped)} non-image entries in {list_name}: {skipped[:5]}")
        y = np.array([index[_class_of(n, info.prefix, 0)] for n in names], np.int32)
        out[split] = Dataset(_stack(names, images, info.image_size), y, list(info.class_names),
                             files=np.array(names, dtype=str))
    return out


def _assemble_imagenette(info, images, texts):
    return _by_folder(info, images, lambda n: n[len(info.prefix):].split("/", 1)[0], class_depth=1)


def _assemble_pennfudan(info, images, texts):
    names = sorted(images)
    return {"train": Dataset(_stack(names, images, info.image_size), np.ones(len(names), np.int32),
                             list(info.class_names), files=np.array(names, dtype=str))}


def coco_person_area(label_text: str) -> float:
    """The largest person box's share of the image, from a YOLO box file (class 0 = person).

        >>> coco_person_area("0 0.5 0.5 0.1 0.2\\n2 0.5 0.5 0.9 0.9")
        0.020000000000000004
    """
    areas = [float(w) * float(h) for cls, _, _, w, h in
             (line.split()[:5] for line in label_text.splitlines() if line.strip()) if int(cls) == 0]
    return max(areas, default=0.0)


def _assemble_coco128(info, images, texts):
    names = sorted(images)
    y = []
    for name in names:
        stem = name.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        text = texts.get(f"{info.prefix}labels_boxes/{stem}.txt", b"").decode("utf-8")
        y.append(int(coco_person_area(text) > VWW_PERSON_AREA))
    return {"train": Dataset(_stack(names, images, info.image_size), np.array(y, np.int32),
                             list(info.class_names), files=np.array(names, dtype=str))}


_ASSEMBLERS = {
    "imagenette": _assemble_imagenette,
    "pennfudan": _assemble_pennfudan,
    "coco128": _assemble_coco128,
    "cifar10": _assemble_cifar10,
    "vww_val500": _assemble_vww_val500,
    "person_scenes": _assemble_person_scenes,
    "inria_person": _assemble_inria_person,
    "caltech101": _assemble_caltech101,
}


#: Image folders of an archive that are the data set's images (the rest are masks).
_IMAGE_FOLDERS = {"pennfudan": "images/", "coco128": "images/"}


def _wanted(info: DatasetInfo) -> Callable[[str], bool]:
    prefix = info.prefix + _IMAGE_FOLDERS.get(info.name, "")
    return lambda name: name.startswith(prefix)


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
    """Load one split of a known dataset (see :data:`DATASETS`) as uint8 arrays.

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
        files = _walk_files(source)

    key = _source_key(kind, source, files)
    path = _cache_path(name, split, key)
    if cache and path.is_file():
        try:
            return _load_npz(path)
        except Exception as e:  # a damaged cache file: decode again
            warnings.warn(f"Ignoring unreadable cache file {path}: {e}")

    if kind == "archive":
        images, texts = _read_tar(source, _wanted(info), info.image_size)
    else:
        images, texts = _read_folder(source, info.prefix, _wanted(info), info.image_size)
    if not images:
        raise ValueError(f"{name}: no images under {info.prefix or 'the top folder'} in {source}")
    result = _ASSEMBLERS[name](info, images, texts)
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
    size_hw = _as_hw(image_size)
    items: List[Tuple[Path, int]] = []
    for label, cls in enumerate(class_names):
        folder = root / cls
        if not folder.is_dir():
            raise FileNotFoundError(f"Class folder {folder} does not exist")
        files = sorted(f for f in folder.iterdir()
                       if f.is_file() and _is_image(f.name) and not f.name.startswith("."))
        if not files:
            raise ValueError(f"Class folder {folder} has no images (.jpg, .jpeg or .png)")
        items.extend((f, label) for f in files)
    arrays = []
    with _progress(len(items), f"decoding {root}") as bar:
        for f, _ in items:
            arrays.append(_decode_image(f.read_bytes(), size_hw, f"'{f}'"))
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
    x = _resize_batch(x, _as_hw(image_size))
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
    size_hw = _as_hw(image_size)
    image_ids = sorted(coco.getImgIds())
    x = np.empty((len(image_ids), size_hw[0], size_hw[1], 3), np.uint8)
    y = np.zeros(len(image_ids), np.int32)
    files = []
    with _progress(len(image_ids), f"decoding {images_dir}") as bar:
        for i, image_id in enumerate(image_ids):
            entry = coco.loadImgs(image_id)[0]
            image_area = float(entry["width"]) * float(entry["height"])
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id], catIds=person_ids, iscrowd=None))
            y[i] = int(any(a["bbox"][2] * a["bbox"][3] > min_area_fraction * image_area for a in anns))
            path = images_dir / entry["file_name"]
            if not path.is_file():
                raise FileNotFoundError(f"COCO image {path} (id {image_id}) is missing")
            x[i] = _decode_image(path.read_bytes(), size_hw, f"'{path}'")
            files.append(entry["file_name"])
            bar.update(1)
    return Dataset(x, y, list(PERSON_CLASSES), groups=np.array(image_ids, np.int64),
                   files=np.array(files, dtype=str))
