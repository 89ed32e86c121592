#!/usr/bin/env python
"""Convert a Keras model (zoo name or saved file) to a verified LCE .tflite; print the report.

    python converters/to_tflite.py model.h5 -o model.tflite --strict [--int8-io] [--c-array]

Same as ``glt-keras convert``; see ``--help``.
"""
import argparse
import sys

import glt_keras  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
from glt_keras.convert.cli import add_arguments, run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return int(run(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"to_tflite: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
