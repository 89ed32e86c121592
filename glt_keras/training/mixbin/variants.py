"""A chosen variant: its recipe (``model.real_layers``) and its start from the trained fully
binary network (:func:`binary_start`, each real layer started as the binary conv it replaces)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ... import models
from ...recipe import Recipe
from .costs import _as_recipe, candidates, resolve_layers
from .selection import Selection
from .surgery import _at_size, _binarize_kernel, _bn_after, _consumers, _recalibrate_bn


def variant_name(recipe: Recipe, selection: Selection) -> str:
    return f"{recipe.name}_mixbin_{selection.method}_{selection.by}{selection.budget:g}"


def variant_recipe(recipe, layers, *, name: Optional[str] = None) -> Recipe:
    """The recipe with ``model.real_layers`` set (``layers``: names or a :class:`Selection`)."""
    recipe = _as_recipe(recipe)
    layers = list(layers.layers if isinstance(layers, Selection) else layers)
    return recipe.with_changes(name=name or recipe.name, model={"real_layers": layers})


def binary_start(recipe, layers, binary_weights, out_path, *, calibration=None) -> Path:
    """A weight file for the variant with real ``layers``, started from a trained binary network.

    Every weight is copied from ``binary_weights`` (the fully binary network of ``recipe``);
    each real layer's kernel becomes ``alpha * sign(W)``, ``alpha`` the mean ``|W|`` of each
    output channel (XNOR-Net's scaling): the real layer starts as the binary conv it replaces,
    not from latent weights the binary network never used, and the BatchNorm after it is
    rescaled to match: a real layer whose input is +-1 (``block1``, fed by the thermometer)
    then computes exactly what the binary one did. Other real layers see the real input
    instead of its sign; with ``calibration`` images (uint8 / float pixels) the BatchNorm
    after each real layer is re-estimated on them, in network order. Written to
    ``out_path`` (temp file, then rename).
    """
    recipe = _as_recipe(recipe)
    binary = recipe.with_changes(model={"real_layers": []}).build_model(classifier_activation=None)
    models.load_weights(binary, binary_weights)
    variant = variant_recipe(recipe, layers).build_model(classifier_activation=None)
    for layer in binary.layers:
        if layer.weights:
            variant.get_layer(layer.name).set_weights(layer.get_weights())
    cands = candidates(variant)
    real_convs = [c.conv for c in cands if c.name in set(resolve_layers(cands, layers))]
    consumers = _consumers(variant.get_config())
    for conv in real_convs:
        _binarize_kernel(variant.get_layer(conv), _bn_after(variant, conv, consumers))
    if calibration is not None:
        x = _at_size(calibration, recipe.input_shape[:2])
        for conv in real_convs:
            _recalibrate_bn(variant, conv, x)
    return models.save_weights(variant, out_path)
