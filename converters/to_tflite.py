#!/usr/bin/env python
"""Convert a Keras model (zoo name or saved file) to a verified LCE .tflite; print the report.

    python converters/to_tflite.py model.h5 -o model.tflite --strict [--int8-io] [--c-array]

Same as ``glt-keras convert``; see ``--help``.
"""
import sys

import glt_keras  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
from glt_keras.cli import run_script
from glt_keras.convert.cli import add_arguments, run


def main(argv=None) -> int:
    return run_script("to_tflite", __doc__.splitlines()[0], add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
