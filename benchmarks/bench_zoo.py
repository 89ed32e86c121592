#!/usr/bin/env python
"""Zoo models vs the MLPerf Tiny references: accuracy, bytes, 1-thread latency, ratios.

    python benchmarks/bench_zoo.py --topology glt96 --topology glt32 --json bench.json
    python benchmarks/bench_zoo.py --model runs/vww/best.h5 --limit 500

Same as ``glt-keras bench`` (see ``--help``); the timing loop is
``glt_keras.bench.time_models``.
"""
import argparse
import sys

import glt_keras  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
from glt_keras.bench import add_arguments, run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return int(run(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"bench_zoo: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
