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


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"glt-keras {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())


def run_script(prog: str, description: str, add_arguments, run, argv=None) -> int:
    """Entry point of the thin scripts in converters/ and benchmarks/: one command's
    arguments and function, with the same clear-error handling as ``glt-keras``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return int(run(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
