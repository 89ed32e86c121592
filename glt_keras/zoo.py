"""The model zoo: ``list_models()``, ``load(name)``, ``card(name)``.

One registry, ``zoo/registry.json``, lists every published model with its weight file,
SHA-256 and measured metrics; it is written only by ``glt-keras zoo publish`` from a
training run, never by hand. Architecture, classes and input size come from the
model's recipe (``zoo/<name>/recipe.yaml``), the one definition of those facts.
Loading a model needs neither the network nor the training code.
"""
from __future__ import annotations

import json
from pathlib import Path

from ._io import sha256_of  # noqa: F401  (zoo.sha256_of: the registry's checksums)
from .recipe import ZOO_DIR, Recipe, load_recipe

REGISTRY_PATH = ZOO_DIR / "registry.json"


class WeightsError(ValueError):
    """A weight file is missing, corrupt, or does not fit the architecture."""


def registry() -> dict:
    """The published models: name -> {weights, sha256, metrics, ...}."""
    if not REGISTRY_PATH.exists():
        return {}
    try:
        return json.loads(REGISTRY_PATH.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"Zoo registry {REGISTRY_PATH} is not valid JSON: {err}") from err


def list_models(*, pretrained: bool = False) -> list[str]:
    """Every zoo model (a recipe under ``zoo/``); ``pretrained=True``: only those with weights."""
    names = sorted(p.parent.name for p in ZOO_DIR.glob("*/recipe.yaml"))
    if pretrained:
        published = registry()
        names = [n for n in names if n in published]
    return names


def get_recipe(name: str) -> Recipe:
    if name not in list_models():
        raise ValueError(f"Unknown zoo model {name!r}. Available: {', '.join(list_models())}.")
    return load_recipe(name)


def publish_commands(name: str) -> str:
    """The commands that train ``name`` and publish it: a pruning recipe publishes the shrunk
    network its run writes, and the zoo recipe becomes the shrunk one."""
    if get_recipe(name).pruning:
        return (f"glt-keras train {name} && cp runs/{name}/shrunk_recipe.yaml zoo/{name}/recipe.yaml"
                f" && glt-keras zoo publish runs/{name}/shrunk")
    return f"glt-keras train {name} && glt-keras zoo publish runs/{name}"


def pretrained_weights(name: str) -> Path:
    """Path of a model's published weights, after checking that they exist and their SHA-256."""
    entry = registry().get(name)
    if entry is None:
        raise WeightsError(
            f"{name} has no trained weights yet. Train and publish them with:\n  {publish_commands(name)}")
    path = ZOO_DIR / entry["weights"]
    if not path.exists():
        raise WeightsError(f"{name}: weight file {path} is missing (the registry lists it).")
    actual = sha256_of(path)
    if actual != entry["sha256"]:
        raise WeightsError(
            f"{name}: weight file {path} is corrupt or was changed: SHA-256 {actual} does not "
            f"match the registry's {entry['sha256']}."
        )
    return path


def load(
    name: str,
    *,
    weights="pretrained",
    include_top: bool = True,
    num_classes: int | None = None,
    input_shape=None,
    classifier_activation="softmax",
    split_groups: bool = False,
):
    """A zoo model taking raw RGB pixels in [0, 255] (NHWC), one score per class out.

    The model comes in its export form (native grouped convolutions), so the plain
    ``larq_compute_engine.convert_keras_model(load(name))`` gives a fully binary flatbuffer
    (every convolution ``LceBconv2d``). Its grouped binary convolutions run in LCE's
    interpreter only with ``use_indirect_bgemm=True``.

    Args:
        name: a name from :func:`list_models`.
        weights: ``"pretrained"`` (the published, checksum-verified weights), ``None``
            (random initialisation) or a path to a weight file.
        include_top: without the head, the model ends at the last block's feature map.
        num_classes: a new head of that size (its weights are not loaded); for fine-tuning.
        input_shape: another ``(H, W, 3)`` input size (the network is fully convolutional).
        classifier_activation: ``"softmax"`` or ``None`` for logits.
        split_groups: ``True`` gives the training form instead (grouped convolutions as
            per-group convolutions, same weights and outputs, ~13x faster to train on CPU):
            use it to fine-tune; convert the native form.

    Example:
        >>> model = load("vww_binary")  # doctest: +SKIP
        >>> model.predict(pixels_uint8)  # [non_person, person] probabilities  # doctest: +SKIP
    """
    recipe = get_recipe(name)
    overrides = {"include_top": include_top, "classifier_activation": classifier_activation,
                 "split_groups": bool(split_groups)}
    if input_shape is not None:
        overrides["input_shape"] = tuple(input_shape)
    new_head = num_classes is not None and num_classes != recipe.model["num_classes"]
    if num_classes is not None:
        overrides["num_classes"] = int(num_classes)
    model = recipe.build_model(**overrides)
    if weights is None:
        return model
    path = pretrained_weights(name) if weights == "pretrained" else Path(weights)
    if not path.exists():
        raise WeightsError(f"Weight file {path} does not exist.")
    from .models import load_weights

    try:
        load_weights(model, path, by_name=new_head or not include_top)
    except ValueError as err:
        raise WeightsError(str(err)) from err
    return model


def card(name: str) -> dict:
    """The model card: ``{"name", "recipe", "registry", "markdown"}``."""
    recipe = get_recipe(name)
    readme = ZOO_DIR / name / "README.md"
    return {
        "name": name,
        "task": recipe.task,
        "classes": list(recipe.classes),
        "input_shape": list(recipe.input_shape),
        "recipe": recipe.to_dict(),
        "registry": registry().get(name),
        "markdown": readme.read_text(encoding="utf-8") if readme.exists() else
        f"# {name}\n\nNo trained weights yet: `glt-keras train {name}`.\n",
    }
