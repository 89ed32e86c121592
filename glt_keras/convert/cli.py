"""``glt-keras convert``: Keras model (zoo name or file) -> verified LCE ``.tflite`` + report."""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)(i?[bB]?)\s*$")


def parse_bytes(text: str) -> int:
    """``"262144"``, ``"256k"``, ``"256KiB"``, ``"1M"`` -> bytes (k / M = 1024 / 1024**2)."""
    m = _SIZE.match(str(text))
    if not m:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}: use bytes, or a number with k/M (e.g. 262144, 256k, 1M)"
        )
    value = float(m.group(1)) * {"": 1, "k": 1024, "m": 1024 ** 2}[m.group(2).lower()]
    if value <= 0 or value != int(value):
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: must be a positive whole number of bytes")
    return int(value)


def _parse_range(text: str):
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX (e.g. -16,16), got {text!r}") from None
    return lo, hi


def resolve_model(source: str, weights=None):
    """A Keras model from a model file, a run folder, a recipe with ``weights``, or a zoo name
    (:func:`glt_keras.model_sources.load_model`)."""
    from ..model_sources import load_model

    model, _ = load_model(source, weights=weights)
    return getattr(model, "model", model)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a Keras model to a verified Larq Compute Engine .tflite",
        description=(
            "Convert a zoo model (by name) or a saved Keras model file to a TFLite flatbuffer "
            "for Larq Compute Engine, check that every convolution became LceBconv2d, verify "
            "it against Keras in the LCE interpreter and print a markdown report."
        ),
    )
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p) -> None:
    """The ``convert`` options (shared with ``converters/to_tflite.py``)."""
    p.add_argument("model", metavar="MODEL",
                   help="zoo name, run folder (its recipe.yaml + best_weights.h5), recipe file with --weights, "
                        "or .h5/.keras/SavedModel path")
    p.add_argument("--weights", help="weight file, for a zoo name, recipe or run folder (default: the published "
                                     "weights / the run's best_weights.h5)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.tflite", help="flatbuffer to write")
    p.add_argument("--int8-io", action="store_true",
                   help="int8 input (raw pixel - 128: scale 1, zero point -128) and int8 output")
    p.add_argument("--output-range", type=_parse_range, metavar="MIN,MAX",
                   help="int8 output range (default: (0,1) after softmax, else from the verify images)")
    p.add_argument("--target", choices=("arm", "xcore"), default="arm")
    p.add_argument("--c-array", action="store_true",
                   help="also write OUT.h / OUT.cc holding the flatbuffer as a C array")
    p.add_argument("--c-name", metavar="IDENT", help="C array name (default: from OUT's file name)")
    p.add_argument("--strict", action="store_true", help="fail if any convolution stayed float")
    p.add_argument("--strip-strings", action="store_true",
                   help="drop tensor names and signatures a device does not need (~2-3 KB smaller)")
    p.add_argument("--flash-budget", type=parse_bytes, metavar="BYTES", help="e.g. 262144, 256k, 1M")
    p.add_argument("--no-verify", action="store_true", help="skip the LCE-interpreter vs Keras check")
    p.add_argument("--images", metavar="FILE.npy",
                   help="verification images (N,H,W,C raw pixels) instead of random ones")
    p.add_argument("--tolerance", type=float, help="max |tflite - keras| allowed (default: automatic)")
    p.add_argument("--json", metavar="REPORT.json", help="also write the report as JSON")


def c_identifier(stem: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_]", "_", stem)
    return name if re.match(r"^[A-Za-z_]", name) else f"m_{name}"


def run(args) -> int:
    import numpy as np

    from .._io import atomic_write, check_replaceable
    from .c_array import write_c_array
    from .tflite import StrictConversionError, conversion_result_json, to_tflite
    from .verify import VerificationError

    check_replaceable(args.output)  # a link or device at -o: refused before the conversion
    if args.json:
        check_replaceable(args.json)
    images = None
    if args.images:
        if not Path(args.images).is_file():
            raise FileNotFoundError(f"No such images file: {args.images}")
        images = np.load(args.images)
    model = resolve_model(args.model, args.weights)
    try:
        result = to_tflite(
            model, args.output, int8_io=args.int8_io, target=args.target, verify=not args.no_verify,
            verify_images=images, strict=args.strict, tolerance=args.tolerance,
            flash_budget=args.flash_budget, output_range=args.output_range, strip_strings=args.strip_strings,
        )
    except StrictConversionError as err:
        print(err.result.to_markdown(), file=sys.stderr)
        raise
    except VerificationError as err:
        conversion = getattr(err, "conversion", None)
        if conversion is not None:
            print(conversion.to_markdown(), file=sys.stderr)
        raise
    if args.c_array:
        out = Path(args.output)
        h, cc = write_c_array(result.flatbuffer, out.parent, name=args.c_name or c_identifier(out.stem))
        result.report.notes.append(f"C array: `{h}` and `{cc}`")
    print(result.to_markdown(title=f"{args.model} -> {args.output}"))
    if args.json:
        atomic_write(args.json, json.dumps(conversion_result_json(result), indent=2))
    return 0
