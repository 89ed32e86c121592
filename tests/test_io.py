"""glt_keras._io.atomic_write: whole files or none, usual permissions."""
import os
import stat

import pytest

import numpy as np

from glt_keras._io import atomic_write, sha256_of_array


def test_atomic_write_creates_replaces_and_keeps_modes(tmp_path):
    path = atomic_write(tmp_path / "sub" / "card.md", "first")
    assert path.read_text() == "first"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0o600
    os.chmod(path, 0o640)
    atomic_write(path, b"second")
    assert path.read_bytes() == b"second" and stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(p.name for p in path.parent.iterdir()) == ["card.md"]  # no temp file left


def test_atomic_write_failure_keeps_the_old_file(tmp_path):
    path = atomic_write(tmp_path / "registry.json", "{}")
    with pytest.raises(TypeError):
        atomic_write(path, 12345)  # not bytes or str
    assert path.read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == ["registry.json"]


def test_sha256_of_array_sees_values_shape_and_dtype_not_memory_layout():
    x = np.arange(2 * 5 * 4 * 3, dtype=np.uint8).reshape(2, 5, 4, 3)
    key = sha256_of_array(x)
    assert sha256_of_array(x.copy()) == key
    assert sha256_of_array(np.asfortranarray(x)) == key  # same values, other layout
    changed = x.copy()
    changed[1, 4, 3, 2] += 1
    assert sha256_of_array(changed) != key
    assert sha256_of_array(x.reshape(4, 5, 2, 3)) != key  # same bytes, other shape
    assert sha256_of_array(x.astype(np.int16)) != key
