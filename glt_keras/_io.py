"""File helpers shared across the package."""
from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path
from typing import Union

PathLike = Union[str, os.PathLike]


def atomic_write(path: PathLike, data: Union[bytes, str]) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder + ``os.replace``.

    A reader never sees a half-written file, and an interrupted write leaves the old file.
    A symbolic link, device, pipe or folder at ``path`` is refused (``FileExistsError`` /
    ``IsADirectoryError``): the rename would replace it with a regular file.
    Missing parent folders are created. The file keeps the mode of the one it replaces, or
    gets the usual ``0o666 & ~umask`` (``mkstemp`` alone would leave it owner-only).
    """
    path = Path(path)
    check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
    else:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def check_replaceable(path: PathLike) -> None:
    """Raise a one-line ``OSError`` unless ``path`` is absent or a regular file (not a symbolic
    link, device, pipe or folder), so that writing it replaces nothing else."""
    path = Path(path)
    if path.is_symlink():
        raise FileExistsError(
            f"{path} is a symbolic link (to {os.readlink(path)}); refusing to replace it with a "
            "regular file: write to the link's target or remove the link."
        )
    if not path.exists():
        return
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; expected a file path.")
    if not path.is_file():
        raise FileExistsError(
            f"{path} is not a regular file (a device, pipe or socket); refusing to replace it."
        )


def sha256_of_array(x) -> str:
    """SHA-256 of an array's dtype, shape and values (a data set's images as cache keys), hashed in
    64 MiB slices so a large contiguous array is never copied whole."""
    import numpy as np

    x = np.asarray(x)
    digest = hashlib.sha256(f"{x.dtype.str} {list(x.shape)}".encode())
    step = max(1, (64 << 20) // max(1, x[0].nbytes)) if len(x) else 1
    for start in range(0, len(x), step):
        digest.update(np.ascontiguousarray(x[start:start + step]))
    return digest.hexdigest()


def sha256_of(path: PathLike) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks (weight files, teacher files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
