#!/usr/bin/env python
"""Training throughput (images/s): glt96 split vs native groups, or a recipe's step by precision.

    python benchmarks/bench_training_throughput.py [--steps 5] [--warmup 2] [--json out.json]
    python benchmarks/bench_training_throughput.py --per-layer [--json out.json]
    python benchmarks/bench_training_throughput.py --recipe cifar10_binary \
        [--variants float32,mixed_bfloat16] [--steps 10] [--profile /tmp/trace] [--json out.json]

``glt_net(topology="glt96")`` trains its grouped binary convolutions as per-group convs
(``split_groups=True``, the default); ``split_groups=False`` is TensorFlow's native grouped
convolution (the LCE export form). Same weights shape, same maths. Each variant runs
``--warmup`` train steps (tracing, XLA compilation), then ``--steps`` timed steps of
``--batch`` random images with Adam and cross-entropy; throughput is images / second of
wall time over the timed steps, on all the cores TensorFlow is allowed to use.

``--per-layer`` times each binary convolution of glt96 alone (forward + backward to its
input and kernel, same input shape as in the network) in both forms, and the whole-network
speed-up those times allow (Amdahl: an ungrouped layer costs the same in both forms).

``--recipe`` times the recipe's own training step (its network, larq CaseOptimizer, loss without
distillation, and batch size) under each of ``--variants``: ``float32``, ``mixed_bfloat16`` or ``auto``
(``training.precision``), each optionally prefixed ``RECIPE@`` to time another recipe's network
(a file: the recipe as it was before a change; every variant at its own recipe's batch size unless
``--batch``, compared per image), and with ``+split`` (per-group convs under bfloat16, not the
fused grouped conv), ``+larq_ste`` (larq's own ``tf.where`` straight-through gradient, as
before ``glt_keras/layers/ste.py``) or ``+sign`` (the first conv signs the thermometer's +-1 planes
again in training, as before ``BinaryConv2D(binary_input=True)``). The variants' steps are interleaved (A, B, A, B, ...)
so that a change in machine load hits all of them alike; the ratios are the result, the
images/s depend on the machine. ``--profile DIR`` then traces 3 steps of each variant with the
TensorFlow profiler and prints the time per op type and per layer (training_profile.py).
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


def build_recipe_step(recipe, variant: str, batch: int, seed: int = 0):
    """A callable running one training step of ``recipe`` under ``variant`` (see the docstring)."""
    import numpy as np
    import tensorflow as tf
    from larq import quantizers

    from glt_keras.layers.binary import BinaryConv2D
    from glt_keras.training import precision
    from glt_keras.training.run import _compile
    from glt_keras.training.schedule import make_optimizer

    name, *options = variant.split("+")
    unknown = set(options) - {"split", "larq_ste", "sign"}
    if unknown:
        raise ValueError(f"variant {variant!r}: unknown option(s) {sorted(unknown)} (known: split, larq_ste, sign)")
    fast_ste = quantizers._clipped_gradient
    # The step is traced on its first call: the gradient function in place then is the one it keeps.
    quantizers._clipped_gradient = getattr(quantizers, "_larq_clipped_gradient", fast_ste) \
        if "larq_ste" in options else fast_ste
    tf.keras.utils.set_random_seed(seed)
    with precision.policy(name) as resolved:
        model = recipe.build_model(classifier_activation=None)
        trainer = _compile(model, make_optimizer(recipe.training, 100, 10, model), recipe)
    for layer in model.layers:
        if isinstance(layer, BinaryConv2D) and "split" in options:
            layer.fuse_bf16_groups = False
        if isinstance(layer, BinaryConv2D) and "sign" in options:
            layer.binary_input = False
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (batch, *recipe.input_shape)).astype(np.float32)
    y = rng.integers(0, len(recipe.classes), (batch,)).astype(np.int32)
    # The step fit() runs (its train function on a dataset iterator), without train_on_batch's
    # per-call Python and data-adapter work, which would blur the ratios of fast variants.
    batches = iter(tf.data.Dataset.from_tensors((x, y)).repeat())
    train_function = trainer.make_train_function()

    def step():
        tf.nest.map_structure(lambda t: t.numpy(), train_function(batches))

    try:
        step()  # traces now, with this variant's straight-through gradient
    finally:
        quantizers._clipped_gradient = fast_ste
    return step, resolved


def split_variant(variant: str, default_recipe: str) -> tuple[str, str]:
    """``(recipe, precision[+options])`` of a variant written ``[RECIPE@]precision[+options]``."""
    recipe, _, rest = variant.rpartition("@")
    return recipe or default_recipe, rest


def measure_recipe(recipe_name: str, variants, *, batch, warmup: int, steps: int, profile=None) -> dict:
    """Interleaved timed steps of each variant; ratios against the first variant. A variant may
    name its own recipe (``RECIPE@precision``): another network, timed at its own batch size."""
    import numpy as np

    from glt_keras.recipe import load_recipe

    recipe = load_recipe(recipe_name)
    parsed = {v: split_variant(v, recipe_name) for v in variants}
    recipes = {v: recipe if path == recipe_name else load_recipe(path) for v, (path, _) in parsed.items()}
    batches = {v: batch or recipes[v].training["batch_size"] for v in variants}
    built = {v: build_recipe_step(recipes[v], parsed[v][1], batches[v]) for v in variants}
    for step, _ in built.values():
        for _ in range(warmup):
            step()
    times = {v: [] for v in variants}
    for _ in range(steps):
        for v, (step, _) in built.items():
            t = time.perf_counter()
            step()
            times[v].append(time.perf_counter() - t)
    speed = {v: batches[v] / float(np.median(ts)) for v, ts in times.items()}  # images / s
    rows = [{"variant": v, "recipe": recipes[v].name, "batch": batches[v], "precision": built[v][1],
             "images_per_second": speed[v], "seconds_per_step_median": float(np.median(ts)),
             "step_seconds": ts, "speedup_vs_first": speed[v] / speed[variants[0]]}
            for v, ts in times.items()]
    profiles = {}
    if profile:
        from training_profile import profile_steps, summarise

        for i, (v, (step, _)) in enumerate(built.items()):
            slug = "".join(c if c.isalnum() else "_" for c in v)
            logdir = profile_steps(step, n=3, logdir=os.path.join(profile, f"{i}_{slug}"))
            profiles[v] = summarise(logdir, steps=3, model_name=recipes[v].name)
    return {"recipe": recipe.name, "rows": rows, "profiles": profiles}


def print_recipe(result, args) -> None:
    print("| variant | compute | batch | images/s (median step) | s/step | speed-up per image vs first |")
    print("|---|---|---:|---:|---:|---:|")
    for r in result["rows"]:
        print(f"| {r['variant']} | {r['precision']} | {r['batch']} | {r['images_per_second']:.1f} | "
              f"{r['seconds_per_step_median']:.3f} | {r['speedup_vs_first']:.2f}x |")
    for v, summary in result["profiles"].items():
        print(f"\n### {v}\n\n{summary['markdown']}")
    print(f"\n{result['recipe']}, {args.warmup} warm-up + {args.steps} interleaved "
          f"timed steps per variant, {os.cpu_count()} CPUs, load average {load_average()}")


def load_average():
    """The 1/5/15-minute load averages after a measurement (None where the OS has none)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, help="images per step (default 32; --recipe: each variant's recipe's batch size)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--only", choices=("split", "native"), help="run one variant only")
    parser.add_argument("--per-layer", action="store_true", help="time each binary conv alone")
    parser.add_argument("--recipe", help="time this recipe's training step by precision (e.g. cifar10_binary)")
    parser.add_argument("--variants", default="float32,mixed_bfloat16",
                        help="with --recipe: comma-separated [RECIPE@]precision[+split][+larq_ste] "
                             "(RECIPE: another recipe's network, e.g. an older version of it)")
    parser.add_argument("--profile", metavar="DIR", help="with --recipe: profiler traces here, per-op tables")
    parser.add_argument("--json", metavar="OUT.json")
    args = parser.parse_args(argv)
    if (args.batch is not None and args.batch < 1) or args.steps < 1 or args.warmup < 0:
        parser.error("--batch and --steps must be >= 1, --warmup >= 0")
    if args.recipe:
        result = measure_recipe(args.recipe, args.variants.split(","), batch=args.batch, warmup=args.warmup,
                                steps=args.steps, profile=args.profile)
        print_recipe(result, args)
        if args.json:
            from glt_keras._io import atomic_write

            payload = {**result, "warmup": args.warmup, "steps": args.steps, "cpus": os.cpu_count(),
                       "load_average": load_average()}
            atomic_write(args.json, json.dumps(payload, indent=2))
        return 0
    args.batch = args.batch or 32
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
