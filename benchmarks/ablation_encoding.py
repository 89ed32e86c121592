"""Ablations on one network and budget: input encodings (the paper's claim: natural binary coding
vs fixed thermometer vs GLT, and GLT with vs without knowledge distillation) and teachers from
files (a recipe with ``kd.teachers``: none, the first teacher alone, the first two, all of them).

Each variant is the zoo recipe with one change, trained with the same (shortened) schedule,
seed and data; accuracy is measured by the project's evaluation code on the recipe's
validation split (VWW: the 500 VWW validation images) and test split when it has one.

    python benchmarks/ablation_encoding.py cifar10_binary --epochs 6 --out runs/ablation
    python benchmarks/ablation_encoding.py vww_binary --epochs 8 --variants binary_planes fixed glt
    python benchmarks/ablation_encoding.py cifar10_binary --epochs 2 --out runs/ablation --readme README.md
    python benchmarks/ablation_encoding.py vww_binary --epochs 12 --precision auto \
        --variants no_teacher first_teacher teachers --out runs/ablation_teachers \
        --table vww_binary_teachers --readme README.md --cache-dir runs/teacher_views

Prints a markdown table and writes ``OUT/<recipe>_ablation.json`` (with ``--seeds 0 1``:
``OUT/<recipe>_ablation_seeds_0_1.json``; with ``--readme``, also the table into the README
between ``<!-- ablation-<recipe>:start -->`` / ``ablation-<recipe>-seeds-0-1`` markers).
Runs resume: a variant whose run folder already finished is not trained again, so variants
trained by separate processes into one ``--out`` are gathered into one table by running once
more with all of them.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

def _without_teachers(recipe) -> dict:
    """Hard labels only: sources that only the teachers label are left out, pasted people are
    labelled person, sampling balances on the hard labels; no teacher view cache, and no mixup or
    mosaic (their blends have no hard label: only a teacher can label them)."""
    sources = recipe.data["train"] if isinstance(recipe.data["train"], list) else [recipe.data["train"]]
    kept = []
    for spec in sources:
        if spec.get("labels") == "teacher":
            continue
        if "paste" in spec and spec["paste"].get("label") == "teacher":
            spec = {**spec, "paste": {**spec["paste"], "label": "person"}}
        kept.append(spec)
    augment = {k: v for k, v in (recipe.data.get("augment") or {}).items() if k not in ("mixup", "mosaic")}
    return dict(data={"train": kept, "balance": True, "augment": augment}, kd={"teachers": None, "view_cache": None})


VARIANTS = {  # name -> the recipe's changes (or a function of the recipe giving them)
    "binary_planes": dict(model={"encoding": "binary_planes"}),
    "fixed": dict(model={"encoding": "fixed"}),
    "glt": dict(model={"encoding": "glt"}),
    "glt_kd": dict(model={"encoding": "glt"}, kd={"teacher": "twin"}),  # teacher: same schedule
    "no_teacher": _without_teachers,
    "first_teacher": lambda recipe: dict(kd={"teachers": recipe.kd["teachers"][:1]}),
    "first_two_teachers": lambda recipe: dict(kd={"teachers": recipe.kd["teachers"][:2]}),
    "teachers": lambda recipe: {},  # the recipe's own teachers
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, nargs="+",
                        help="training seeds (default: the recipe's); a run other than the recipe's seed is "
                             "named <recipe>_<variant>_seed<N>")
    parser.add_argument("--subset", type=int, help="images per split (smoke runs)")
    parser.add_argument("--steps-per-epoch", type=int)
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--data-dir")
    parser.add_argument("--cache-dir", help="teacher view cache folder for recipes with kd.view_cache (as "
                        "glt-keras train --cache-dir): variants whose teachers match a cached run reuse its views")
    parser.add_argument("--threads", type=int, default=0, help="TensorFlow intra-op threads (0: all cores)")
    parser.add_argument("--precision", choices=["float32", "mixed_bfloat16", "auto"],
                        help="training precision of every variant (default: the recipe's)")
    parser.add_argument("--table", metavar="NAME",
                        help="name of the table's files and README markers (default: <recipe>_ablation); "
                             "a second ablation of the same recipe needs its own, e.g. vww_binary_teachers")
    parser.add_argument("--readme", metavar="README.md",
                        help="replace the table between this README's <!-- ablation-RECIPE:start/end --> markers")
    args = parser.parse_args(argv)

    import glt_keras  # noqa: F401  (Keras flavour first)
    from glt_keras._io import atomic_write
    from glt_keras.training.cli import _threads

    _threads(args.threads)
    from glt_keras.models import load_weights, model_summary
    from glt_keras.recipe import load_recipe
    from glt_keras.training.evaluation import evaluate
    from glt_keras.training.run import train
    from glt_keras.training.splits import extra_eval_sets, load_splits

    base = load_recipe(args.recipe)
    out = Path(args.out)
    # The recipe's extra evaluation sets (VWW: 1,267 held-out in-domain photos, a second and
    # larger opinion next to the 500 VWW images), the same for every variant. Only 6% of them
    # show a person, so they are scored per class: top-1 would reward never saying "person".
    extra_sets = extra_eval_sets(base, data_dir=args.data_dir)
    rows = []
    base_seed = int(base.training.get("seed", 0))
    for seed, variant in [(seed, v) for seed in (args.seeds or [base_seed]) for v in args.variants]:
        change = VARIANTS[variant]
        change = dict(change(base) if callable(change) else change)
        if variant in ("first_teacher", "first_two_teachers", "teachers") and not base.kd.get("teachers"):
            parser.error(f"variant {variant} needs a recipe with kd.teachers")
        if variant == "first_two_teachers" and len(base.kd["teachers"]) < 3:
            parser.error(f"variant {variant} needs a recipe with three or more kd.teachers (it has "
                         f"{len(base.kd['teachers'])}: the variant would equal 'teachers')")
        if "kd" in change:
            change["kd"] = {**change["kd"], "teacher_epochs": args.epochs}
        name = f"{base.name}_{variant}" + ("" if seed == base_seed else f"_seed{seed}")
        training = {"epochs": args.epochs, "seed": seed, **({"precision": args.precision} if args.precision else {})}
        recipe = base.with_changes(name=name, training=training, **change)
        run_dir = out / recipe.name
        t0 = time.time()
        train(recipe, out_dir=run_dir, resume=True, data_dir=args.data_dir, subset=args.subset,
              steps_per_epoch=args.steps_per_epoch, verbose=2, view_cache_dir=args.cache_dir)
        model = recipe.build_model()
        load_weights(model, run_dir / "best_weights.h5")
        splits = load_splits(recipe, data_dir=args.data_dir, subset=args.subset)
        summary_file = run_dir / "summary.json"
        trained = json.loads(summary_file.read_text()) if summary_file.exists() else {}
        row = {"variant": variant, "seed": seed, "encoding": recipe.model.get("encoding"),
               "kd": bool(recipe.kd.get("teacher")),
               "teachers": len(recipe.kd.get("teachers") or []), "epochs": args.epochs,
               "epoch_images": recipe.data.get("epoch_images") or len(splits.train[1]),
               "binary_weight_bytes": model_summary(model)["binary_weight_bytes"],
               # Student training time (a KD variant's teacher is trained first, not counted).
               "train_seconds": trained.get("train_seconds", round(time.time() - t0, 1))}
        for split, pair in (("val", splits.val), ("test", splits.test)):
            if pair is not None:
                row[f"{split}_accuracy"] = evaluate(model, *pair, class_names=recipe.classes,
                                                    image_size=recipe.input_shape[:2])["accuracy"]
        for where, (x, y) in extra_sets.items():
            row[f"{where}_mean_per_class_accuracy"] = evaluate(
                model, x, y, class_names=recipe.classes,
                image_size=recipe.input_shape[:2])["mean_per_class_accuracy"]
        rows.append(row)
    keys = ["variant", "seed", "encoding", "kd"] + (["teachers"] if any(r["teachers"] for r in rows) else [])
    keys += ["epochs", "epoch_images", "binary_weight_bytes", "val_accuracy", "test_accuracy"]
    keys += sorted({k for r in rows for k in r if k.endswith("_accuracy") and k not in keys}) + ["train_seconds"]
    keys = [k for k in keys if any(k in r for r in rows)]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(
            f"{100 * r[k]:.2f}%" if k.endswith("accuracy") and k in r else str(r.get(k, "")) for k in keys) + " |")
    table = "\n".join(lines)
    print(table)
    # A table over chosen seeds is its own table (file and README markers), beside the recipe-seed one.
    seeds = "_".join(map(str, args.seeds)) if args.seeds else ""
    table_name = args.table or f"{base.name}_ablation"
    stem = table_name + (f"_seeds_{seeds}" if seeds else "")
    atomic_write(out / f"{stem}.json",
                 json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2))
    atomic_write(out / f"{stem}.md", table + "\n")
    if args.readme:
        from glt_keras.bench import update_readme

        tag = (f"ablation-{args.table}" if args.table else f"ablation-{base.name}") + (
            f"-seeds-{seeds.replace('_', '-')}" if seeds else "")
        update_readme(args.readme, table + "\n",
                      command="python benchmarks/ablation_encoding.py " + " ".join(sys.argv[1:] if argv is None else argv),
                      start=f"<!-- {tag}:start -->", end=f"<!-- {tag}:end -->")
    return 0


if __name__ == "__main__":
    sys.exit(main())
