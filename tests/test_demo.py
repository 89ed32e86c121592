"""`make demo`'s main job runs end to end on the shipped model and real images."""
import pytest

from glt_keras import demo
from glt_keras.data import find_data_dir


def test_demo_runs_end_to_end(tmp_path, capsys):
    try:
        find_data_dir()
    except FileNotFoundError as err:
        pytest.skip(f"no shared data: {err}")
    assert demo.main(["--out", str(tmp_path), "--repeats", "3"]) == 0
    out = capsys.readouterr().out
    assert "on vww_val500/val (500 images): accuracy" in out
    assert "argmax agreement 100%" in out
    assert (tmp_path / "vww_binary.tflite").stat().st_size > 10_000
    assert "| vww_96_int8 |" in out  # the reference, measured in the same run
