#!/usr/bin/env python
"""Training throughput (images/s) of a 96x96 fully binarized network: split vs native groups.

    python benchmarks/bench_training_throughput.py [--steps 5] [--warmup 2] [--json out.json]

``glt_net(topology="glt96")`` trains its grouped binary convolutions as per-group convs
(``split_groups=True``, the default); ``split_groups=False`` is TensorFlow's native grouped
convolution (the LCE export form). Same weights shape, same maths. Each variant runs
``--warmup`` train steps (tracing, XLA compilation), then ``--steps`` timed steps of
``--batch`` random images with Adam and cross-entropy; throughput is images / second of
wall time over the timed steps, on all the cores TensorFlow is allowed to use.
"""
import argparse
import json
import os
import sys
import time

import glt_keras  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)


def measure(split_groups: bool, *, batch: int, warmup: int, steps: int, seed: int = 0) -> dict:
    import numpy as np
    import tensorflow as tf

    from glt_keras.models import glt_net, model_summary

    tf.keras.utils.set_random_seed(seed)
    model = glt_net(input_shape=(96, 96, 3), num_classes=2, topology="glt96", split_groups=split_groups)
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (batch, 96, 96, 3)).astype(np.float32)
    y = rng.integers(0, 2, (batch,)).astype(np.int32)
    start = time.perf_counter()
    for _ in range(warmup):
        model.train_on_batch(x, y)
    warm = time.perf_counter() - start
    step_times = []
    for _ in range(steps):
        t = time.perf_counter()
        model.train_on_batch(x, y)
        step_times.append(time.perf_counter() - t)
    total = sum(step_times)
    return {
        "variant": "split groups (training form)" if split_groups else "native groups (tf grouped conv)",
        "split_groups": split_groups,
        "images_per_second": batch * steps / total,
        "seconds_per_step_median": float(np.median(step_times)),
        "step_seconds": step_times,
        "warmup_seconds": warm,
        "binary_macs": model_summary(model)["binary_macs"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--only", choices=("split", "native"), help="run one variant only")
    parser.add_argument("--json", metavar="OUT.json")
    args = parser.parse_args(argv)
    if min(args.batch, args.steps) < 1 or args.warmup < 0:
        parser.error("--batch and --steps must be >= 1, --warmup >= 0")

    variants = [v for v in (True, False) if args.only is None or args.only == ("split" if v else "native")]
    rows = []
    for split in variants:
        row = measure(split, batch=args.batch, warmup=args.warmup, steps=args.steps)
        rows.append(row)
        print(f"  {row['variant']}: {row['images_per_second']:.1f} images/s", file=sys.stderr)
    fastest = max(r["images_per_second"] for r in rows)
    print("| variant | images/s | s/step (median) | warm-up s | slowdown vs fastest |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['images_per_second']:.1f} | {r['seconds_per_step_median']:.2f} | "
              f"{r['warmup_seconds']:.1f} | {fastest / r['images_per_second']:.1f}x |")
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    print(f"\nglt96, 96x96x3, batch {args.batch}, {args.warmup} warm-up + {args.steps} timed steps, "
          f"{os.cpu_count()} CPUs, load average {load}")
    if args.json:
        from glt_keras.convert._io import atomic_write

        payload = {"batch": args.batch, "warmup": args.warmup, "steps": args.steps,
                   "cpus": os.cpu_count(), "load_average": load, "rows": rows}
        atomic_write(args.json, json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
