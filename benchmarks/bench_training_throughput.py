#!/usr/bin/env python
"""Training throughput (images/s) of a 96x96 fully binarized network: split vs native groups.

    python benchmarks/bench_training_throughput.py [--steps 5] [--warmup 2] [--json out.json]
    python benchmarks/bench_training_throughput.py --per-layer [--json out.json]

``glt_net(topology="glt96")`` trains its grouped binary convolutions as per-group convs
(``split_groups=True``, the default); ``split_groups=False`` is TensorFlow's native grouped
convolution (the LCE export form). Same weights shape, same maths. Each variant runs
``--warmup`` train steps (tracing, XLA compilation), then ``--steps`` timed steps of
``--batch`` random images with Adam and cross-entropy; throughput is images / second of
wall time over the timed steps, on all the cores TensorFlow is allowed to use.

``--per-layer`` times each binary convolution of glt96 alone (forward + backward to its
input and kernel, same input shape as in the network) in both forms, and the whole-network
speed-up those times allow (Amdahl: an ungrouped layer costs the same in both forms).
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


def measure_layers(*, batch: int, warmup: int, steps: int, seed: int = 0) -> list:
    """Forward + backward seconds per step of each binary conv of glt96, split vs native."""
    import numpy as np
    import tensorflow as tf

    from glt_keras.layers import BinaryConv2D
    from glt_keras.models import glt_net

    reference = glt_net(input_shape=(96, 96, 3), num_classes=2, topology="glt96")
    rows = []
    for layer in reference.layers:
        if not isinstance(layer, BinaryConv2D):
            continue
        in_shape = tuple(layer.input_shape[1:])
        x = tf.constant(np.random.default_rng(seed).choice([-1.0, 1.0], (batch, *in_shape)), tf.float32)
        row = {"layer": layer.name, "input_shape": list(in_shape), "filters": layer.filters,
               "kernel": list(layer.kernel_size), "groups": layer.groups}
        for split in (True, False):
            config = {**layer.get_config(), "split_groups": split, "name": "probe"}
            probe = BinaryConv2D.from_config(config)
            probe.build((None, *in_shape))

            @tf.function
            def step(inputs, probe=probe):
                with tf.GradientTape() as tape:
                    tape.watch(inputs)
                    loss = tf.reduce_sum(tf.square(probe(inputs)))
                return tape.gradient(loss, [inputs, probe.kernel])

            for _ in range(warmup):
                step(x)
            times = []
            for _ in range(steps):
                t = time.perf_counter()
                step(x)
                times.append(time.perf_counter() - t)
            row["split_seconds" if split else "native_seconds"] = float(np.median(times))
        row["speedup"] = row["native_seconds"] / row["split_seconds"]
        rows.append(row)
    return rows


def print_layers(rows, batch) -> dict:
    split_total = sum(r["split_seconds"] for r in rows)
    native_total = sum(r["native_seconds"] for r in rows)
    grouped = [r for r in rows if r["groups"] > 1]
    g_split = sum(r["split_seconds"] for r in grouped)
    g_native = sum(r["native_seconds"] for r in grouped)
    print("| layer | input | filters | groups | split ms | native ms | speed-up | share of split time |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['layer']} | {'x'.join(map(str, r['input_shape']))} | {r['filters']} | {r['groups']} | "
              f"{1e3 * r['split_seconds']:.1f} | {1e3 * r['native_seconds']:.1f} | {r['speedup']:.1f}x | "
              f"{100 * r['split_seconds'] / split_total:.0f}% |")
    totals = {
        "convs_speedup": native_total / split_total,
        "grouped_convs_speedup": g_native / g_split if grouped else None,
        "ungrouped_share_of_split_time": 1 - g_split / split_total,
    }
    print(f"\nbatch {batch}, forward + backward per conv: all convs {totals['convs_speedup']:.1f}x, "
          f"grouped convs only {totals['grouped_convs_speedup']:.1f}x; ungrouped convs are "
          f"{100 * totals['ungrouped_share_of_split_time']:.0f}% of the split network's conv time.")
    return totals


def load_average():
    """The 1/5/15-minute load averages after a measurement (None where the OS has none)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--only", choices=("split", "native"), help="run one variant only")
    parser.add_argument("--per-layer", action="store_true", help="time each binary conv alone")
    parser.add_argument("--json", metavar="OUT.json")
    args = parser.parse_args(argv)
    if min(args.batch, args.steps) < 1 or args.warmup < 0:
        parser.error("--batch and --steps must be >= 1, --warmup >= 0")
    if args.per_layer:
        rows = measure_layers(batch=args.batch, warmup=max(1, args.warmup), steps=args.steps)
        totals = print_layers(rows, args.batch)
        load = load_average()
        print(f"{os.cpu_count()} CPUs, load average {load}")
        if args.json:
            from glt_keras._io import atomic_write

            atomic_write(args.json, json.dumps({"batch": args.batch, "steps": args.steps, "cpus": os.cpu_count(),
                                                "load_average": load, "layers": rows, **totals}, indent=2))
        return 0

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
    load = load_average()
    print(f"\nglt96, 96x96x3, batch {args.batch}, {args.warmup} warm-up + {args.steps} timed steps, "
          f"{os.cpu_count()} CPUs, load average {load}")
    if args.json:
        from glt_keras._io import atomic_write

        payload = {"batch": args.batch, "warmup": args.warmup, "steps": args.steps,
                   "cpus": os.cpu_count(), "load_average": load, "rows": rows}
        atomic_write(args.json, json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
