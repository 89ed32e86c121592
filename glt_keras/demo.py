"""``make demo``: the zoo's main job end to end on real images.

Loads ``vww_binary`` (pretrained, checksum-verified), evaluates it in Keras on the
Visual Wake Words validation images, converts it with Larq Compute Engine (verified
against Keras), runs the ``.tflite`` in LCE's interpreter, and prints accuracy, bytes
and latency next to the MLPerf Tiny reference model measured in the same run.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glt_keras.demo", description=__doc__)
    parser.add_argument("--model", default="vww_binary")
    parser.add_argument("--data-dir")
    parser.add_argument("--out", default="out", help="where the .tflite is written")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args(argv)

    from . import zoo
    from .bench import anchors_dir, conversion_entry, reference_entries, run_bench, to_markdown
    from .convert import to_tflite
    from .data import load_arrays
    from .training.evaluation import confusion_markdown, evaluate

    t0 = time.time()
    recipe = zoo.get_recipe(args.model)
    try:
        model = zoo.load(args.model)
        label = args.model
    except zoo.WeightsError as err:
        print(f"demo: {err}\ndemo: continuing with an UNTRAINED {args.model} to show the pipeline.\n")
        model = zoo.load(args.model, weights=None)
        label = f"{args.model} (untrained)"

    val = recipe.data.get("val") or recipe.data.get("test")
    data = load_arrays(val["dataset"], val["split"], data_dir=args.data_dir)
    result = evaluate(model, data.x, data.y, class_names=recipe.classes, image_size=recipe.input_shape[:2])
    print(f"Keras {label} on {val['dataset']}/{val['split']} ({result['images']} images): "
          f"accuracy {100 * result['accuracy']:.2f}%")
    print(confusion_markdown(result), "\n")

    out = Path(args.out)
    out.mkdir(exist_ok=True)
    conversion = to_tflite(model, out / f"{args.model}.tflite", verify_images=data.x[:32])
    print(conversion.report.to_markdown(), "\n")
    v = conversion.verification
    print(f"wrote {conversion.path} ({len(conversion.flatbuffer):,} bytes); LCE interpreter vs Keras on "
          f"{v.n_images} images: argmax agreement {v.argmax_agreement:.0%}, max |diff| {v.max_abs_diff:.1e}\n")

    entry = conversion_entry(conversion, label, model)
    entries = [entry] + reference_entries([entry.task], anchors_dir(None))
    bench = run_bench(entries, limit=None, repeats=args.repeats)
    print(to_markdown(bench))
    print(f"\ndemo finished in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
