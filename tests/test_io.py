"""glt_keras._io.atomic_write: whole files or none, usual permissions."""
import os
import stat

import pytest

from glt_keras._io import atomic_write


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
