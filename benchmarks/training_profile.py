"""Where a training step's time goes: TensorFlow profiler trace -> time per op type and per layer.

    from training_profile import profile_steps, summarise
    trace_dir = profile_steps(step, n=3, logdir="/tmp/trace")   # step(): one training step
    print(summarise(trace_dir, steps=3, model_name="cifar10_binary")["markdown"])

Reads the profiler's ``.xplane.pb`` directly (the TensorBoard profile plugin is not needed):
every TensorFlow op event on the host's compute threads, summed. Times are op time summed
over threads (2 threads busy at once count twice), so shares matter more than totals, and on
a loaded machine an op's time includes the time it waited for a core.
"""
from __future__ import annotations

import collections
import glob
import re


def profile_steps(step, *, n: int, logdir: str) -> str:
    """Run ``step()`` ``n`` times under the TensorFlow profiler; returns ``logdir``."""
    import tensorflow as tf

    tf.profiler.experimental.start(logdir)
    try:
        for _ in range(n):
            step()
    finally:
        tf.profiler.experimental.stop()
    return logdir


def op_events(logdir: str):
    """``(op name, op type, milliseconds)`` of every TF op on the host's compute threads."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    files = sorted(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True))
    if not files:
        raise FileNotFoundError(f"no profiler trace (*.xplane.pb) under {logdir}")
    space = xplane_pb2.XSpace()
    with open(files[-1], "rb") as f:
        space.ParseFromString(f.read())
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        names = {k: v.name for k, v in plane.event_metadata.items()}
        for line in plane.lines:
            if not line.name.startswith(("tf_Compute", "tf_numa", "tf_data")):
                continue
            for event in line.events:
                name = names.get(event.metadata_id, "")
                if ":" not in name:  # executor bookkeeping, not an op ("name:Type" are ops)
                    continue
                op, kind = name.rsplit(":", 1)
                if kind.startswith("__inference") or kind == "Process":
                    continue
                yield op, kind, event.duration_ps / 1e9


def layer_of(op: str, model_name: str) -> str:
    """The layer an op belongs to (``block2_conv``, ``block2_conv (grad)``), or its group."""
    found = re.search(rf"{re.escape(model_name)}/([^/]+)/", op)
    if found:
        return found.group(1) + (" (grad)" if op.startswith("gradient_tape") else "")
    if "optimizer" in op.lower() or "Adam" in op:
        # larq's CaseOptimizer computes the straight-through gradients of the latent weights here.
        return "optimizer (incl. kernel STE grads)"
    return op.split("/")[0]


def summarise(logdir: str, *, steps: int, model_name: str, top: int = 20) -> dict:
    by_type, by_layer = collections.Counter(), collections.Counter()
    for op, kind, ms in op_events(logdir):
        by_type[kind] += ms / steps
        by_layer[layer_of(op, model_name)] += ms / steps
    total = sum(by_type.values())

    def table(title, counter):
        rows = [f"| {title} | ms/step | share |", "|---|---:|---:|"]
        rows += [f"| {k} | {v:.1f} | {100 * v / total:.1f}% |" for k, v in counter.most_common(top)]
        return "\n".join(rows)

    return {
        "op_ms_per_step": total,
        "by_op_type": dict(by_type.most_common()),
        "by_layer": dict(by_layer.most_common()),
        "markdown": f"{table('op type', by_type)}\n\n{table('layer', by_layer)}\n\n"
                    f"op time summed over threads: {total:.0f} ms per step",
    }
