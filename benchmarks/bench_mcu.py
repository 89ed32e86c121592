#!/usr/bin/env python
"""Zoo models as C99 libraries on Cortex-M4 / M7 (QEMU): instructions, flash, RAM.

    python benchmarks/bench_mcu.py --readme README.md
    python benchmarks/bench_mcu.py vww_binary --cpus cortex-m4 --per-layer

For every zoo model with weights (or the NAMES given): ``export_c`` with default
options, the host build checked against Keras (argmax) on the first ``--images``
images of the model's task, then a bare-metal firmware per CPU run under
``qemu-system-arm -icount shift=0`` (``glt_keras.mcu.qemu``): instructions per
inference (median over the images), the library's flash (.text + .rodata + .data of
its objects) and RAM (static arena + measured stack of ``glt_infer``), and whether
the scores are bit-identical to the host build. Each row records the SHA-256 of the
weights it measured, so that a model card shows the numbers only for those weights.
Writes ``mcu.json`` and ``mcu.md`` into ``--out``, then (when ``--out`` is the folder
the cards read, and without ``--no-cards``) the measured models' cards, and, with
``--readme``, the table between the README's ``<!-- mcu-table:start -->`` /
``<!-- mcu-table:end -->`` markers.

The TFLite Micro + CMSIS-NN row is an external reference quoted from issue #17 (its
method and versions are named in the table notes); this script does not measure it.
"""
import argparse
import json
import platform
import re
import shlex
import sys
import time
from pathlib import Path

import glt_keras  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

ROOT = Path(__file__).resolve().parents[1]
MARK_START, MARK_END = "<!-- mcu-table:start -->", "<!-- mcu-table:end -->"

#: Quoted from issue #17, measured outside this project (not reproduced here).
EXTERNAL_REFERENCE = {
    "name": "MLPerf Tiny VWW int8 (MobileNetV1-0.25, 7.49 M int8 MACs), TFLM + CMSIS-NN",
    "versions": "TensorFlow Lite Micro 90b983c2, CMSIS-NN 4ab83cc3",
    "method": ("same QEMU method (mps2-an386 Cortex-M4F, -icount shift=0, SysTick calibrated by a busy "
               "loop, -O2, this project's startup and linker script, 4 VWW validation images), "
               "Invoke() only"),
    "instructions_m4": 24_101_500,
    "instructions_m4_reference_kernels": 100_432_520,
    "flash_bytes": 390_958,  # model 333,288 + engine ~49 KB + libc
    "ram_bytes_approx": 102_000,  # arena 100,708 + stack
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="*", metavar="NAME", help="zoo models (default: every model with weights)")
    p.add_argument("--cpus", nargs="+", default=["cortex-m4", "cortex-m7"], choices=["cortex-m4", "cortex-m7"])
    p.add_argument("--images", type=int, default=4, help="images of the task's evaluation set (default 4)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for mcu.json / mcu.md")
    p.add_argument("--work", default=str(ROOT / "runs" / "mcu"), help="export / build folder")
    p.add_argument("--per-layer", action="store_true", help="also time every layer (separate firmware)")
    p.add_argument("--readme", help="README to update between the mcu-table markers")
    p.add_argument("--no-cards", action="store_true", help="do not rewrite the measured models' zoo cards")


def task_images(model, n: int, classes=None):
    """The first n images of the model's task evaluation set (uint8) and its name (``classes``:
    the model's class names, which decide the task where its shape does not)."""
    from glt_keras.bench import TASKS, task_of_shape
    from glt_keras.data.sources import load_arrays

    shape = tuple(int(d) for d in model.input_shape[1:])
    task = task_of_shape(shape, int(model.output_shape[-1]), classes)
    if task is None:
        raise ValueError(f"{model.name}: no task with input {shape} and {model.output_shape[-1]} classes.")
    name, split = TASKS[task]["dataset"]
    x = load_arrays(name, split).x[:n]
    if tuple(x.shape[1:3]) != shape[:2]:  # stored larger (Caltech-101: 112x112): resized as for training
        from glt_keras.data import resize_uint8

        x = resize_uint8(x, shape[:2])
    return x, f"{name}/{split} (first {n})"


def bench_model(name: str, args) -> dict:
    import numpy as np

    from glt_keras import zoo
    from glt_keras.mcu import export_c
    from glt_keras.mcu.host import build_host
    from glt_keras.mcu.qemu import build_firmware, run_firmware

    weights_sha256 = zoo.sha256_of(zoo.pretrained_weights(name))  # checked against the registry
    model = zoo.load(name)
    images, data = task_images(model, args.images, zoo.get_recipe(name).classes)
    out = Path(args.work) / name
    result = export_c(model, out)
    keras = np.asarray(model(images.astype("float32"), training=False), dtype=np.float32)
    host = build_host(out, build_dir=out / "build_host").infer(images)
    row = {
        "model": name, "weights_sha256": weights_sha256, "data": data, "images": int(len(images)),
        "binary_macs": int(sum(l["binary_macs"] for l in result.layers)),
        "first_layer_table": bool(result.layers[0].get("table")),
        "softmax": bool(result.softmax),
        "argmax_host_equal_keras": bool(np.array_equal(host.argmax(1), keras.argmax(1))),
        "cpus": {},
    }
    for cpu in args.cpus:
        fw = build_firmware(out, images, cpu=cpu, build_dir=out / f"fw_{cpu}")
        run = run_firmware(fw)
        entry = {
            "machine": fw.machine,
            "instructions_per_inference": run.instructions_per_inference,
            "instructions": run.instructions,
            "flash_bytes": fw.library_flash_bytes,
            "library_sizes": fw.library_sizes,
            "static_ram_bytes": fw.library_static_ram_bytes,
            "stack_bytes": max(run.stack_bytes),
            "ram_bytes": fw.library_static_ram_bytes + max(run.stack_bytes),
            "bit_identical_to_host": bool(np.array_equal(run.scores.view(np.uint32), host.view(np.uint32))),
            "max_abs_diff_vs_host": float(np.abs(run.scores - host).max()),
            "argmax_equal_host": bool(np.array_equal(run.scores.argmax(1), host.argmax(1))),
        }
        if args.per_layer:
            fwl = build_firmware(out, images[:1], cpu=cpu, build_dir=out / f"fw_{cpu}_layers", per_layer=True)
            entry["layer_instructions_first_image"] = run_firmware(fwl).layer_instructions[0]
            entry["layer_names"] = [l["conv"] for l in result.layers]
        row["cpus"][cpu] = entry
        print(f"{name} {cpu}: {entry['instructions_per_inference']:,} instructions / inference, flash "
              f"{entry['flash_bytes']:,} B, RAM {entry['ram_bytes']:,} B, "
              f"{'bit-identical to' if entry['bit_identical_to_host'] else 'DIFFERENT from'} host", flush=True)
    return row


def _fmt(v) -> str:
    return f"{v:,}" if isinstance(v, int) else str(v)


def to_markdown(report: dict) -> str:
    cpus = report["cpus"]
    head = ["model", "binary MACs"] + [f"{c} instructions / inference" for c in cpus]
    head += ["instructions / binary MAC (M4)" if "cortex-m4" in cpus else "instructions / binary MAC",
             "flash B", "RAM B (static + stack)", "scores vs host C", "argmax host C vs Keras"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 3) + "---|---|"]
    for r in report["rows"]:
        e0 = r["cpus"][cpus[0]]
        instr = [_fmt(r["cpus"][c]["instructions_per_inference"]) for c in cpus]
        same = all(r["cpus"][c]["bit_identical_to_host"] for c in cpus)
        diff = max(r["cpus"][c]["max_abs_diff_vs_host"] for c in cpus)
        argmax = all(r["cpus"][c]["argmax_equal_host"] for c in cpus)
        vs_host = "bit-identical" if same else (f"argmax {'identical' if argmax else 'DIFFERENT'}, "
                                                 f"max diff {diff:.1g} (softmax)" if r["softmax"] else "DIFFERENT")
        lines.append("| " + " | ".join([
            r["model"], _fmt(r["binary_macs"]), *instr,
            f"{e0['instructions_per_inference'] / r['binary_macs']:.3f}",
            _fmt(e0["flash_bytes"]), f"{e0['ram_bytes']:,} ({e0['static_ram_bytes']:,} + {e0['stack_bytes']:,})",
            vs_host, "identical" if r["argmax_host_equal_keras"] else "DIFFERENT",
        ]) + " |")
    ref = report["external_reference"]
    cells = [f"_external:_ {ref['name']}", "7,490,000 (int8)", _fmt(ref["instructions_m4"])]
    cells += ["not measured"] * (len(cpus) - 1)
    cells += [f"{ref['instructions_m4'] / 7_490_000:.2f} (per int8 MAC)", _fmt(ref["flash_bytes"]),
              f"~{ref['ram_bytes_approx']:,}", "", ""]
    lines.append("| " + " | ".join(cells) + " |")
    data = sorted({r["data"] for r in report["rows"]})
    boards = ", ".join(f"{c}: `{report['machines'][c]}`" for c in cpus)
    notes = [
        "",
        f"- Instructions, not cycles: QEMU (`-icount shift=0`, {boards}) "
        "advances its clock by one tick per executed instruction and models no pipeline, caches, "
        "flash wait states or dual issue; a Cortex-M4 runs most of these ALU instructions in one cycle and loads "
        "(an LDRD / LDM counts as one instruction) in two or more, and the M7 issues two per cycle. The M7 count "
        "differs from the M4's only through the compiler's scheduling (same ARMv7E-M instruction set).",
        "- Median over the images of instructions per `glt_infer()` call (SysTick ticks x instructions per tick, "
        "calibrated in the firmware by a busy loop); `-O2`, the project's startup, linker script and harness "
        "(`glt_keras.mcu.qemu`). Flash = .text + .rodata + .data of the library's objects (weights, tables, code); "
        "RAM = its static arena + the measured stack of `glt_infer` (painted stack). The caller's image and "
        "scores are not counted.",
        "- Images: " + "; ".join(data) + ". Scores vs host C: the QEMU scores' IEEE-754 bit patterns equal "
        "the host build's (`glt_keras.mcu.host`). The binary layers are integer arithmetic; a model ending "
        "in softmax differs in the last bits of its probabilities because newlib's `expf` rounds differently "
        "from glibc's.",
        "- First layer: " + ", ".join(f"{r['model']} {'lookup tables' if r['first_layer_table'] else 'XNOR-popcount'}"
                                       for r in report["rows"]) + " (the default export uses the tables when "
        "the library still fits 128 KiB of flash).",
        f"- _External reference, not measured by this project_ (quoted from issue #17): {ref['name']}; "
        f"{ref['versions']}; {ref['method']}. With TFLM's reference kernels instead of CMSIS-NN: "
        f"{ref['instructions_m4_reference_kernels']:,} instructions. Its flash counts the 333,288-byte model, the "
        "engine (~49 KB) and libc; its RAM the 100,708-byte arena and the stack.",
    ]
    return "\n".join(lines + notes)


def update_readme(path: Path, command: str, table: str) -> None:
    text = path.read_text()
    block = f"{MARK_START}\n_Generated by `{command}`; do not edit by hand._\n\n{table}\n{MARK_END}"
    if MARK_START in text and MARK_END in text:
        text = re.sub(re.escape(MARK_START) + r".*?" + re.escape(MARK_END), lambda _: block, text, flags=re.S)
    else:
        raise ValueError(f"{path}: no {MARK_START} / {MARK_END} markers.")
    path.write_text(text)


def write_cards(names, results: Path, *, skip: bool = False) -> None:
    """Regenerate the zoo cards of ``names``: each shows its row of ``results`` (when its
    weights are the measured ones). Only when ``results`` is the file the cards read."""
    from glt_keras import zoo_cli

    if skip:
        return
    if results.resolve() != zoo_cli.MCU_RESULTS.resolve():
        print(f"cards not rewritten: they read {zoo_cli.MCU_RESULTS}, not {results}.")
        return
    for name in names:
        print(f"wrote {zoo_cli.write_card(name)}")


def merge_rows(previous: Path, rows, cpus):
    """``rows`` plus the rows of ``previous`` (an earlier mcu.json) for models not measured now,
    so timing one model does not drop the others from the table. Earlier rows are kept only
    when they were measured on the same CPUs; each keeps its own weight hash and command."""
    if not previous.exists():
        return rows
    try:
        old = json.loads(previous.read_text())
    except (OSError, ValueError):
        return rows
    if sorted(old.get("cpus", [])) != sorted(cpus):
        return rows
    measured = {r["model"] for r in rows}
    kept = [r for r in old.get("rows", []) if r.get("model") not in measured]
    return sorted(rows + kept, key=lambda r: r["model"])


def run(args) -> int:
    from glt_keras import zoo
    from glt_keras._io import atomic_write
    from glt_keras.mcu.qemu import TARGETS, ensure_toolchain

    ensure_toolchain(install=True)
    names = args.names or zoo.list_models(pretrained=True)
    t0 = time.time()
    rows = [bench_model(n, args) for n in names]
    command = "python benchmarks/bench_mcu.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    for row in rows:
        row["command"] = command
    out = Path(args.out)
    rows = merge_rows(out / "mcu.json", rows, args.cpus)
    report = {
        "rows": rows, "cpus": list(args.cpus), "machines": {c: TARGETS[c]["machine"] for c in args.cpus},
        "external_reference": EXTERNAL_REFERENCE,
        "command": command,
        "host": {"platform": platform.platform(), "python": platform.python_version()},
        "seconds": round(time.time() - t0, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    table = to_markdown(report)
    atomic_write(out / "mcu.json", json.dumps(report, indent=1))
    atomic_write(out / "mcu.md", f"_Generated by `{report['command']}`._\n\n{table}\n")
    print(table)
    if args.readme:
        update_readme(Path(args.readme), report["command"], table)
    write_cards(names, out / "mcu.json", skip=args.no_cards)
    ok = all(r["argmax_host_equal_keras"] and all(e["bit_identical_to_host"] or (r["softmax"] and e["argmax_equal_host"])
                                                  for e in r["cpus"].values()) for r in rows)
    return 0 if ok else 1


def main(argv=None) -> int:
    from glt_keras.cli import run_script

    return run_script("bench_mcu", __doc__.splitlines()[0], add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
