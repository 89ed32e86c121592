#!/usr/bin/env python
"""Zoo models vs the MLPerf Tiny references: accuracy, bytes, 1-thread latency, ratios.

    python benchmarks/bench_zoo.py --topology glt96 --topology glt32 --json bench.json
    python benchmarks/bench_zoo.py --model runs/vww/best.h5 --limit 500

Same as ``glt-keras bench`` (see ``--help``); the timing loop is
``glt_keras.bench.time_models``.
"""
import sys

import glt_keras  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
from glt_keras.cli import run_script
from glt_keras.bench import add_arguments, run


def main(argv=None) -> int:
    return run_script("bench_zoo", __doc__.splitlines()[0], add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
