"""The named datasets of ``shared/data``: what each archive holds, its classes, and the rules that
split its images into train / val / test.

Also the :class:`Dataset` container every loader returns: it lives here because the per-dataset
assemblers build it, and :mod:`.sources` imports this module. Decoded splits are cached, so a
changed split rule needs a bump of ``sources.CACHE_VERSION``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .image_files import is_image

__all__ = [
    "ASSEMBLERS",
    "CALTECH101_CLASSES",
    "CIFAR10_CLASSES",
    "DATASETS",
    "IMAGENETTE_CLASSES",
    "INRIA_TEST_FRACTION",
    "PERSON_CLASSES",
    "PERSON_SCENES_VAL_FRACTION",
    "STL10_CLASSES",
    "VWW_PERSON_AREA",
    "Dataset",
    "DatasetInfo",
    "coco_person_area",
    "image_filter",
    "inria_group_key",
]


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
            if not is_image(line):  # e.g. "BACKGROUND_Google/tmp" in train.txt: not an image
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


#: How each dataset's decoded images become its splits.
ASSEMBLERS = {
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


def image_filter(info: DatasetInfo) -> Callable[[str], bool]:
    """Which member names of ``info``'s archive are its images (the ``want`` of ``read_tar``)."""
    prefix = info.prefix + _IMAGE_FOLDERS.get(info.name, "")
    return lambda name: name.startswith(prefix)
