"""Pruning at the recipe level: a recipe's ``pruning`` settings, the full-width recipe a
shrunk one trains, the shrunk recipe, and the export of a pruning run's shrunk network."""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from .shrinking import pruning_report, shrink


#: ``pruning:`` keys of a recipe, with their defaults (see :func:`pruning_settings`).
PRUNING_DEFAULTS = {
    "target_ratio": 0.5,
    "score": "bn",
    "allocation": "global",
    "start_epoch": 0,
    "end_epoch": None,
    "frequency_steps": 100,
    "block_size": 32,
    "layers": None,
    "init_weights": None,
    "full_model": None,
}

#: The architecture keys of a recipe's ``model`` block that :func:`shrunk_recipe` makes explicit.
_ARCH_KEYS = ("widths", "groups", "pools", "strides", "kernels", "shuffle")


def pruning_settings(recipe) -> dict | None:
    """A recipe's ``pruning`` block with defaults filled in, or ``None`` without one.

    Keys: ``target_ratio``, ``score`` (``bn`` / ``l1``), ``allocation`` (``global`` /
    ``layer``), ``start_epoch`` and ``end_epoch`` (0-based epoch indices: the ratio
    grows from 0 at the first step of ``start_epoch`` to the target at the first step
    of ``end_epoch``; default ``end_epoch = start_epoch``: one-shot), ``frequency_steps``,
    ``block_size``, ``layers``, ``init_weights`` (weights to fine-tune from) and
    ``full_model`` (see :func:`shrunk_recipe`).
    """
    spec = getattr(recipe, "pruning", None)
    if not spec:
        return None
    # Keys, types and ranges were checked when the Recipe was built (glt_keras.recipe.PRUNING_KEYS).
    settings = {**PRUNING_DEFAULTS, **spec}
    if settings["end_epoch"] is None:
        settings["end_epoch"] = settings["start_epoch"]
    return settings


def training_recipe(recipe):
    """The recipe that is actually trained: for a shrunk recipe (``pruning.full_model``
    set, see :func:`shrunk_recipe`), the full-width network to fine-tune and prune."""
    from ...recipe import Recipe

    settings = pruning_settings(recipe)
    if not settings or not settings.get("full_model"):
        return recipe
    d = recipe.to_dict()
    d["model"] = dict(settings["full_model"])
    d["pruning"] = {k: v for k, v in recipe.pruning.items() if k != "full_model"}
    return Recipe(**d, path=recipe.path)


def resolved_architecture(model_block: dict) -> dict:
    """widths / groups / pools / strides / kernels / shuffle of a recipe ``model`` block,
    with its topology resolved (what :func:`glt_keras.models.glt_net` builds)."""
    from ...models import TOPOLOGIES

    topology = model_block.get("topology", "glt96")
    spec = dict(TOPOLOGIES[topology]) if topology else {}
    for key in _ARCH_KEYS:
        if model_block.get(key) is not None:
            spec[key] = model_block[key]
    widths = [int(w) for w in spec.get("widths", ())]
    n = len(widths)
    return {
        "widths": widths,
        "groups": [int(v) for v in spec.get("groups", [1] * n)],
        "pools": [bool(v) for v in spec.get("pools", [False] * n)],
        "strides": [int(v) for v in spec.get("strides", [1] * n)],
        "kernels": [int(v) for v in spec.get("kernels", [int(model_block.get("kernel_size", 3))] * n)],
        "shuffle": bool(spec.get("shuffle")),
    }


def shrunk_recipe(recipe, widths, *, reproducible: bool = True):
    """The recipe of the physically shrunk network: ``model`` gives the new ``widths``
    explicitly (topology resolved into explicit groups / pools / strides / kernels /
    shuffle, so later changes to a named topology cannot change it), everything else as
    in ``recipe``.

    ``recipe``: the recipe trained with pruning (full-width ``model``). With
    ``reproducible=True`` (default) the pruning block stays, plus
    ``pruning.full_model`` = the full-width ``model`` block: ``Recipe.build_model()`` and
    the zoo build the shrunk network, while :func:`glt_keras.training.run.train`
    trains the full-width one with pruning again (so ``glt-keras train <name>``
    still reproduces the published weights). ``reproducible=False`` drops pruning.

    Example:
        >>> small = shrunk_recipe(recipe, [64, 96, 128])  # doctest: +SKIP
        >>> small.build_model().count_params() < recipe.build_model().count_params()  # doctest: +SKIP
        True
    """
    from ...recipe import Recipe

    recipe = training_recipe(recipe)
    arch = resolved_architecture(recipe.model)
    widths = [int(w) for w in widths]
    if len(widths) != len(arch["widths"]):
        raise ValueError(f"{len(widths)} widths given for a network of {len(arch['widths'])} blocks.")
    model = {k: v for k, v in recipe.model.items() if k not in _ARCH_KEYS and k != "kernel_size"}
    model.update(topology=None, **{**arch, "widths": widths})
    d = recipe.to_dict()
    d["model"] = model
    changed = [f"block{i + 1} {a}->{b}" for i, (a, b) in enumerate(zip(arch["widths"], widths)) if a != b]
    note = f"Shrunk by structured block pruning: {', '.join(changed) or 'no width changed'}."
    if recipe.pruning and reproducible:
        settings = {k: v for k, v in recipe.pruning.items() if k != "full_model"}
        d["pruning"] = {**settings, "full_model": copy_model_block(recipe.model)}
        note += " `pruning.full_model` is the full-width network it was fine-tuned and pruned from."
    else:
        d["pruning"] = None
    kept = [line for line in (recipe.description or "").rstrip().splitlines()
            if not line.startswith("Shrunk by structured block pruning")]
    d["description"] = "\n".join(kept + [note]) if kept else note
    return Recipe(**d, path=None)


def copy_model_block(block: dict) -> dict:
    """A YAML-safe deep copy of a ``model`` block (tuples -> lists)."""
    import copy as _copy

    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, np.generic):
            return v.item()
        return v

    return plain(_copy.deepcopy(block))



def _model_widths(model, n_blocks: int) -> list[int]:
    return [int(model.get_layer(f"block{i + 1}_conv").filters) for i in range(n_blocks)]


def export_shrunk(recipe, masked_model, run_dir, *, check_inputs=None, source="", verbose=1) -> dict:
    """Shrink a trained masked model and write the run's shrunk artifacts.

    Writes into ``run_dir``: ``shrunk_weights.h5`` (the shrunk network's weights),
    ``shrunk_recipe.yaml`` (:func:`shrunk_recipe`), ``shrunk_model.json``
    (``{"widths", "report", "source", "max_abs_difference"}``: the
    :func:`pruning_report` without markdown, the weights shrunk and the largest output
    difference masked vs. shrunk on ``check_inputs``), and ``shrunk/``, a folder that
    ``glt-keras zoo publish`` accepts (``recipe.yaml`` = the shrunk recipe,
    ``best_weights.h5`` = the shrunk weights, copies of the run's logs and plots).
    Prints the markdown report. Returns the ``shrunk_model.json`` dict.
    """
    import json
    import shutil
    from pathlib import Path

    import yaml

    from ..._io import atomic_write
    from ...models import save_weights

    run_dir = Path(run_dir)
    recipe = training_recipe(recipe)
    n_blocks = len(resolved_architecture(recipe.model)["widths"])
    small = shrink(masked_model)
    widths = _model_widths(small, n_blocks)
    new_recipe = shrunk_recipe(recipe, widths)
    # Rebuild from the recipe (what the zoo will do) and move the weights in: this fails
    # loudly if the recipe does not describe the shrunk network.
    rebuilt = new_recipe.build_model(classifier_activation=None)
    rebuilt.set_weights(small.get_weights())
    difference = None
    if check_inputs is not None:
        x = tf.convert_to_tensor(check_inputs)
        difference = float(
            np.abs(rebuilt(x, training=False).numpy() - masked_model(x, training=False).numpy()).max()
        )
    report = pruning_report(masked_model, rebuilt)
    if verbose:
        print(f"Pruned {recipe.name}: widths {resolved_architecture(recipe.model)['widths']} -> {widths}")
        print(report["markdown"])
        if difference is not None:
            print(f"largest output difference masked vs. shrunk: {difference:.2e}")
    info = {
        "widths": widths,
        "report": {k: v for k, v in report.items() if k != "markdown"},
        "source": source,
        "max_abs_difference": difference,
    }
    info["report"]["widths"] = {k: list(v) for k, v in info["report"]["widths"].items()}

    recipe_text = yaml.safe_dump(new_recipe.to_dict(), sort_keys=False)
    save_weights(rebuilt, run_dir / "shrunk_weights.h5")
    atomic_write(run_dir / "shrunk_recipe.yaml", recipe_text)
    publish_dir = run_dir / "shrunk"
    publish_dir.mkdir(exist_ok=True)
    atomic_write(publish_dir / "recipe.yaml", recipe_text)
    shutil.copyfile(run_dir / "shrunk_weights.h5", publish_dir / "best_weights.h5")
    for name in ("history.csv", "summary.json", "curves.png", "pruning.png", "thresholds.png", "thresholds.json"):
        if (run_dir / name).exists():
            shutil.copyfile(run_dir / name, publish_dir / name)
    atomic_write(run_dir / "shrunk_model.json", json.dumps(info, indent=2))
    return info

