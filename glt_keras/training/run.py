"""Fit-loop glue: recipe -> data -> model -> optimizer -> callbacks -> checkpoints -> logs.

A run folder holds everything of one training run::

    run_dir/
      recipe.yaml            the recipe as run (with CLI overrides)
      checkpoints/last.json  pointer to the last complete epoch checkpoint
      checkpoints/epoch_K/   model + optimizer state after epoch K (written atomically)
      best_weights.h5        best weights on the validation split (the weight average's, with
                             training.ema_momentum)
      history.csv            one row per epoch, no gaps across resumes
      thresholds.json        the thermometer's thresholds after every epoch
      tensorboard/           TensorBoard logs
      curves.png, thermometer.png, thresholds.png, pruning.png   plots
      summary.json           wall time, epochs, throughput, best validation metrics

    with a ``pruning:`` block in the recipe (see :mod:`glt_keras.training.pruning`), also:
      shrunk_weights.h5      the physically shrunk network (from best_weights.h5)
      shrunk_recipe.yaml     its recipe (explicit shrunk widths; pruning.full_model = the
                             full-width network trained here)
      shrunk_model.json      {"widths", "report" (before / after sizes), ...}
      shrunk/                recipe.yaml + best_weights.h5 of the shrunk network, logs:
                             ``glt-keras zoo publish runs/<name>/shrunk``
    (best_weights.h5 stays the masked full-width network: ``glt-keras eval run_dir`` works.)
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

import tensorflow as tf
import yaml

from .._io import atomic_write
from ..data.augment import random_subset
from ..models import load_weights
from ..recipe import Recipe, load_recipe
from .checkpoints import (CheckpointError, EpochCheckpoint, _check_best_weights, checkpoint_candidates,
                          resolve_init_weights, restore_checkpoint)
from . import precision as precision_lib
from . import pruning as pruning_lib
from .history import RunLogger, _thermometer, extend_schedule
from .mixbin.variants import binary_start
from .schedule import make_optimizer
from .splits import UNLABELED, Splits, load_splits, make_eval_dataset, make_train_dataset
from .pauses import PauseClock
from .weight_average import WeightAverage, WeightAverageCallback, check_resumable

# Moved to their own modules; still importable from here as before.
from .evaluation import confusion_markdown, evaluate
from .splits import extra_eval_sets

__all__ = ["CheckpointError", "RUN_FILES", "Splits", "confusion_markdown", "evaluate", "extra_eval_sets",
           "get_strategy", "load_splits", "load_teacher", "make_eval_dataset", "make_train_dataset", "train"]


#: What a run leaves in its folder: a fresh start there needs ``overwrite=True``.
RUN_FILES = ("checkpoints", "history.csv", "best_weights.h5", "summary.json", "thresholds.json")


def get_strategy(name: str | None):
    """``None``/``default``, ``mirrored`` (all local devices) or ``multiworker`` (TF_CONFIG)."""
    if name in (None, "", "default"):
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("--strategy multiworker needs the TF_CONFIG environment variable.")
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"Unknown strategy {name!r}: use default, mirrored or multiworker.")


# ----------------------------------------------------------------------------- training
def _compile(model, optimizer, recipe: Recipe, teacher=None, *, targets_from_data=False):
    smoothing = recipe.training.get("label_smoothing", 0.0)
    if targets_from_data:
        from .distill import TargetDistiller

        distiller = TargetDistiller(model, alpha=recipe.kd["alpha"], temperature=recipe.kd["temperature"])
        distiller.compile(optimizer=optimizer, metrics=[tf.keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
        return distiller
    if teacher is not None:
        from .distill import Distiller

        distiller = Distiller(model, teacher, alpha=recipe.kd["alpha"], temperature=recipe.kd["temperature"])
        distiller.compile(optimizer=optimizer, metrics=[tf.keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
        return distiller
    if smoothing:
        def loss(y_true, y_pred):
            onehot = tf.one_hot(tf.cast(tf.reshape(y_true, [-1]), tf.int32), recipe.model["num_classes"])
            return tf.keras.losses.categorical_crossentropy(onehot, y_pred, from_logits=True,
                                                            label_smoothing=smoothing)
    else:
        loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=optimizer, loss=loss,
                  metrics=[tf.keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    return model


def train(
    recipe: Recipe | str,
    *,
    out_dir=None,
    epochs: int | None = None,
    batch_size: int | None = None,
    precision: str | None = None,
    resume: bool = False,
    data_dir=None,
    strategy: str | None = None,
    subset: int | None = None,
    steps_per_epoch: int | None = None,
    teacher_model=None,
    callbacks=(),
    verbose: int = 1,
    overwrite: bool = False,
    view_cache_dir=None,
) -> dict:
    """Train a recipe; returns the run summary. See the module docstring for the run folder.

    ``resume=True`` continues from the last intact epoch checkpoint with optimizer
    state (in an empty folder it starts the run); a finished run resumed does nothing. A
    folder that holds a run's files but no readable checkpoint is refused, as is a fresh
    start into a folder holding a run unless ``overwrite=True`` (which deletes that run's
    checkpoints, history and best weights first). ``subset`` / ``steps_per_epoch`` make
    quick runs for tests and smoke checks. ``view_cache_dir``: the folder of the teacher view
    cache (``kd.view_cache``; default :func:`~glt_keras.training.view_cache.default_cache_dir`).
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    # A shrunk recipe (pruning.full_model) trains its full-width network with pruning.
    recipe = pruning_lib.training_recipe(recipe)
    prune = pruning_lib.pruning_settings(recipe)
    if epochs is not None:
        recipe = recipe.with_changes(training={"epochs": int(epochs)})
    if batch_size is not None:
        recipe = recipe.with_changes(training={"batch_size": int(batch_size)})
    if precision is not None:  # training.precision: float32, mixed_bfloat16 or auto
        recipe = recipe.with_changes(training={"precision": precision})
    cfg = recipe.training
    run_dir = Path(out_dir or Path("runs") / recipe.name)
    ckpt_dir = run_dir / "checkpoints"
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"run folder {run_dir} is a file; choose another --out.")
    previous = [n for n in RUN_FILES if (run_dir / n).exists()]
    if previous and not resume and not overwrite:
        raise FileExistsError(
            f"{run_dir} already holds a run ({', '.join(previous)}); pass --resume to continue it, "
            "--overwrite to delete it and start again, or choose another --out."
        )
    if previous and resume and not checkpoint_candidates(ckpt_dir):
        raise CheckpointError(
            f"cannot resume {run_dir}: {ckpt_dir / 'last.json'} is missing and no epoch checkpoint "
            f"remains, but the folder holds a run ({', '.join(previous)}); nothing was changed. "
            "Pass --overwrite without --resume to start it again from scratch."
        )
    if previous and overwrite and not resume:
        for name in RUN_FILES:
            target = run_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    resuming = resume and bool(checkpoint_candidates(ckpt_dir))
    if resuming and cfg.get("ema_momentum"):  # before any output: the run folder stays as it was
        check_resumable(checkpoint_candidates(ckpt_dir)[0][1], recipe.name)
    init_weights = None
    if not resuming:  # resolved before any output, so a missing file fails at once
        if prune and prune.get("init_weights"):
            init_weights = resolve_init_weights(prune["init_weights"])
        elif cfg.get("init_weights"):
            init_weights = resolve_init_weights(cfg["init_weights"], key="training.init_weights")
    teachers = None
    if recipe.kd.get("teachers"):  # checked before any output: a bad file fails at once
        if recipe.kd.get("teacher") or teacher_model is not None:
            raise ValueError(f"recipe {recipe.name}: kd.teacher and kd.teachers both set; choose one.")
        from .teachers import recipe_teachers

        teachers = recipe_teachers(recipe)
        if verbose:
            print(f"{recipe.name}: teachers {teachers}.")
    if recipe.kd.get("teacher") not in (None, "twin") and teacher_model is None:
        teacher_source(recipe)  # checked before any output: a missing or unfit teacher fails at once
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))

    tf.keras.utils.set_random_seed(cfg["seed"])
    splits = load_splits(recipe, data_dir=data_dir, subset=subset)
    strategy_obj = get_strategy(strategy)
    global_batch = cfg["batch_size"]
    if len(splits.train[1]) < global_batch:
        raise ValueError(
            f"recipe {recipe.name}: the training set has {len(splits.train[1])} images, fewer than "
            f"one batch of {global_batch}; lower --batch-size or add data."
        )
    unlabeled = int((splits.train[1] == UNLABELED).sum())
    if unlabeled and teachers is None:
        raise ValueError(f"recipe {recipe.name}: {unlabeled} training images have labels: teacher, "
                         "but kd.teachers names no teacher.")
    balance_by = None
    if recipe.data.get("balance") == "teacher":
        if teachers is None:
            raise ValueError(f"recipe {recipe.name}: data.balance: teacher needs kd.teachers.")
        from .teachers import sampling_classes
        from .view_cache import default_cache_dir

        balance_by = sampling_classes(*splits.train, teachers, cache=run_dir / "teacher_classes.npz",
                                      shared_dir=view_cache_dir or default_cache_dir(), verbose=verbose)
    elif unlabeled and recipe.data.get("balance"):
        raise ValueError(f"recipe {recipe.name}: data.balance: true samples by hard label, and {unlabeled} "
                         "training images are labelled by the teachers only; use balance: teacher.")
    view_cache = None
    if teachers is not None and recipe.kd.get("view_cache"):  # fixed views, labelled once (filled if missing)
        from .view_cache import cost as view_cache_cost, ensure_view_cache

        view_cache = ensure_view_cache(recipe, splits.train[0], teachers, cache_dir=view_cache_dir, verbose=verbose)
    train_ds = make_train_dataset(recipe, *splits.train, batch_size=global_batch, balance_by=balance_by,
                                  view_targets=view_cache.probs if view_cache is not None else None)
    if teachers is not None and view_cache is None:
        from .teachers import with_teacher_targets

        train_ds = with_teacher_targets(train_ds, teachers)
    # data.epoch_images: a shorter "epoch" than one pass (checkpoints and validation
    # more often on big sets; a defined length for class-balanced sampling).
    epoch_images = recipe.data.get("epoch_images") or len(splits.train[1])
    n_steps = steps_per_epoch or max(1, int(epoch_images) // global_batch)
    val_ds = make_eval_dataset(recipe, *splits.val) if splits.val is not None else None
    real_layers = recipe.model.get("real_layers") or []
    if init_weights is not None and cfg.get("real_from_binary") and real_layers:
        # init_weights is the fully binary network: its real layers start as the binary convs they replace.
        init_weights = binary_start(recipe, real_layers, init_weights, run_dir / "start_weights.h5",
                                    calibration=random_subset(256, splits.train[0], seed=cfg["seed"]))

    # training.precision: the training model computes in bfloat16 where asked (or, with
    # auto, where the CPU is fast at it); variables, checkpoints and weights stay float32.
    with strategy_obj.scope(), precision_lib.policy(cfg.get("precision")) as compute:
        if verbose and compute != "float32":
            print(f"{recipe.name}: training under the Keras {compute} policy (float32 variables).")
        model = recipe.build_model(classifier_activation=None)
        if init_weights is not None:
            load_weights(model, init_weights)
            if verbose:
                print(f"{recipe.name}: fine-tuning from {init_weights}.")
        thermometer = _thermometer(model)
        if (thermometer is not None and cfg.get("threshold_init") == "quantiles" and not resuming
                and init_weights is None):
            thermometer.init_from_data(random_subset(2000, splits.train[0], seed=cfg["seed"]))
        optimizer = make_optimizer(cfg, n_steps, cfg["epochs"], model)
        teacher = teacher_model
        if teacher is None and recipe.kd.get("teacher"):
            teacher = load_teacher(recipe, data_dir=data_dir, verbose=verbose, subset=subset,
                                   steps_per_epoch=steps_per_epoch, run_root=run_dir.parent)
        trainer = _compile(model, optimizer, recipe, teacher, targets_from_data=teachers is not None)
        epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        # training.ema_momentum: the weight average is the run's network (validated, selected, saved).
        average = WeightAverage(model, momentum=cfg["ema_momentum"]) if cfg.get("ema_momentum") else None
        checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=epoch_var,
                                         **({"weight_average": average.state} if average else {}))

    start_epoch = 0
    if resuming:
        # Create optimizer slots first so that every saved value has a home.
        start_epoch = restore_checkpoint(ckpt_dir, checkpoint)
        if verbose:
            print(f"Resuming {recipe.name} from epoch {start_epoch} ({ckpt_dir}).")
    elif resume and verbose:
        print(f"No checkpoint in {ckpt_dir}: starting {recipe.name} from scratch.")
    if start_epoch >= cfg["epochs"]:
        if verbose:
            print(f"{recipe.name}: already trained for {start_epoch} epochs.")
        _check_best_weights(run_dir)
        if prune and not (run_dir / "shrunk_model.json").exists():
            _export_pruned(recipe, model, run_dir, splits, verbose, average)  # killed before the export
        return json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}

    pruning_cb, extra, best_if = None, None, None
    if prune:
        pruning_cb = pruning_lib.pruning_callback(model, prune, n_steps, cfg["epochs"], verbose=verbose)
        if average is not None:  # the averaged network carries the masks in force
            average.constraint = pruning_cb.apply_masks
        extra = lambda: {"pruned_fraction": pruning_cb.pruned_fraction, "pruning_ratio": pruning_cb.ratio}  # noqa: E731
        target = float(prune["target_ratio"])
        # Best weights only once pruning has reached its target (an unpruned epoch would win).
        best_if = lambda row: row.get("pruning_ratio", -1.0) >= target - 1e-6  # noqa: E731
    previous_summary = {}
    if start_epoch > 0 and (run_dir / "summary.json").exists():
        previous_summary = json.loads((run_dir / "summary.json").read_text())
    monitor = "val_accuracy" if val_ds is not None else "accuracy"
    if average is not None and val_ds is not None:
        monitor = "val_accuracy_ema"
    if val_ds is not None and int(cfg.get("select_smoothing", 1)) > 1:
        monitor += "_smooth"
    pauses = PauseClock()
    logger = RunLogger(run_dir, model, start_epoch, monitor=monitor, smoothing=int(cfg.get("select_smoothing", 1)),
                       recipe_name=recipe.name, planned_epochs=cfg["epochs"], images_per_epoch=n_steps * global_batch,
                       extra=extra, best_if=best_if,
                       schedule=extend_schedule(previous_summary, start_epoch, cfg["epochs"]),
                       # A summary without a count comes from a session killed before this fix.
                       sessions=(previous_summary.get("sessions") or int(start_epoch > 0)) + 1,
                       save_best=average.save_weights if average is not None else None,
                       pause_clock=pauses)
    all_callbacks = [
        # Pruning first: its masks are in place before the checkpoint and the logger run.
        *([pruning_cb] if pruning_cb is not None else []),
        # Before the logger, which selects on the average's validation score.
        *([WeightAverageCallback(average, val_ds)] if average is not None else []),
        EpochCheckpoint(ckpt_dir, checkpoint, epoch_var),
        logger,
        tf.keras.callbacks.TensorBoard(str(run_dir / "tensorboard"), profile_batch=0),
        *callbacks,
    ]
    # The logger must see the checkpoint written first: checkpoint, then log.
    t0 = time.time()
    with pauses:  # kill -TSTP pauses the run without charging the pause to its epochs
        trainer.fit(
            train_ds.repeat(),
            epochs=cfg["epochs"],
            initial_epoch=start_epoch,
            steps_per_epoch=n_steps,
            validation_data=val_ds,
            callbacks=all_callbacks,
            verbose=verbose,
        )
    _check_best_weights(run_dir)
    summary = logger.write_summary(
        wall_seconds_this_session=round(time.time() - t0, 1),
        # always written: summary.json keeps an earlier session's keys, which would otherwise outlive it
        paused_seconds_this_session=round(pauses.paused_seconds, 1),
        train_images=int(len(splits.train[1])),
        val_images=int(len(splits.val[1])) if splits.val is not None else 0,
        **({"teacher_view_cache": view_cache_cost(view_cache)} if view_cache is not None else {}),
    )
    if prune:
        _export_pruned(recipe, model, run_dir, splits, verbose, average)
    return summary


def _export_pruned(recipe: Recipe, model, run_dir: Path, splits: Splits, verbose=1, average=None) -> dict:
    """Shrink the best (else the final) masked weights of a pruning run: shrunk_weights.h5,
    shrunk_recipe.yaml, shrunk_model.json and shrunk/ (see the module docstring). ``average``: the
    run's weight average, whose (masked) weights are the run's network."""
    best = run_dir / "best_weights.h5"
    masked = recipe.build_model(classifier_activation=None)
    if best.exists():
        load_weights(masked, best)
        source = "best_weights.h5"
    else:
        if verbose:
            print(f"{recipe.name}: no epoch reached the pruning target with a best score; "
                  "shrinking the final weights.")
        masks = pruning_lib.masks_from_model(model)  # the raw weights carry the masks in force
        with average.applied() if average is not None else contextlib.nullcontext():
            pruning_lib.apply_masks(model, masks)
            masked.set_weights(model.get_weights())
        source = "final weights"
    pair = splits.val if splits.val is not None else splits.train
    check = next(iter(make_eval_dataset(recipe, pair[0][:16], pair[1][:16], batch_size=16)))[0]
    return pruning_lib.export_shrunk(recipe, masked, run_dir, check_inputs=check, source=source,
                                     verbose=verbose)


def load_teacher(recipe: Recipe, *, data_dir=None, verbose=1, subset=None, steps_per_epoch=None, run_root="runs"):
    """The recipe's real-valued teacher (``kd.teacher``), frozen, giving logits; it runs in the
    graph beside the student (:class:`~glt_keras.training.distill.Distiller`), on the same
    augmented batch. ``kd.teacher`` is one of:

    - a run folder (``runs/cifar10_teacher``): the network its ``recipe.yaml`` describes (any
      topology: a ``resnet20`` teacher for a ``glt32`` student) with its ``best_weights.h5``;
    - a weights file ``*.h5`` beside a ``recipe.yaml`` (a zoo folder, or another weights file
      of a run folder);
    - ``"twin"``: train the real-valued twin of the student now (cached as
      ``<run_root>/<recipe>_teacher``, reused by every student of the same recipe name).

    A run folder without ``recipe.yaml`` (older runs) holds the student's twin. A teacher whose
    classes or input shape differ from the student's is a one-line
    :class:`~glt_keras.training.teachers.TeacherError` naming its weights file. Paths are
    relative to the working directory."""
    spec = recipe.kd["teacher"]
    if spec == "twin":  # resumes an unfinished teacher; a finished one returns at once
        teacher_recipe = _twin_recipe(recipe)
        run_dir = Path(run_root) / teacher_recipe.name
        train(teacher_recipe, out_dir=run_dir, data_dir=data_dir, resume=True, verbose=verbose,
              subset=subset, steps_per_epoch=steps_per_epoch)
        weights = run_dir / "best_weights.h5"
    else:
        weights, teacher_recipe = teacher_source(recipe)
    teacher = teacher_recipe.build_model(classifier_activation=None)
    load_weights(teacher, weights)
    teacher.trainable = False
    if verbose and spec != "twin":
        print(f"{recipe.name}: distilling from {teacher.name} ({weights}, {teacher.count_params():,} weights).")
    return teacher


def _twin_recipe(recipe: Recipe) -> Recipe:
    return recipe.with_changes(
        name=f"{recipe.name}_teacher",
        model={"teacher": True},
        kd={"teacher": None},
        training={"epochs": recipe.kd.get("teacher_epochs", 20)},
        pruning=None,
    )


def teacher_source(recipe: Recipe):
    """``(weights file, teacher recipe)`` of a recipe whose ``kd.teacher`` is a run folder or a
    weights file (see :func:`load_teacher`), checked against the student without building
    anything: a missing file is a ``FileNotFoundError``, other classes or another input shape a
    :class:`~glt_keras.training.teachers.TeacherError`, each one line naming the weights file."""
    from .teachers import TeacherError

    path = Path(recipe.kd["teacher"])
    weights = path if path.suffix == ".h5" else path / "best_weights.h5"
    if not weights.exists():
        hint = "" if path.suffix == ".h5" else f" (is {path} a teacher run with a finished epoch?)"
        raise FileNotFoundError(f"kd.teacher: teacher weights {weights} not found{hint}.")
    own = weights.parent / "recipe.yaml"
    teacher_recipe = load_recipe(own) if own.exists() else _twin_recipe(recipe)
    if list(teacher_recipe.classes) != list(recipe.classes):
        raise TeacherError(
            f"kd.teacher {weights}: the teacher has {len(teacher_recipe.classes)} classes "
            f"({', '.join(teacher_recipe.classes)}), the student {recipe.name} has {len(recipe.classes)} "
            f"({', '.join(recipe.classes)}); they must be the same, in the same order.")
    if tuple(teacher_recipe.input_shape) != tuple(recipe.input_shape):
        raise TeacherError(
            f"kd.teacher {weights}: the teacher takes {list(teacher_recipe.input_shape)} images, the "
            f"student {recipe.name} {list(recipe.input_shape)}; distillation feeds both the same batch.")
    return weights, teacher_recipe
