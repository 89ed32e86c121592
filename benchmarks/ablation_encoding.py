"""Input-encoding ablation (the paper's claim): natural binary coding vs fixed thermometer vs
GLT, and GLT with vs without knowledge distillation, on the same network and budget.

Each variant is the zoo recipe with one change, trained with the same (shortened) schedule,
seed and data; accuracy is measured by the project's evaluation code on the recipe's
validation split (VWW: the 500 VWW validation images) and test split when it has one.

    python benchmarks/ablation_encoding.py cifar10_binary --epochs 6 --out runs/ablation
    python benchmarks/ablation_encoding.py vww_binary --epochs 8 --variants binary_planes fixed glt

Prints a markdown table and writes ``OUT/<recipe>_ablation.json``. Runs resume: a variant
whose run folder already finished is not trained again.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

VARIANTS = {
    "binary_planes": dict(model={"encoding": "binary_planes"}),
    "fixed": dict(model={"encoding": "fixed"}),
    "glt": dict(model={"encoding": "glt"}),
    "glt_kd": dict(model={"encoding": "glt"}, kd={"teacher": "twin"}),  # teacher: same schedule
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--subset", type=int, help="images per split (smoke runs)")
    parser.add_argument("--steps-per-epoch", type=int)
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--data-dir")
    parser.add_argument("--threads", type=int, default=0, help="TensorFlow intra-op threads (0: all cores)")
    args = parser.parse_args(argv)

    import glt_keras  # noqa: F401  (Keras flavour first)
    from glt_keras._io import atomic_write
    from glt_keras.training.cli import _threads

    _threads(args.threads)
    from glt_keras.models import load_weights, model_summary
    from glt_keras.recipe import load_recipe
    from glt_keras.training.run import evaluate, load_splits, train

    base = load_recipe(args.recipe)
    out = Path(args.out)
    rows = []
    for variant in args.variants:
        change = dict(VARIANTS[variant])
        if "kd" in change:
            change["kd"] = {**change["kd"], "teacher_epochs": args.epochs}
        recipe = base.with_changes(name=f"{base.name}_{variant}", training={"epochs": args.epochs}, **change)
        run_dir = out / recipe.name
        t0 = time.time()
        train(recipe, out_dir=run_dir, resume=True, data_dir=args.data_dir, subset=args.subset,
              steps_per_epoch=args.steps_per_epoch, verbose=2)
        model = recipe.build_model()
        load_weights(model, run_dir / "best_weights.h5")
        splits = load_splits(recipe, data_dir=args.data_dir, subset=args.subset)
        summary_file = run_dir / "summary.json"
        trained = json.loads(summary_file.read_text()) if summary_file.exists() else {}
        row = {"variant": variant, "encoding": recipe.model.get("encoding"),
               "kd": bool(recipe.kd.get("teacher")), "epochs": args.epochs,
               "epoch_images": recipe.data.get("epoch_images") or len(splits.train[1]),
               "binary_weight_bytes": model_summary(model)["binary_weight_bytes"],
               # Student training time (a KD variant's teacher is trained first, not counted).
               "train_seconds": trained.get("train_seconds", round(time.time() - t0, 1))}
        for split, pair in (("val", splits.val), ("test", splits.test)):
            if pair is not None:
                row[f"{split}_accuracy"] = evaluate(model, *pair, class_names=recipe.classes,
                                                    image_size=recipe.input_shape[:2])["accuracy"]
        rows.append(row)
    keys = ["variant", "encoding", "kd", "epochs", "epoch_images", "binary_weight_bytes", "val_accuracy",
            "test_accuracy", "train_seconds"]
    keys = [k for k in keys if any(k in r for r in rows)]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(
            f"{100 * r[k]:.2f}%" if k.endswith("accuracy") and k in r else str(r.get(k, "")) for k in keys) + " |")
    table = "\n".join(lines)
    print(table)
    atomic_write(out / f"{base.name}_ablation.json",
                 json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2))
    atomic_write(out / f"{base.name}_ablation.md", table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
