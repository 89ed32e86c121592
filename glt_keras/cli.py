"""The ``glt-keras`` command line: ``glt-keras <command> --help`` for each command.

Each command lives beside the code it drives and registers itself here through a
``register(subparsers)`` function, so this file only lists them.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# command module -> where its register(subparsers) lives
COMMAND_MODULES = (
    "glt_keras.training.cli",  # train, eval
    "glt_keras.convert.cli",  # convert
    "glt_keras.bench",  # bench
    "glt_keras.mcu.cli",  # export-c
    "glt_keras.zoo_cli",  # zoo
    "glt_keras.training.mixbin_cli",  # mixbin
    "glt_keras.training.teachers_cli",  # teachers cache
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glt-keras",
        description="Fully-binarized Keras networks: train, evaluate, convert, benchmark, export.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:  # that command is not written yet
                continue
            raise
        module.register(sub)
    return parser


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid whole number {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def is_user_error(err: BaseException) -> bool:
    """Errors that state a problem with the user's input or files in their message: bad
    values, missing / damaged / protected files, checkpoints. Anything else is a bug and
    keeps its traceback."""
    return isinstance(err, (ValueError, OSError)) or getattr(err, "user_error", False)


def _one_line(err: BaseException) -> str:
    return str(err) or type(err).__name__


def _guarded(prog: str, run, args) -> int:
    """``run(args)`` with the command line's error handling: a user error (bad value, missing
    file, ...) is one line naming ``prog`` and exit code 2; Ctrl-C is exit code 130."""
    try:
        return int(run(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted.", file=sys.stderr)
        return 130
    except Exception as err:
        if not is_user_error(err):
            raise
        print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
        return 2


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return _guarded(f"glt-keras {args.command}", args.func, args)


def run_script(prog: str, description: str, add_arguments, run, argv=None) -> int:
    """Entry point of the thin scripts in converters/ and benchmarks/: one command's
    arguments and function, with the same clear-error handling as ``glt-keras``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser)
    return _guarded(prog, run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
