"""Reading image files: streaming a ``tar(.gz)`` or walking an extracted folder, and decoding
JPEG/PNG bytes to uint8 RGB arrays (nothing is extracted to disk).

What the images mean (classes, splits) is :mod:`.catalog`'s business; loading and caching them as
a :class:`~.catalog.Dataset` is :mod:`.sources`'.
"""
from __future__ import annotations

import io
import os
import tarfile
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np

__all__ = [
    "IMAGE_EXTENSIONS",
    "CorruptImageError",
    "ImageSize",
    "as_hw",
    "decode_image",
    "is_image",
    "norm_member",
    "progress",
    "read_folder",
    "read_tar",
    "walk_files",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_TEXT_EXTENSIONS = (".txt", ".csv")

ImageSize = Union[int, Tuple[int, int]]


class CorruptImageError(ValueError):
    """An image file could not be decoded; the message names the file."""


def as_hw(image_size: Optional[ImageSize]) -> Optional[Tuple[int, int]]:
    """An int or (height, width) image size as an int pair (None stays None)."""
    if image_size is None:
        return None
    if isinstance(image_size, (int, np.integer)):
        return int(image_size), int(image_size)
    h, w = image_size
    return int(h), int(w)


def decode_image(data: bytes, size_hw: Optional[Tuple[int, int]], name: str) -> np.ndarray:
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


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def progress(total=None, desc="", unit="img", unit_scale=False):
    """A quiet tqdm bar for long decodes (refreshed at most once a second, removed when done)."""
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


def norm_member(name: str) -> str:
    """A tar member name without a leading ``./`` or ``/``, as archives differ in how they store it."""
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def read_tar(path: Path, want: Callable[[str], bool], size_hw: Tuple[int, int]):
    """Stream a tar(.gz): decode the wanted images and keep small text files; nothing hits disk."""
    images: Dict[str, np.ndarray] = {}
    texts: Dict[str, bytes] = {}
    with open(path, "rb") as raw, progress(os.path.getsize(path), f"decoding {path.name}",
                                           unit="B", unit_scale=True) as bar:
        try:
            with tarfile.open(fileobj=_CountingReader(raw, bar), mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    name = norm_member(member.name)
                    base = name.rsplit("/", 1)[-1]
                    if base.startswith("._"):  # macOS resource forks
                        continue
                    if is_image(name):
                        if want(name):
                            data = tar.extractfile(member).read()
                            images[name] = decode_image(data, size_hw, f"'{name}' in archive {path}")
                            if len(images) % 2000 == 0:
                                bar.set_postfix(images=len(images), refresh=False)
                    elif name.lower().endswith(_TEXT_EXTENSIONS) and member.size < (16 << 20):
                        texts[name] = tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, zlib.error) as e:
            raise OSError(f"Archive {path} is damaged or not a tar archive: {e}") from e
    return images, texts


def walk_files(root: Path) -> List[Path]:
    """Every file under ``root`` in sorted order, skipping hidden files and folders."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    return files


def read_folder(root: Path, prefix: str, want: Callable[[str], bool], size_hw: Tuple[int, int]):
    """Same as :func:`read_tar` for an extracted copy; names get the archive's ``prefix``."""
    images: Dict[str, np.ndarray] = {}
    texts: Dict[str, bytes] = {}
    files = walk_files(root)
    wanted = []
    for f in files:
        name = prefix + f.relative_to(root).as_posix()
        if is_image(name):
            if want(name):
                wanted.append((name, f))
        elif name.lower().endswith(_TEXT_EXTENSIONS):
            texts[name] = f.read_bytes()
    with progress(len(wanted), f"decoding {root}") as bar:
        for name, f in wanted:
            images[name] = decode_image(f.read_bytes(), size_hw, f"'{f}'")
            bar.update(1)
    return images, texts
