"""Training: recipe -> trained (and optionally pruned or partially binarized) network.

The public API, importable from here (``from glt_keras.training import train, Distiller``):

- ``train``, ``load_teacher``: fit a recipe into a run folder (:mod:`.run`);
- ``evaluate``: accuracy, mean per-class accuracy, confusion matrix (:mod:`.evaluation`);
- ``load_splits``, ``extra_eval_sets``: a recipe's data as uint8 arrays (:mod:`.splits`);
- ``Distiller``, ``TargetDistiller``, ``load_teachers``: knowledge distillation
  (:mod:`.distill`, :mod:`.teachers`); ``ensure_view_cache``: teacher files' outputs on fixed
  augmented views, computed once (:mod:`.view_cache`);
- ``BlockPruning``, ``block_structure``, ``shrink``, ``pruning_report``: structured block
  pruning (:mod:`.pruning`);
- ``select_layers``, ``Selection``, ``budget_cost``, ``int8_real_export``,
  ``train_selection``: budget-aware partial binarization (:mod:`.mixbin`, :mod:`.mixbin_run`);

and the rest of ``__all__``.

One module per concept; data flows one way (each line imports only from lines above it):

- :mod:`.splits` (recipe sources -> arrays), :mod:`.schedule` (learning rate, optimizer),
  :mod:`.checkpoints`, :mod:`.weight_average`, :mod:`.history` (history.csv, summary, plots), :mod:`.evaluation`,
  :mod:`.distill`, :mod:`.teachers`, :mod:`.view_cache`;
- :mod:`.pruning` (structure, scores, schedule, shrinking, recipes) and :mod:`.mixbin`
  (costs, selection, surgery, search, int8, variants);
- :mod:`.run`: ``train()``, the fit-loop glue;
- :mod:`.mixbin_run`: train and evaluate a MixBin selection; :mod:`.cli`,
  :mod:`.mixbin_cli`, :mod:`.teachers_cli`: the command line.

The names are resolved on first use, so that importing this package (as the command line
does to register its subcommands) does not load TensorFlow.
"""
from __future__ import annotations

import importlib

#: public name -> the module that defines it
_EXPORTS = {
    # run folder and fit loop
    "train": "run",
    "load_teacher": "run",
    "get_strategy": "run",
    "RUN_FILES": "run",
    "CheckpointError": "checkpoints",
    "resolve_init_weights": "checkpoints",
    "RunLogger": "history",
    "WarmupCosine": "schedule",
    "WeightAverage": "weight_average",
    "make_optimizer": "schedule",
    # data and evaluation
    "Splits": "splits",
    "UNLABELED": "splits",
    "load_splits": "splits",
    "extra_eval_sets": "splits",
    "make_train_dataset": "splits",
    "make_eval_dataset": "splits",
    "evaluate": "evaluation",
    "confusion_markdown": "evaluation",
    # knowledge distillation
    "Distiller": "distill",
    "TargetDistiller": "distill",
    "distillation_loss": "distill",
    "soft_target_loss": "distill",
    "FileTeacher": "teachers",
    "TeacherEnsemble": "teachers",
    "TeacherError": "teachers",
    "load_teachers": "teachers",
    "ViewCache": "view_cache",
    "ensure_view_cache": "view_cache",
    # structured block pruning
    "BlockPruning": "pruning",
    "BlockStructure": "pruning",
    "block_structure": "pruning",
    "select_masks": "pruning",
    "masks_from_model": "pruning",
    "apply_masks": "pruning",
    "shrink": "pruning",
    "pruning_report": "pruning",
    "pruning_settings": "pruning",
    "shrunk_recipe": "pruning",
    "export_shrunk": "pruning",
    # MixBin partial binarization
    "Selection": "mixbin",
    "candidates": "mixbin",
    "budget_cost": "mixbin",
    "cost_summary": "mixbin",
    "select_layers": "mixbin",
    "select_from_scores": "mixbin",
    "with_real_layers": "mixbin",
    "int8_real_export": "mixbin",
    "variant_recipe": "mixbin",
    "binary_start": "mixbin",
    "train_selection": "mixbin_run",
    "evaluate_variant": "mixbin_run",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:  # a submodule (``from glt_keras.training import run``) is imported by Python itself
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
