#!/usr/bin/env python
"""MixBin table: accuracy vs .tflite bytes vs MACs for budgets x layer-selection methods.

For a recipe, every (budget, method) pair selects the real-valued layers
(``glt_keras.training.mixbin.select_layers``), the chosen network is trained with the
recipe (``glt_keras.training.mixbin_run.train_selection``), evaluated on the recipe's test split (else
validation), converted with LCE and verified. Networks with the same real layers are
trained once (budget 0 is the fully binary network for every method). Results are
written after every row to ``OUT/results.json`` and ``OUT/table.md``; a rerun with the same
``--out`` skips what is done (and ``--resume`` continues an interrupted training).

    # smoke run (minutes): tiny subset, 1 short epoch
    python benchmarks/mixbin_table.py --recipe cifar10_binary --subset 256 --epochs 1 \\
        --steps-per-epoch 2 --search-steps 4 --out /tmp/mixbin_smoke
    # the real table (hours: see the estimate printed at the start)
    python benchmarks/mixbin_table.py --recipe cifar10_binary --epochs 8 --search-steps 300 \\
        --out out/mixbin_cifar10
    # fine-tuning every choice from the published fully binary model (what the README reports)
    python benchmarks/mixbin_table.py --recipe vww_binary --init-weights zoo --teacher \\
        runs/vww_binary_kd_teacher --lr 5e-4 --warmup-epochs 0 --epochs 3 --search-steps 150 \\
        --finetune-steps 60 --out runs/mixbin_vww
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import glt_keras  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

DEFAULT_BUDGETS = (0.0, 0.05, 0.10, 0.20)


def parse_args(argv=None):
    from glt_keras.training.mixbin import BY, METHODS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="cifar10_binary", help="zoo recipe name or recipe .yaml")
    p.add_argument("--budgets", type=float, nargs="+", default=list(DEFAULT_BUDGETS))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--by", choices=BY, default="macs")
    p.add_argument("--epochs", type=int, default=3, help="training epochs per network (default 3)")
    p.add_argument("--steps-per-epoch", type=int, help="default: the recipe's epoch length")
    p.add_argument("--subset", type=int, help="at most this many images per split (smoke runs)")
    p.add_argument("--search-steps", type=int, default=200, help="gated / greedy search steps")
    p.add_argument("--finetune-steps", type=int, help="greedy fine-tuning steps per variant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher", help="run folder of a real-valued teacher for KD (default: none)")
    p.add_argument("--init-weights",
                   help="fine-tune every network (and start the searches) from these weights of the trained "
                        "fully binary network (a file, a run folder, or 'zoo': the published model of the recipe) "
                        "instead of training from scratch")
    p.add_argument("--lr", type=float, help="learning rate of every parameter group (default: the recipe's)")
    p.add_argument("--warmup-epochs", type=float, help="default: the recipe's")
    p.add_argument("--verify-images", type=int, default=8)
    p.add_argument("--no-int8", action="store_true", help="skip the int8-real-layer flatbuffer")
    p.add_argument("--out", default="out/mixbin_table", help="folder for runs, results.json, table.md")
    p.add_argument("--data-dir")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--readme", help="with --report-only: update the compact table between this README's "
                                    "<!-- mixbin-RECIPE:start/end --> markers")
    p.add_argument("--report-only", action="store_true",
                   help="only rewrite table.md and accuracy_vs_bytes.png from OUT/results.json")
    return p.parse_args(argv)


def _num(value) -> str:
    return "" if value is None else f"{value:.4f}"


def markdown(rows, meta) -> str:
    start = (f"fine-tuned from `{meta['init_weights']}`" if meta.get("init_weights") else "trained from scratch")
    lines = [
        f"# MixBin: {meta['recipe']} (budget by {meta['by']}, {meta['epochs']} epochs"
        + (f", subset {meta['subset']}" if meta.get("subset") else "") + ")", "",
        f"Every network {start}"
        + (f", with KD from `{meta['teacher']}`" if meta.get("teacher") else ", without KD")
        + (f", training overrides {meta['training']}" if meta.get("training") else "")
        + f"; searches: {meta['search_steps']} steps, seed {meta['seed']}.", "",
        "Real layers chosen per budget and method, then trained with the recipe. Cost: fraction of "
        f"{meta['by']} that is real-valued (real weights counted at 8 bits, binary at 1). "
        "`.tflite (f32 real)`: real layers in float32, checked against Keras (verified); `int8`: real layers "
        "int8 (BN folded, post-training ranges), accuracy measured in the LCE interpreter.", "",
        "| budget | method | real layers | cost | accuracy | best val acc | .tflite bytes (f32 real) | "
        "int8 .tflite bytes | int8 accuracy | weight bytes (int8 count) | MACs (real) | "
        "LceBconv2d / CONV_2D | verified |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        t = r.get("result", {})
        acc = t.get("accuracy")
        val = t.get("best_val_accuracy")
        verified = (str(t.get("verification", "")).startswith("verification passed") if t else None)
        ops = f"{t.get('lce_bconv2d', '')} / {len(t.get('float_convs', []))}" if t else "(not trained yet)"
        macs = f"{t.get('macs', '')} ({t.get('real_macs', '')})" if t else ""
        lines.append(
            f"| {r['budget']:g} | {r['method']} | {', '.join(r['layers']) or '(binary)'} | {r['cost']:.4f} | "
            f"{'' if acc is None else f'{acc:.4f}'} | {'' if val is None else f'{val:.4f}'} | "
            f"{t.get('tflite_bytes', '')} | {t.get('int8_tflite_bytes', '')} | "
            f"{_num(t.get('int8_accuracy'))} | {t.get('weight_bytes_int8', '')} | {macs} | {ops} | "
            f"{'' if verified is None else 'yes' if verified else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def compact_markdown(rows, meta) -> str:
    """The README's short form: accuracy and deployable bytes per budget and method."""
    binary = next((r["result"] for r in rows if not r["layers"] and r["result"]), {})
    lines = ["| budget | method | real layers | accuracy (float real layers) | vs binary | accuracy (int8 real layers) "
             "| .tflite bytes (int8 real layers) | real MACs |",
             "|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["budget"] == 0 and r["method"] != rows[0]["method"]:
            continue  # budget 0 is the same fully binary network for every method: one row
        t = r["result"]
        acc, int8 = t.get("accuracy"), t.get("int8_accuracy")
        delta = f"{100 * (acc - binary['accuracy']):+.1f}" if acc is not None and binary and r["layers"] else ""
        real_macs = f"{t['real_macs'] / t['macs']:.1%}" if t.get("macs") else ""
        method = "all" if r["budget"] == 0 else r["method"]
        layers = ", ".join(r["layers"]) or ("(fully binary)" if r["budget"] == 0 else "(none chosen: fully binary)")
        lines.append(f"| {r['budget']:g} | {method} | {layers} | "
                     f"{'' if acc is None else f'{100 * acc:.1f}%'} | {delta} | "
                     f"{'' if int8 is None else f'{100 * int8:.1f}%'} | "
                     f"{format(t['int8_tflite_bytes'], ',') if t.get('int8_tflite_bytes') else ''} | {real_macs} |")
    return "\n".join(lines) + "\n"


def plot(rows, meta, path) -> None:
    """Accuracy vs deployable bytes (int8 real layers), one marker per method; the fully
    binary network is the reference line."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from glt_keras._io import atomic_write

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    markers = {"gated": "o", "greedy": "s", "first_last": "^", "random": "x"}
    done = [r for r in rows if r["result"].get("accuracy") is not None]
    for method in sorted({r["method"] for r in done}):
        pts = [(r["result"].get("int8_tflite_bytes") or r["result"]["tflite_bytes"], r["result"]["accuracy"], r)
               for r in done if r["method"] == method and r["layers"]]
        if pts:
            ax.scatter([p[0] / 1000 for p in pts], [100 * p[1] for p in pts], marker=markers.get(method, "o"),
                       label=method, s=40)
            for x, y, r in pts:
                ax.annotate(f"{r['budget']:g}", (x / 1000, 100 * y), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
    binary = next((r["result"] for r in done if not r["layers"]), None)
    if binary is not None:
        ax.axhline(100 * binary["accuracy"], color="gray", ls="--", lw=1,
                   label=f"fully binary ({binary['tflite_bytes'] / 1000:.1f} KB)")
        ax.axvline(binary["tflite_bytes"] / 1000, color="gray", ls=":", lw=1)
    ax.axvline(125.0, color="tab:red", ls="-", lw=0.8, label="1 Mbit (125 KB)")
    ax.set_xlabel(".tflite KB (real layers int8)")
    ax.set_ylabel("accuracy (%, real layers float)")
    ax.set_title(f"MixBin on {meta['recipe']}: budget by {meta['by']} (labels: budget)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def write_report(state: dict, out: Path) -> None:
    """``results.json``, ``table.md`` and ``accuracy_vs_bytes.png`` from the state (atomic writes)."""
    from glt_keras._io import atomic_write
    from glt_keras.training.mixbin_run import _json_safe

    rows = []
    for sel in state.get("selections", {}).values():
        rows.append({"budget": sel["budget"], "method": sel["method"], "layers": sel["layers"],
                     "cost": sel["cost"], "result": state.get("trained", {}).get(",".join(sel["layers"]), {})})
    rows.sort(key=lambda r: (r["budget"], r["method"]))
    state["rows"] = rows
    atomic_write(out / "results.json", json.dumps(_json_safe(state), indent=2))
    atomic_write(out / "table.md", markdown(rows, state["meta"]))
    plot(rows, state["meta"], out / "accuracy_vs_bytes.png")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report_only:
        results_path = Path(args.out) / "results.json"
        if not results_path.exists():
            print(f"error: {results_path} does not exist: nothing to report.", file=sys.stderr)
            return 2
        state = json.loads(results_path.read_text())
        write_report(state, Path(args.out))
        print((Path(args.out) / "table.md").read_text())
        if args.readme:
            from glt_keras.bench import update_readme

            tag = f"mixbin-{state['meta']['recipe']}"
            update_readme(args.readme, compact_markdown(state["rows"], state["meta"]),
                          command=f"python benchmarks/mixbin_table.py --out {args.out} --report-only --readme {args.readme}",
                          start=f"<!-- {tag}:start -->", end=f"<!-- {tag}:end -->")
        return 0
    if args.threads:
        from glt_keras.training.cli import _threads

        _threads(args.threads)
    from glt_keras.data import random_subset
    from glt_keras.recipe import load_recipe
    from glt_keras.training import mixbin, mixbin_run
    from glt_keras.training.splits import load_splits

    recipe = load_recipe(args.recipe)
    init_weights = init_label = args.init_weights
    if init_weights is not None:
        from glt_keras.training.checkpoints import resolve_init_weights
        from glt_keras.zoo import pretrained_weights, sha256_of

        init_weights = str(pretrained_weights(recipe.name) if init_weights == "zoo"
                           else resolve_init_weights(init_weights, key="--init-weights"))
        init_label = f"{args.init_weights} (sha256 {sha256_of(init_weights)[:12]})"  # not the path: rerun anywhere
    training = {}
    if args.lr is not None:
        training.update(binary_lr=args.lr, real_lr=args.lr)
    if args.warmup_epochs is not None:
        training["warmup_epochs"] = args.warmup_epochs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    state = json.loads(results_path.read_text()) if results_path.exists() else {}
    meta = {"recipe": recipe.name, "by": args.by, "epochs": args.epochs, "subset": args.subset,
            "steps_per_epoch": args.steps_per_epoch, "search_steps": args.search_steps, "seed": args.seed,
            "teacher": args.teacher, "init_weights": init_label, "training": training}
    if state.get("meta", meta) != meta:
        print(f"error: {results_path} was made with other settings {state['meta']}; use another --out.",
              file=sys.stderr)
        return 2
    state["meta"] = meta
    selections = state.setdefault("selections", {})  # "method/budget" -> selection dict
    trained = state.setdefault("trained", {})  # "layer,layer" -> result

    def save():
        write_report(state, out)

    splits = load_splits(recipe, data_dir=args.data_dir, subset=args.subset)
    eval_pair = splits.test if splits.test is not None else splits.val
    cands = mixbin.candidates(recipe)
    print(f"{recipe.name}: {len(cands)} candidate layers; costs ({args.by}):",
          ", ".join(f"{c.name} {mixbin.budget_cost(cands, [c.name], by=args.by):.3f}" for c in cands))

    # Greedy scores do not depend on the budget: reuse those of an earlier run of this table.
    greedy_cache = next(((sel["scores"], sel["details"]) for sel in selections.values()
                         if sel.get("method") == "greedy" and "loss_binary" in (sel.get("details") or {})), None)
    t0 = time.time()
    for budget in args.budgets:
        for method in args.methods:
            key = f"{method}/{budget:g}"
            if key not in selections:
                common = dict(by=args.by, seed=args.seed, steps=args.search_steps, data=splits.train,
                              val_data=splits.val, subset=args.subset, data_dir=args.data_dir,
                              init_weights=init_weights, lr=args.lr)
                if method == "greedy" and greedy_cache is not None:  # scores do not depend on the budget
                    sel = mixbin.select_from_scores(cands, greedy_cache[0], budget, by=args.by, rule="greedy",
                                                    method="greedy", details=greedy_cache[1])
                else:
                    sel = mixbin.select_layers(recipe, budget, method=method,
                                               finetune_steps=args.finetune_steps, **common)
                    if method == "greedy" and "loss_binary" in sel.details:
                        greedy_cache = (sel.scores, sel.details)
                selections[key] = sel.to_dict()
                save()
                print(f"[{time.time() - t0:7.0f} s] {key}: {sel.layers or 'binary'} (cost {sel.cost:.4f})")
            layers = selections[key]["layers"]
            layers_key = ",".join(layers)
            if layers_key in trained:
                continue
            run_dir = out / "runs" / (("real_" + "_".join(layers)) if layers else "binary")
            resume = (run_dir / "checkpoints" / "last.json").exists()
            result = mixbin_run.train_selection(
                recipe, layers, out_dir=run_dir, epochs=args.epochs, subset=args.subset,
                steps_per_epoch=args.steps_per_epoch, teacher=args.teacher, data_dir=args.data_dir,
                verify_images=args.verify_images, resume=resume, verbose=0, eval_images=eval_pair,
                int8=not args.no_int8, calibration=random_subset(256, splits.train[0], seed=args.seed), init_weights=init_weights,
                training=training or None,
                name=f"{recipe.name}_mixbin_{run_dir.name}",
            )
            trained[layers_key] = result
            save()
            print(f"[{time.time() - t0:7.0f} s] trained {layers or 'binary'}: accuracy {result['accuracy']:.4f}, "
                  f"{result.get('tflite_bytes')} bytes (int8 real: {result.get('int8_tflite_bytes')}, "
                  f"accuracy {result.get('int8_accuracy')}), {result.get('lce_bconv2d')} LceBconv2d, "
                  f"float convs {result.get('float_convs')}")
    save()
    print((out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
