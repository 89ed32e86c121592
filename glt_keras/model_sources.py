"""The MODEL argument of ``glt-keras eval``, ``convert`` and ``export-c``: one resolver for all three.

MODEL is any of:

- a saved model file: ``.h5`` / ``.hdf5`` / ``.keras``, a SavedModel folder, or (for ``eval``,
  which runs it in LCE's interpreter) a ``.tflite``;
- a run folder written by ``glt-keras train`` (its ``recipe.yaml`` and ``best_weights.h5``), so a
  model trained on your own images converts and exports without a saved-model step;
- a recipe file (``.yaml``) with ``weights`` naming the weight file;
- a zoo name (its published weights, or the weight file ``weights`` names).

Example:
    >>> model, recipe = load_model("runs/my_images")  # doctest: +SKIP
    >>> model, recipe = load_model("examples/my_images.yaml", weights="my_weights.h5")  # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path


def is_model_file(path) -> bool:
    """A saved model (Keras file, SavedModel folder or ``.tflite``) rather than a recipe, run or name."""
    from .convert.tflite import KERAS_MODEL_SUFFIXES

    path = Path(path)
    return path.suffix.lower() in (".tflite",) + KERAS_MODEL_SUFFIXES or (path / "saved_model.pb").exists()


def is_run_folder(path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "recipe.yaml").exists()


def load_model(source, *, weights=None, tflite: bool = False):
    """``source`` (see the module docstring) -> ``(model, recipe)``; ``recipe`` is ``None`` for a
    model file. ``tflite``: accept a ``.tflite`` (returned as a
    :class:`glt_keras.convert.verify.TFLiteModel`). Raises ``FileNotFoundError`` / ``ValueError``
    with one line naming what is missing or wrong."""
    from .recipe import load_recipe

    text = str(source)
    path = Path(text)
    if is_model_file(path):
        if weights:
            raise ValueError(f"--weights applies to a zoo name, recipe or run folder, not to the model file {path}.")
        if not path.exists():
            raise FileNotFoundError(f"No such model file: {path}")
        if path.suffix.lower() == ".tflite":
            if not tflite:
                raise ValueError(f"{path} is already a .tflite flatbuffer; give the Keras model, recipe or run folder.")
            from .convert.verify import TFLiteModel

            return TFLiteModel(path), None
        from .convert.tflite import load_keras_model

        try:
            return load_keras_model(path), None
        except ValueError as err:
            raise ValueError(f"{err} (a weights file? give the recipe or run folder as MODEL and the file "
                             "with --weights)") from err
    if is_run_folder(path):
        recipe = load_recipe(path / "recipe.yaml")
        weights = weights or path / "best_weights.h5"
        if not Path(weights).exists():
            raise FileNotFoundError(f"{path} has no {Path(weights).name} yet (its run has not finished an epoch); "
                                    "pass --weights FILE.")
    elif path.is_dir():
        raise FileNotFoundError(f"{path} is a folder without recipe.yaml: not a run folder of glt-keras train "
                                "nor a SavedModel.")
    elif not path.exists() and ("/" in text or path.suffix):
        raise FileNotFoundError(f"No such model file, run folder or recipe: {path}")
    else:
        try:
            from . import zoo

            if weights is None and text in zoo.list_models():
                return zoo.load(text), zoo.get_recipe(text)
        except ImportError:
            pass
        recipe = load_recipe(text)
    if weights is None:
        raise FileNotFoundError(f"No weights for {text}: pass --weights FILE.")
    from .models import load_weights

    model = recipe.build_model()
    load_weights(model, weights)
    return model, recipe
