"""``glt-keras train`` and ``glt-keras eval``."""
from __future__ import annotations

import json
import sys

from ..cli import non_negative_int, positive_int
from ..model_sources import load_model


def _threads(n):
    if n:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(min(n, 2))


def cmd_train(args):
    from pathlib import Path

    from ..recipe import load_recipe
    from .run import train

    if args.resume and args.overwrite:
        raise ValueError("--resume continues a run and --overwrite deletes it: pass one of them.")
    recipe = load_recipe(args.recipe)  # a bad recipe fails before TensorFlow starts
    out = Path(args.out or Path("runs") / recipe.name)
    _threads(args.threads)
    try:
        summary = train(
            recipe,
            out_dir=out,
            epochs=args.epochs,
            batch_size=args.batch_size,
            precision=args.precision,
            resume=args.resume,
            overwrite=args.overwrite,
            data_dir=args.data_dir,
            strategy=args.strategy,
            subset=args.subset,
            steps_per_epoch=args.steps_per_epoch,
            verbose=args.verbose,
            view_cache_dir=args.cache_dir,
        )
    except KeyboardInterrupt:
        again = " ".join(
            ["glt-keras train", args.recipe, "--resume", "--out", str(out)]
            + (["--epochs", str(args.epochs)] if args.epochs else [])
            + (["--batch-size", str(args.batch_size)] if args.batch_size else [])
            + (["--precision", args.precision] if args.precision else []))
        print(f"\nglt-keras train: interrupted; every completed epoch is saved in {out / 'checkpoints'}. "
              f"Continue with: {again}", file=sys.stderr)
        return 130
    print(json.dumps(summary, indent=2))


def cmd_eval(args):
    from .evaluation import confusion_markdown, evaluate
    from .splits import load_splits

    _threads(args.threads)
    model, recipe = load_model(args.model, weights=args.weights, tflite=True)
    classes = list(recipe.classes) if recipe is not None else None
    image_hw = tuple(model.input_shape[1:3])
    if None in image_hw:
        if recipe is None:
            raise ValueError(f"{args.model} takes images of any size: cannot tell what size to evaluate at.")
        image_hw = tuple(recipe.input_shape[:2])
    if args.data and _is_folder(args.data):
        x, y, classes = _load_folder(args.data, classes, image_hw)
    elif args.data:
        from ..data import load_arrays

        name, _, split = args.data.partition(":")
        ds = load_arrays(name, split or "test", data_dir=args.data_dir)
        x, y = ds.x, ds.y
        if classes is None:
            classes = list(ds.class_names)
        elif list(ds.class_names) != classes:
            raise ValueError(f"{args.data} has classes {list(ds.class_names)}, model has {classes}.")
    elif recipe is None:
        raise ValueError(f"{args.model} is a model file without a recipe: give the images with "
                         "--data FOLDER (one sub-folder of images per class) or --data DATASET:SPLIT.")
    else:
        splits = load_splits(recipe, data_dir=args.data_dir)
        pair = splits.test if splits.test is not None else splits.val
        x, y = pair
    outputs = model.output_shape[-1]
    if outputs != len(classes):
        raise ValueError(f"{args.model} has {outputs} outputs but the data has {len(classes)} classes "
                         f"({', '.join(classes)}).")
    result = evaluate(model, x, y, class_names=classes, image_size=image_hw)
    print(f"{model.name}: accuracy {result['accuracy']:.4f}, mean per-class "
          f"{result['mean_per_class_accuracy']:.4f}, loss {result['loss']:.4f} on {result['images']} images")
    print(confusion_markdown(result))
    if args.json:
        from .._io import atomic_write

        atomic_write(args.json, json.dumps(result, indent=2))


def _is_folder(data: str) -> bool:
    """``--data`` names a folder (it exists, or looks like a path) rather than ``DATASET:SPLIT``."""
    from pathlib import Path

    path = Path(data).expanduser()
    if path.is_dir():
        return True
    if path.exists():
        raise ValueError(f"--data {data}: a file; expected a folder with one sub-folder of images per class.")
    if "/" in data or "\\" in data or data.startswith((".", "~")):
        raise FileNotFoundError(f"--data {data}: no such folder (expected FOLDER/<class>/*.jpg).")
    return False


def _load_folder(folder, classes, image_hw):
    """``folder/<class>/*.jpg|png`` resized to the model's input; labels in the model's class order."""
    from pathlib import Path

    from ..data import load_image_folder

    root = Path(folder).expanduser()
    present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is not None and sorted(present) != sorted(classes):
        missing = [c for c in classes if c not in present]
        extra = [c for c in present if c not in classes]
        raise ValueError(f"{folder}: its class folders {present} are not the model's classes {classes}"
                         + (f" (missing: {missing})" if missing else "") + (f" (not a class: {extra})" if extra else "")
                         + ".")
    ds = load_image_folder(root, image_size=image_hw, class_names=classes)
    return ds.x, ds.y, list(ds.class_names)


def register(subparsers):
    p = subparsers.add_parser("train", help="train a zoo recipe or a recipe file")
    p.add_argument("recipe", help="zoo recipe name (e.g. cifar10_binary) or path to a recipe .yaml")
    p.add_argument("--epochs", type=positive_int)
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--precision", choices=["float32", "mixed_bfloat16", "auto"],
                   help="override training.precision (auto: bfloat16 on CPUs with AVX512-BF16 / AMX)")
    p.add_argument("--resume", action="store_true", help="continue from the last epoch checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run already in --out (checkpoints, history, best weights) and start again")
    p.add_argument("--out", help="run folder (default runs/<recipe>)")
    p.add_argument("--data-dir", help="folder with the data archives (default $GLT_DATA_DIR or ../shared/data)")
    p.add_argument("--strategy", choices=["default", "mirrored", "multiworker"], default="default")
    p.add_argument("--subset", type=positive_int, help="use at most this many images per split (smoke runs)")
    p.add_argument("--steps-per-epoch", type=positive_int)
    p.add_argument("--cache-dir", help="teacher view cache folder, for kd.view_cache (default "
                                       "$GLT_CACHE_DIR/teacher_views, else ~/.cache/glt_keras/teacher_views)")
    p.add_argument("--threads", type=non_negative_int, default=0, help="TensorFlow intra-op threads (0: all cores)")
    p.add_argument("--verbose", type=int, default=1, help="1: progress bar, 2: one line per epoch")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("eval", help="accuracy, loss and confusion matrix of a model")
    p.add_argument("model", help="zoo name, recipe file, run folder, or model file (.h5/.keras/SavedModel "
                                 "folder, or .tflite run by LCE's interpreter)")
    p.add_argument("--weights", help="weights file (default: pretrained / the run's best)")
    p.add_argument("--data", help="FOLDER of images (one sub-folder per class), or DATASET[:SPLIT], e.g. "
                                  "vww_val500:val (default: the recipe's test/val; required for a model file)")
    p.add_argument("--data-dir")
    p.add_argument("--json", help="write the result as JSON")
    p.add_argument("--threads", type=non_negative_int, default=0)
    p.set_defaults(func=cmd_eval)
