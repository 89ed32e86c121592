"""``glt-keras export-c NAME_OR_MODEL -o DIR``: a trained model as a C99 library."""
from __future__ import annotations

import json
from pathlib import Path

from .._io import atomic_write


#: Largest score difference allowed between the Cortex-M build and the host build.
DEVICE_TOLERANCE = 1e-5


def load_model(name_or_path: str, weights="pretrained"):
    """A zoo model by name (``glt_keras.zoo.load``, with ``weights``) or a saved Keras
    model file / directory."""
    path = Path(name_or_path)
    if path.exists():
        import tensorflow as tf

        from ..models import custom_objects

        return tf.keras.models.load_model(str(path), custom_objects=custom_objects(), compile=False)
    try:
        from .. import zoo
    except ImportError as err:
        if path.suffix in (".h5", ".keras", ".hdf5"):
            raise FileNotFoundError(f"model file {name_or_path!r} not found.") from err
        raise ValueError(
            f"{name_or_path!r} is not a model file, and the zoo (glt_keras.zoo) is not available "
            f"to load it by name ({err})."
        ) from err
    if weights in ("none", "None", None):
        weights = None
    return zoo.load(name_or_path, weights=weights)


def cmd_export_c(args) -> int:
    from .report import format_report, mcu_report

    model = load_model(args.model, args.weights)
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
    p.add_argument("model", metavar="NAME_OR_MODEL",
                   help="a zoo model name (glt_keras.zoo) or a saved Keras model (.h5 / .keras / SavedModel)")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="output directory for the C sources")
    p.add_argument("--weights", default="pretrained", metavar="W",
                   help="for a zoo NAME: 'pretrained' (default), 'none' (random initialisation) or a weight file")
    p.add_argument("--name", default="glt_model", help="header / data file stem (default: glt_model)")
    p.add_argument("--check", type=int, default=8, metavar="N",
                   help="compare the host C build with Keras on N images (0: export only; default 8)")
    p.add_argument("--images", metavar="NPY", help="uint8 images (N, H, W, C) for the checks (default: synthetic)")
    p.add_argument("--qemu", choices=("none", "cortex-m4", "cortex-m7", "all"), default="none",
                   help="also cross-compile and run bare-metal under QEMU: sizes, SRAM, instructions")
    p.add_argument("--qemu-images", type=int, default=2, metavar="N", help="images embedded in the firmware")
    p.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    p.set_defaults(func=cmd_export_c)
