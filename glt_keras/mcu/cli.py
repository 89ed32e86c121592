"""``glt-keras export-c NAME_OR_MODEL -o DIR``: a trained model as a C99 library."""
from __future__ import annotations

import json
from pathlib import Path

from .._io import atomic_write


#: Largest score difference allowed between the Cortex-M build and the host build.
DEVICE_TOLERANCE = 1e-5


def load_model(name_or_path: str, weights="pretrained"):
    """A zoo model by name (``glt_keras.zoo.load``, with ``weights``), a run folder of ``glt-keras
    train`` (its best weights, or ``weights`` a file), a recipe file with ``weights`` a file, or a
    saved Keras model file / directory (:func:`glt_keras.model_sources.load_model`)."""
    from .. import zoo
    from ..model_sources import load_model as load_source
    from ..models import for_export

    random_init = weights in ("none", "None", None)
    if name_or_path in zoo.list_models() and not Path(name_or_path).exists():
        return zoo.load(name_or_path, weights=None if random_init else weights)
    if random_init:
        raise ValueError(f"--weights none (random initialisation) applies to a zoo name, not to {name_or_path}.")
    model, recipe = load_source(name_or_path, weights=None if weights == "pretrained" else weights)
    # A network built from a recipe comes in its training form; the C export reads the native grouped
    # convolutions in float32. A saved model file is taken as it is.
    return model if recipe is None else for_export(model)


#: What export-c wrote into an output folder, with SHA-256: files it may overwrite later.
MANIFEST = ".glt_export_manifest.json"


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_out_dir(out_dir, names, *, force: bool = False) -> None:
    """Refuse (``FileExistsError``, one line) to overwrite a file in ``out_dir`` that export-c
    did not write there, or that was edited since (its SHA-256 differs from the manifest's);
    ``force`` overwrites them. Symbolic links and special files are never replaced."""
    from .._io import check_replaceable

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"-o {out_dir} is a file, not a folder.")
    try:
        written = json.loads((out_dir / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        written = {}
    foreign = []
    for name in names:
        path = out_dir / name
        check_replaceable(path)
        if path.exists() and written.get(name) != _sha256(path):
            foreign.append(name)
    if foreign and not force:
        raise FileExistsError(
            f"{out_dir} holds {', '.join(foreign)}, not written by export-c or edited since; refusing to "
            "overwrite: pass --force, or choose another -o."
        )


def write_manifest(out_dir, files) -> None:
    out_dir = Path(out_dir)
    atomic_write(out_dir / MANIFEST, json.dumps(
        {"files": {Path(f).name: _sha256(Path(f)) for f in files}}, indent=1, sort_keys=True))


def _export_names(model, name) -> list:
    """The names of the files export_c writes for this model (exported once into a temp folder)."""
    import tempfile

    from .export import export_c

    with tempfile.TemporaryDirectory() as tmp:
        return [Path(p).name for p in export_c(model, tmp, name=name).files]


def cmd_export_c(args) -> int:
    from .report import format_report, mcu_report

    model = load_model(args.model, args.weights)
    names = _export_names(model, args.name)
    check_out_dir(args.out, names, force=args.force)
    try:
        return _export(model, args, format_report, mcu_report)
    finally:
        present = [Path(args.out) / n for n in names if (Path(args.out) / n).is_file()]
        if present:
            write_manifest(args.out, present)


def _export(model, args, format_report, mcu_report) -> int:
    if args.images:
        import numpy as np

        images = np.load(args.images)
    else:
        images = None
    cpus = {"none": (), "cortex-m4": ("cortex-m4",), "cortex-m7": ("cortex-m7",),
            "all": ("cortex-m4", "cortex-m7")}[args.qemu]
    if args.check <= 0 and not cpus:
        from .export import export_c

        result = export_c(model, args.out, name=args.name)
        print(f"wrote {', '.join(p.name for p in result.files)} to {result.out_dir} "
              f"(GLT_PEAK_RAM_BYTES {result.peak_ram_bytes}, weights {result.weight_bytes} B)")
        return 0
    report = mcu_report(model, args.out, name=args.name, images=images, n_images=max(args.check, 1),
                        cpus=cpus, qemu_images=args.qemu_images)
    print(format_report(report))
    if args.json:
        atomic_write(args.json, json.dumps(report, indent=2, default=str))
    # The binary layers are integer arithmetic and match exactly; the float tail (BN
    # scale, average, softmax's expf) may round differently in newlib on the FPU.
    ok = report["host"]["argmax_equal"] and all(
        e.get("argmax_equal_host", True) and e.get("max_abs_diff_vs_host", 0) <= DEVICE_TOLERANCE
        for e in report.get("cortex_m", {}).values()
    )
    return 0 if ok else 1


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export-c",
        help="export a trained model as a self-contained C99 library (microcontrollers)",
        description="Generate a C99 library (XNOR-popcount kernels, bit-packed const weights, static "
        "memory plan, int glt_infer(const uint8_t *rgb, float *scores)) for one trained model, "
        "check it against Keras with the host compiler and optionally run it on Cortex-M4/M7 under QEMU.",
    )
    p.add_argument("model", metavar="MODEL",
                   help="a zoo model name (glt_keras.zoo), a run folder (its recipe.yaml + best_weights.h5), a recipe "
                        "file with --weights FILE, or a saved Keras model (.h5 / .keras / SavedModel)")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="output directory for the C sources")
    p.add_argument("--weights", default="pretrained", metavar="W",
                   help="'pretrained' (default: a zoo NAME's published weights, a run folder's best_weights.h5), "
                        "'none' (random initialisation, zoo NAME only) or a weight file")
    p.add_argument("--name", default="glt_model", help="header / data file stem (default: glt_model)")
    p.add_argument("--check", type=int, default=8, metavar="N",
                   help="compare the host C build with Keras on N images (0: export only; default 8)")
    p.add_argument("--images", metavar="NPY", help="uint8 images (N, H, W, C) for the checks (default: synthetic)")
    p.add_argument("--qemu", choices=("none", "cortex-m4", "cortex-m7", "all"), default="none",
                   help="also cross-compile and run bare-metal under QEMU: sizes, SRAM, instructions")
    p.add_argument("--qemu-images", type=int, default=2, metavar="N", help="images embedded in the firmware")
    p.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    p.add_argument("--force", action="store_true",
                   help="overwrite files in -o DIR that export-c did not write there, or that were edited since")
    p.set_defaults(func=cmd_export_c)
