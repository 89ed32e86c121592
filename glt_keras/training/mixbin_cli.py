"""``glt-keras mixbin``: choose the layers to keep real-valued under a budget, optionally train.

    glt-keras mixbin cifar10_binary --budget 0.1 --by macs --method gated --steps 300
    glt-keras mixbin cifar10_binary --budget 0.1 --method first_last --train --epochs 20

See :mod:`glt_keras.training.mixbin` for the cost model and the methods.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..cli import non_negative_int


def cmd_mixbin(args):
    from ..recipe import load_recipe
    from . import mixbin
    from .cli import _threads

    _threads(args.threads)
    recipe = load_recipe(args.recipe)
    selection = mixbin.select_layers(
        recipe, args.budget, by=args.by, method=args.method, steps=args.steps,
        finetune_steps=args.finetune_steps, subset=args.subset, data_dir=args.data_dir, seed=args.seed,
        penalty_weight=args.penalty_weight, init_weights=args.init_weights,
    )
    print(selection.to_markdown())
    result = {"selection": selection.to_dict()}
    out = Path(args.out) if args.out else Path("runs") / mixbin.variant_name(recipe, selection)
    if args.train:
        print(f"training {recipe.name} with real layers {selection.layers or 'none'} -> {out}")
        trained = mixbin.train_selection(
            recipe, selection, out_dir=out, epochs=args.epochs, subset=args.subset,
            steps_per_epoch=args.steps_per_epoch, teacher=args.teacher, data_dir=args.data_dir,
            resume=args.resume, verbose=args.verbose, init_weights=args.init_weights,
        )
        result["training"] = {k: v for k, v in trained.items() if k != "selection"}
        keys = ("best_val_accuracy", "accuracy", "eval_images", "tflite_bytes", "lce_bconv2d", "float_convs",
                "int8_tflite_bytes", "int8_accuracy", "int8_agreement", "macs", "real_macs", "weight_bytes_int8",
                "verification")
        for key in keys:
            if key in trained:
                print(f"- {key}: {trained[key]}")
    if args.json:
        from .._io import atomic_write

        atomic_write(args.json, json.dumps(mixbin._json_safe(result), indent=2))
    return 0


def register(subparsers):
    from .mixbin import BY, METHODS

    p = subparsers.add_parser(
        "mixbin", help="budget-aware partial binarization: which layers stay real-valued (MixBin-style)")
    p.add_argument("recipe", help="zoo recipe name (e.g. cifar10_binary) or path to a recipe .yaml")
    p.add_argument("--budget", type=float, required=True,
                   help="largest fraction of MACs / int8 weight bytes that may be real-valued (0: fully binary)")
    p.add_argument("--by", choices=BY, default="macs", help="what the budget counts (default macs)")
    p.add_argument("--method", choices=METHODS, default="gated", help="selection method (default gated)")
    p.add_argument("--steps", type=int, default=200, help="search training steps (gated, greedy)")
    p.add_argument("--finetune-steps", type=int, help="greedy: fine-tuning steps per variant (default steps/2)")
    p.add_argument("--penalty-weight", type=float, default=1.0, help="gated: weight of the budget penalty")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subset", type=int, help="use at most this many images per split (smoke runs)")
    p.add_argument("--train", action="store_true", help="then train the chosen network with the recipe")
    p.add_argument("--epochs", type=int, help="training epochs (default: the recipe's)")
    p.add_argument("--steps-per-epoch", type=int)
    p.add_argument("--teacher", help="run folder with best_weights.h5 of a real-valued teacher (KD)")
    p.add_argument("--init-weights", help="start the search and the training from these weights of the trained "
                                          "fully binary network (file or run folder) instead of from scratch")
    p.add_argument("--resume", action="store_true", help="continue an interrupted --train run")
    p.add_argument("--out", help="run folder (default runs/<recipe>_mixbin_<method>_<by><budget>)")
    p.add_argument("--json", help="write the selection (and the training result) as JSON")
    p.add_argument("--data-dir")
    p.add_argument("--threads", type=non_negative_int, default=0, help="TensorFlow intra-op threads (0: all cores)")
    p.add_argument("--verbose", type=int, default=2)
    p.set_defaults(func=cmd_mixbin)
