"""The glt-keras command line: every command registers and bad input fails clearly."""
import subprocess
import sys

import pytest

from glt_keras import cli


def test_every_command_is_registered(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "eval", "convert", "bench", "export-c", "zoo", "mixbin"):
        assert command in out, command


def test_unknown_recipe_is_a_clear_error(capsys):
    assert cli.main(["train", "no_such_recipe"]) == 2
    err = capsys.readouterr().err
    assert "No recipe named 'no_such_recipe'" in err and "vww_binary" in err


def test_console_script_installed():
    out = subprocess.run([sys.executable, "-m", "glt_keras.cli", "zoo", "list"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| vww_binary |" in out.stdout
