"""Recipe data -> splits: the recipe's sources (datasets, image folders, pasted persons)
loaded as uint8 arrays, the validation holdout, extra evaluation sets, and the tf.data
pipelines that train and evaluate on them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.augment import resize_uint8
from ..recipe import Recipe


#: The label of an image that has none (``labels: teacher``): only the teachers' targets train on it.
UNLABELED = -1


# ----------------------------------------------------------------------------- data
@dataclass
class Splits:
    train: tuple
    val: tuple | None
    test: tuple | None
    class_names: list


def _load_source(spec: dict, classes: list, data_dir, size_hw, sensor=None):
    """One data source of a recipe, its labels mapped onto the recipe's classes.

    ``label_map`` maps the source's class names to recipe class names (``"*"`` for
    every other class); without it the source's classes must be the recipe's.
    ``sensor``: a :mod:`glt_keras.data.sensor` condition (``data.sensor``), applied to the
    decoded pixels before any resize.
    """
    from ..data import load_arrays, load_image_folder
    from ..data.sensor import apply_sensor

    if "paste" in spec:
        x, y = _pasted_source(spec["paste"], classes, data_dir, size_hw)
        return apply_sensor(x, sensor), y
    if "folder" in spec:
        ds = load_image_folder(spec["folder"], image_size=size_hw)
    elif "tfds" in spec:
        if spec["tfds"] != "stl10":
            raise ValueError(f"data source {spec}: only tfds 'stl10' is supported.")
        from ..data import load_tfds_stl10

        ds = load_tfds_stl10(spec["split"], data_dir=spec.get("data_dir"), manual_dir=spec.get("manual_dir"))
    else:
        ds = load_arrays(spec["dataset"], spec["split"], data_dir=data_dir)
    label_map = spec.get("label_map")
    if spec.get("labels") == "teacher":  # no hard label: the recipe's teachers label every view
        x, y = ds.x, np.full(len(ds.x), UNLABELED, np.int64)
    elif label_map is None:
        if list(ds.class_names) != list(classes):
            raise ValueError(
                f"data source {spec}: classes {list(ds.class_names)} differ from the recipe's "
                f"{classes}; give a label_map."
            )
        x, y = ds.x, ds.y
    else:
        index = {c: i for i, c in enumerate(classes)}
        default = label_map.get("*")
        mapped = np.array(
            [index.get(label_map.get(name, default), -1) if label_map.get(name, default) else -1
             for name in ds.class_names]
        )
        y = mapped[ds.y]
        keep = y >= 0
        x, y = ds.x[keep], y[keep]
    if spec.get("max_per_class"):
        rng = np.random.default_rng(spec.get("seed", 0))
        keep = np.concatenate(
            [rng.permutation(np.flatnonzero(y == c))[: spec["max_per_class"]] for c in np.unique(y)]
        )
        keep.sort()
        x, y = x[keep], y[keep]
    x = apply_sensor(x, sensor)
    if size_hw is not None:
        x = resize_uint8(x, size_hw)
    return x, y.astype("int32")


def _pasted_source(spec: dict, classes: list, data_dir, size_hw):
    """Synthetic positives: people pasted into scenes without people.

    ``{scenes: {dataset, split, class}, persons: PERSONS, n, label, height_range, seed}``;
    PERSONS is ``{dataset, split, class}`` (windows, pasted with an elliptical mask) or
    ``{dataset: pennfudan | coco128, masks: true}`` (people cut out by their masks), or a
    list of those. ``label: teacher`` leaves the label to the recipe's teachers.
    """
    from ..data import load_arrays, paste_augment, person_cutouts

    def pick(part):
        ds = load_arrays(part["dataset"], part["split"], data_dir=data_dir)
        return ds.x[ds.y == list(ds.class_names).index(part["class"])]

    scenes = pick(spec["scenes"])
    if size_hw is not None:
        scenes = resize_uint8(scenes, size_hw)
    parts = spec["persons"] if isinstance(spec["persons"], list) else [spec["persons"]]
    if all(part.get("masks") for part in parts):
        persons = [cut for part in parts for cut in person_cutouts(part["dataset"], data_dir=data_dir)]
    elif len(parts) == 1:
        persons = pick(parts[0])
    else:
        raise ValueError(f"paste: persons {parts}: either one set of windows or cut-outs with masks: true.")
    x, _ = paste_augment(scenes, persons, n=int(spec["n"]), seed=int(spec.get("seed", 0)),
                         height_range=tuple(spec.get("height_range", (0.2, 0.9))))
    label = spec.get("label", "person")
    return x, np.full(len(x), UNLABELED if label == "teacher" else classes.index(label), "int32")


def _holdout(x, y, fraction, seed):
    rng = np.random.default_rng(seed)
    val_idx = []
    for c in np.unique(y[y >= 0]):  # images labelled by the teachers only stay in training
        idx = rng.permutation(np.flatnonzero(y == c))
        val_idx.append(idx[: max(1, int(round(len(idx) * fraction)))])
    val_idx = np.sort(np.concatenate(val_idx))
    mask = np.ones(len(y), bool)
    mask[val_idx] = False
    return (x[mask], y[mask]), (x[val_idx], y[val_idx])


def load_splits(recipe: Recipe, *, data_dir=None, subset: int | None = None) -> Splits:
    """Train / validation / test arrays for a recipe (``subset``: at most that many each)."""
    data = recipe.data
    if not data.get("train"):
        raise ValueError(f"recipe {recipe.name}: data.train lists no source.")
    train_size = data.get("train_size")
    train_hw = tuple(train_size) if train_size else None
    sources = data["train"] if isinstance(data["train"], list) else [data["train"]]
    sensor = data.get("sensor")
    parts = [_load_source(s, recipe.classes, data_dir, train_hw, sensor) for s in sources]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    val = None
    if data.get("val"):
        val = _load_source(data["val"], recipe.classes, data_dir, recipe.input_shape[:2], sensor)
    elif data.get("holdout"):
        (x, y), val = _holdout(x, y, float(data["holdout"]), recipe.training["seed"])
    test = None
    if data.get("test"):
        test = _load_source(data["test"], recipe.classes, data_dir, recipe.input_shape[:2], sensor)

    def cut(pair):
        if pair is None or not subset:
            return pair
        rng = np.random.default_rng(0)
        idx = np.sort(rng.permutation(len(pair[1]))[:subset])
        return pair[0][idx], pair[1][idx]

    return Splits(cut((x, y)), cut(val), cut(test), list(recipe.classes))


def extra_eval_sets(recipe: Recipe, *, data_dir=None) -> dict:
    """The recipe's ``data.extra_eval`` sets (e.g. VWW's in-domain held-out photos), at its input
    size: ``{"dataset:split" (or the folder's name): (x, y)}``."""
    sets = {}
    for spec in recipe.data.get("extra_eval") or []:
        name = f"{spec['dataset']}:{spec['split']}" if "dataset" in spec else Path(spec["folder"]).name
        sets[name] = _load_source(spec, recipe.classes, data_dir, recipe.input_shape[:2],
                                  recipe.data.get("sensor"))
    return sets


def make_train_dataset(recipe: Recipe, x, y, *, batch_size, balance_by=None, view_targets=None):
    """The augmented training stream; ``balance_by``: the classes to balance on where ``y``
    has none (``data.balance: teacher``); ``view_targets``: the cached teachers' probabilities
    ``(N, K, classes)`` of ``K`` fixed views per image (``kd.view_cache``), yielded with each
    view as ``(images, (labels, probabilities))``."""
    from ..data import make_dataset

    aug = dict(recipe.data.get("augment") or {})
    return make_dataset(
        x, y, batch_size=batch_size, training=True, image_size=recipe.input_shape[:2],
        seed=recipe.training["seed"], balance=bool(recipe.data.get("balance", False)),
        balance_by=balance_by, num_classes=len(recipe.classes), drop_remainder=True,
        view_targets=view_targets, **aug,
    )


def make_eval_dataset(recipe: Recipe, x, y, *, batch_size=128):
    from ..data import make_dataset

    return make_dataset(x, y, batch_size=batch_size, training=False, image_size=recipe.input_shape[:2])
