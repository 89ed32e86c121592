"""Outputs never replace a link, a device or files the user edited (issue 15)."""
import os

import pytest

from glt_keras import cli
from glt_keras._io import atomic_write


def test_atomic_write_refuses_a_symlink_and_a_device(tmp_path):
    target = tmp_path / "target.txt"
    target.write_text("mine")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    with pytest.raises(FileExistsError, match="symbolic link"):
        atomic_write(link, "new")
    assert link.is_symlink() and target.read_text() == "mine"
    with pytest.raises(FileExistsError, match="not a regular file"):
        atomic_write("/dev/null", "x")
    assert not os.path.isfile("/dev/null")
    with pytest.raises(IsADirectoryError):
        atomic_write(tmp_path, "x")


def test_convert_refuses_a_symlink_output_before_converting(tmp_path, capsys):
    target = tmp_path / "keep.tflite"
    target.write_bytes(b"precious")
    link = tmp_path / "out.tflite"
    link.symlink_to(target)
    assert cli.main(["convert", "no_such_model.h5", "-o", str(link)]) == 2
    err = capsys.readouterr().err
    assert "symbolic link" in err and err.count("\n") == 1
    assert link.is_symlink() and target.read_bytes() == b"precious"


def _tiny_model_file(tmp_path):
    from glt_keras.models import glt_net

    model = glt_net(input_shape=(16, 16, 3), num_classes=2, topology="tiny", name="tiny16")
    path = tmp_path / "tiny.h5"
    model.save(path)
    return path


def test_export_c_does_not_overwrite_files_the_user_edited(tmp_path, capsys):
    model = _tiny_model_file(tmp_path)
    out = tmp_path / "c"
    out.mkdir()
    (out / "glt_model.h").write_text("/* my own header */\n")
    argv = ["export-c", str(model), "-o", str(out), "--check", "0"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "glt_model.h" in err and "--force" in err and err.count("\n") == 1
    assert (out / "glt_model.h").read_text() == "/* my own header */\n"
    assert cli.main(argv + ["--force"]) == 0
    assert "GLT_NUM_CONV_LAYERS" in (out / "glt_model.h").read_text()
    assert cli.main(argv) == 0  # its own, unedited files: overwritten without --force
    with open(out / "glt_model_data.c", "a") as f:
        f.write("/* tuned by hand */\n")
    assert cli.main(argv) == 2
    assert "glt_model_data.c" in capsys.readouterr().err
    assert (out / "glt_model_data.c").read_text().endswith("/* tuned by hand */\n")
