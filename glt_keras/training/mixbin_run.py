"""Train and evaluate a MixBin selection: the recipe-level glue above :mod:`.run` (training)
and :mod:`.mixbin` (choosing the layers). Nothing below imports it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import tensorflow as tf

from .. import models
from ..data.augment import random_subset
from ..recipe import ZOO_DIR, Recipe
from .checkpoints import resolve_init_weights
from .evaluation import evaluate
from .mixbin.costs import _as_recipe, cost_summary
from .mixbin.int8 import int8_real_export
from .mixbin.selection import Selection, _json_safe
from .mixbin.variants import variant_name, variant_recipe
from .run import train
from .splits import load_splits


def evaluate_variant(recipe: Recipe, run_dir, *, images=None, convert: bool = True, verify_images: int = 8,
                     int8: bool = True, calibration=None, data_dir=None, subset: Optional[int] = None) -> dict:
    """Held-out accuracy of a trained variant's best weights, its .tflite bytes and op census.

    ``model.tflite``: real layers in float32, verified against Keras (``verification``).
    With ``int8`` and real layers, also ``model_int8.tflite`` (:func:`int8_real_export`,
    ranges calibrated on ``calibration`` images, default 256 training images): its bytes,
    its accuracy in the LCE interpreter and its top-1 agreement with the float Keras model.
    """
    from ..convert import to_tflite
    from ..convert.verify import VerificationError

    run_dir = Path(run_dir)
    model = recipe.build_model(classifier_activation=None)
    models.load_weights(model, run_dir / "best_weights.h5")
    real_layers = recipe.model.get("real_layers") or ()
    splits = None
    if images is None or (convert and int8 and real_layers and calibration is None):
        splits = load_splits(recipe, data_dir=data_dir, subset=subset)
    if images is None:
        images = splits.test if splits.test is not None else splits.val
    x, y = images
    result = {"eval_images": int(len(y))}
    metrics = evaluate(model, x, y, class_names=recipe.classes, image_size=recipe.input_shape[:2])
    result.update(accuracy=metrics["accuracy"], loss=metrics["loss"])
    result.update(cost_summary(model, real_layers))
    if not convert:
        return result
    size = tuple(recipe.input_shape[:2])

    def at_size(a):
        a = np.asarray(a)
        return a.astype(np.float32) if tuple(a.shape[1:3]) == size else tf.image.resize(a, size).numpy()

    pixels = at_size(x[:verify_images])
    try:
        conv = to_tflite(model, run_dir / "model.tflite", verify=True, verify_images=pixels)
        result["verification"] = conv.verification.message
    except VerificationError as err:
        conv = err.conversion
        result["verification"] = f"FAILED: {err}"
    report = conv.report
    result.update(tflite_bytes=report.flatbuffer_bytes, lce_bconv2d=report.binary_convs,
                  float_convs=[c.layer or c.op for c in report.float_convs], op_counts=dict(report.op_counts))
    if int8:
        if not real_layers:  # nothing to quantize: the same flatbuffer
            result.update(int8_tflite_bytes=report.flatbuffer_bytes, int8_accuracy=result["accuracy"],
                          int8_agreement=1.0)
            return result
        if calibration is None:
            calibration = random_subset(256, splits.train[0])
        exported = int8_real_export(model, at_size(calibration))
        fb = to_tflite(exported, run_dir / "model_int8.tflite", verify=False).flatbuffer
        xs = at_size(x)
        keras_top = _predict_top1(model, xs)
        from ..convert.verify import lce_interpreter, run_interpreter

        interpreter = lce_interpreter(fb)
        top = np.concatenate([run_interpreter(interpreter, xs[i:i + 64])[0].reshape(len(xs[i:i + 64]), -1).argmax(-1)
                              for i in range(0, len(xs), 64)])
        result.update(int8_tflite_bytes=len(fb), int8_accuracy=float((top == np.asarray(y)).mean()),
                      int8_agreement=float((top == keras_top).mean()))
    return result


def _predict_top1(model, images, batch_size: int = 128) -> np.ndarray:
    return np.concatenate([np.asarray(model(images[i:i + batch_size], training=False)).argmax(-1)
                           for i in range(0, len(images), batch_size)])


def train_selection(recipe, selection, *, out_dir, epochs: Optional[int] = None, subset: Optional[int] = None,
                    steps_per_epoch: Optional[int] = None, teacher=None, data_dir=None, convert: bool = True,
                    verify_images: int = 8, resume: bool = False, verbose: int = 0, name: Optional[str] = None,
                    eval_images=None, int8: bool = True, calibration=None, init_weights=None,
                    training: Optional[dict] = None) -> dict:
    """Train the recipe with the selection's real layers; evaluate, convert, and summarise.

    ``teacher``: a run folder with ``best_weights.h5`` of the real-valued twin, or a Keras
    model (logits), for knowledge distillation with the recipe's ``kd`` settings.
    ``init_weights``: the trained fully binary network (file or run folder) to fine-tune
    from instead of training from scratch (recipe keys ``training.init_weights`` and
    ``training.real_from_binary``: ``train`` starts the real layers with
    :func:`binary_start`, BatchNorms re-estimated on 256 training images), so that the run's
    ``recipe.yaml`` reproduces it; ``training``: overrides of the recipe's training settings
    (for example a fine-tuning learning rate).
    ``eval_images``: ``(x, y)`` for the accuracy (default the recipe's test split, else
    validation); ``int8`` / ``calibration``: see :func:`evaluate_variant`. Writes
    ``mixbin.json`` into ``out_dir`` and returns the same dict.
    """
    recipe = _as_recipe(recipe)
    layers = selection.layers if isinstance(selection, Selection) else list(selection)
    if name is None:
        name = variant_name(recipe, selection) if isinstance(selection, Selection) else recipe.name
    variant = variant_recipe(recipe, layers, name=name)
    if training:
        variant = variant.with_changes(training=dict(training))
    if init_weights is not None:  # train() builds the start (binary_start) on 256 training images
        path = resolve_init_weights(init_weights, key="init_weights").resolve()
        root = ZOO_DIR.parent.resolve()  # recipes name project files relative to the root
        variant = variant.with_changes(training={
            "init_weights": str(path.relative_to(root) if path.is_relative_to(root) else path),
            "real_from_binary": True})
    teacher_model = None
    if isinstance(teacher, tf.keras.Model):
        teacher_model = teacher
    elif teacher is not None:
        variant = variant.with_changes(kd={"teacher": str(teacher)})
    summary = train(variant, out_dir=out_dir, epochs=epochs, subset=subset, steps_per_epoch=steps_per_epoch,
                    teacher_model=teacher_model, data_dir=data_dir, resume=resume, verbose=verbose)
    result = {"name": name, "real_layers": list(layers), "run_dir": str(out_dir),
              "init_weights": None if init_weights is None else str(init_weights),
              "best_val_accuracy": summary.get("best_val_accuracy", summary.get("best_accuracy")),
              "train_seconds": summary.get("train_seconds"), "epochs": summary.get("epochs")}
    result.update(evaluate_variant(variant, out_dir, images=eval_images, convert=convert,
                                   verify_images=verify_images, int8=int8, calibration=calibration,
                                   data_dir=data_dir, subset=subset))
    if isinstance(selection, Selection):
        result["selection"] = selection.to_dict()
    Path(out_dir, "mixbin.json").write_text(json.dumps(_json_safe(result), indent=2))
    return result
