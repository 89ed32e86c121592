"""Recipes: everything that defines a zoo model and how it is trained, as pure data.

A recipe is ``zoo/<name>/recipe.yaml``. Loading a zoo model reads its recipe to build
the architecture; nothing here imports the training code.
"""
from __future__ import annotations

import copy
import difflib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

ZOO_DIR = Path(__file__).resolve().parent.parent / "zoo"

DEFAULT_TRAINING = {
    "epochs": 30,
    "batch_size": 64,
    "binary_lr": 2e-3,  # Adam on latent binary weights
    "real_lr": 2e-3,  # Adam on BN, thresholds and real-valued layers
    "warmup_epochs": 1,
    "min_lr_fraction": 0.01,
    "label_smoothing": 0.0,
    "seed": 0,
    "threshold_init": "uniform",  # or "quantiles"
    "init_weights": None,  # a weight file (or run folder) to fine-tune from instead of a fresh start
    # init_weights is the fully binary network: model.real_layers start as its binary convs (mixbin.binary_start)
    "real_from_binary": False,
    # Best weights by the mean validation accuracy of this many last epochs (1: the epoch's own).
    "select_smoothing": 1,
    # Keep an exponential moving average of the weights (this momentum per step) and make it the
    # run's weights: validated every epoch, selected, saved (glt_keras.training.weight_average). None: off.
    "ema_momentum": None,
    # float32, mixed_bfloat16, or auto: bfloat16 on CPUs with AVX512-BF16 / AMX and oneDNN
    # (glt_keras.training.precision). Weights files are float32 whatever was trained.
    "precision": "float32",
    # The optimizer of the real-valued variables (latent binary weights always use Adam at
    # binary_lr): adam, or sgd (Nesterov momentum) at real_lr, for real-valued teachers.
    "optimizer": "adam",
    "momentum": 0.9,  # sgd only
    # L2 penalty on real-valued conv / dense kernels, as SGD's weight decay: the gradient gets
    # weight_decay * w (loss + weight_decay / 2 * sum(w^2)); BN, biases and latent binary
    # weights are never decayed. 0: none.
    "weight_decay": 0.0,
}

# teacher: a real-valued twin ("twin") or a run folder; teachers: model files
# (glt_keras.training.teachers). alpha weighs the hard label against the teacher.
DEFAULT_KD = {"teacher": None, "teachers": None, "alpha": 0.5, "temperature": 4.0, "teacher_epochs": 20}


# ----------------------------------------------------------------------------- validation
class RecipeError(ValueError):
    """A recipe that cannot be used: malformed YAML, an unknown key, a wrong type or range.
    The message is one line naming the key (``training.epochs``) and what is wrong."""


class Rule:
    """One value's type and range; ``check(value, where)`` raises ``RecipeError``."""

    def __init__(self, *, optional=False, doc=""):
        self.optional = optional  # None (YAML null) allowed
        self.doc = doc

    def check(self, value, where):
        if value is None:
            if not self.optional:
                raise RecipeError(f"{where} must be {self.describe()}, got null.")
            return
        self._check(value, where)

    def _fail(self, value, where, extra=""):
        raise RecipeError(f"{where} must be {self.describe()}{extra}, got {value!r}.")


class Num(Rule):
    def __init__(self, lo=None, hi=None, *, integer=False, lo_open=False, hi_open=False, **kw):
        super().__init__(**kw)
        self.lo, self.hi, self.integer, self.lo_open, self.hi_open = lo, hi, integer, lo_open, hi_open

    def describe(self):
        kind = "an integer" if self.integer else "a number"
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {self.lo}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {self.hi}")
        return kind + (" " + " and ".join(parts) if parts else "")

    def _check(self, value, where):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self._fail(value, where)
        if self.integer and not isinstance(value, int):
            self._fail(value, where)
        if value != value or value in (float("inf"), float("-inf")):
            self._fail(value, where)
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            self._fail(value, where)
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            self._fail(value, where)


def Int(lo=None, hi=None, **kw):
    return Num(lo, hi, integer=True, **kw)


class Str(Rule):
    def __init__(self, choices=None, **kw):
        super().__init__(**kw)
        self.choices = choices  # a sequence, or a function returning one (lazy imports)

    def _choices(self):
        return list(self.choices() if callable(self.choices) else self.choices or ())

    def describe(self):
        choices = self._choices()
        return f"one of {', '.join(map(repr, choices))}" if choices else "a string"

    def _check(self, value, where):
        if not isinstance(value, str):
            self._fail(value, where)
        choices = self._choices()
        if choices and value not in choices:
            close = difflib.get_close_matches(value, choices, n=1)
            self._fail(value, where, f" (did you mean {close[0]!r}?)" if close else "")


class Bool(Rule):
    def describe(self):
        return "true or false"

    def _check(self, value, where):
        if not isinstance(value, bool):
            self._fail(value, where)


class Anything(Rule):
    def describe(self):
        return "any value"

    def _check(self, value, where):
        pass


class Seq(Rule):
    """A list of ``item`` values (``length``: exact; ``min_length``)."""

    def __init__(self, item, *, length=None, min_length=0, **kw):
        super().__init__(**kw)
        self.item, self.length, self.min_length = item, length, min_length

    def describe(self):
        n = f"{self.length} " if self.length else ""
        return f"a list of {n}values, each {self.item.describe()}"

    def _check(self, value, where):
        if not isinstance(value, (list, tuple)):
            self._fail(value, where)
        if self.length is not None and len(value) != self.length:
            raise RecipeError(f"{where} must have {self.length} entries, got {len(value)}: {list(value)!r}.")
        if len(value) < self.min_length:
            raise RecipeError(f"{where} needs at least {self.min_length} entries, got {len(value)}.")
        for i, item in enumerate(value):
            self.item.check(item, f"{where}[{i}]")


class MapOf(Rule):
    """A mapping of free keys (``key`` rule) to ``value`` values (e.g. a label map)."""

    def __init__(self, key, value, **kw):
        super().__init__(**kw)
        self.key, self.value = key, value

    def describe(self):
        return "a mapping"

    def _check(self, value, where):
        if not isinstance(value, dict):
            self._fail(value, where)
        for k, v in value.items():
            self.key.check(k, f"{where} key")
            self.value.check(v, _join(where, k))


class Section(Rule):
    """A mapping with a fixed set of keys, each with its rule: one line per key below.
    ``required``: keys that must be present; ``one_of``: exactly one of these keys."""

    def __init__(self, keys, *, required=(), one_of=(), **kw):
        super().__init__(**kw)
        self.keys, self.required, self.one_of = keys, tuple(required), tuple(one_of)

    def describe(self):
        return "a mapping"

    def _check(self, value, where):
        if not isinstance(value, dict):
            self._fail(value, where)
        for key in value:
            if key not in self.keys:
                close = difflib.get_close_matches(str(key), list(self.keys), n=1, cutoff=0.6)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise RecipeError(f"{_join(where, key)} is not a known key ({hint}known: {', '.join(self.keys)}).")
        missing = [k for k in self.required if k not in value]
        if missing:
            raise RecipeError(f"{where or 'the recipe'} needs {', '.join(missing)}.")
        if self.one_of and sum(k in value for k in self.one_of) != 1:
            raise RecipeError(f"{where} needs exactly one of {', '.join(self.one_of)}, got {value!r}.")
        for key, item in value.items():
            self.keys[key].check(item, _join(where, key))


class AnyOf(Rule):
    """The first of ``rules`` whose type fits (a data source or a list of sources)."""

    def __init__(self, *rules, **kw):
        super().__init__(**kw)
        self.rules = rules

    def describe(self):
        return " or ".join(r.describe() for r in self.rules)

    def _check(self, value, where):
        for rule in self.rules:
            fits = {Section: dict, MapOf: dict, Seq: (list, tuple), Str: str, Bool: bool}.get(type(rule))
            if fits is None or isinstance(value, fits):
                return rule.check(value, where)
        self._fail(value, where)


def _topologies():
    from .models import RESIDUAL_TOPOLOGIES, TOPOLOGIES

    return sorted(TOPOLOGIES) + sorted(RESIDUAL_TOPOLOGIES)


def _input_quantizers():
    from .models import INPUT_QUANTIZERS

    return list(INPUT_QUANTIZERS)


def _encodings():
    from .layers.encoding import ENCODINGS

    return sorted(ENCODINGS)


def _datasets():
    from .data.catalog import DATASETS

    return sorted(DATASETS)


def _sensors():
    from .data.sensor import SENSOR_CONDITIONS

    return sorted(SENSOR_CONDITIONS)

# Adding a key is one line in its section below.
MODEL_KEYS = {
    "topology": Str(_topologies, optional=True),
    "num_classes": Int(1),
    "widths": Seq(Int(1), min_length=1),
    "groups": Seq(Int(1), min_length=1),
    "pools": Seq(Bool(), min_length=1),
    "strides": Seq(Int(1), min_length=1),
    "kernels": Seq(Int(1), min_length=1),
    "shuffle": Bool(),
    "kernel_size": Int(1),
    "encoding": Str(_encodings),
    "levels": Int(1),
    "encoding_kwargs": MapOf(Str(), Anything(optional=True), optional=True),
    "real_layers": Seq(AnyOf(Str(), Int(0)), optional=True),
    "teacher": Bool(),
    "split_groups": Bool(),
    "input_quantizer": Str(_input_quantizers),
    "binary_weights": Bool(),
    "shortcuts": Bool(),
    "include_top": Bool(),
    "classifier_activation": Str(optional=True),
    # residual topologies only (resnet20, ...: glt_keras.models.RESIDUAL_TOPOLOGIES)
    "width_multiplier": Num(0, lo_open=True),
    "blocks_per_stage": Int(1),
}
PART_KEYS = {  # one side of a paste source
    "dataset": Str(_datasets),
    "split": Str(),
    "class": Str(),
    "masks": Bool(),
}
PASTE_KEYS = {
    "scenes": Section(PART_KEYS, required=("dataset", "split")),
    # windows ({dataset, split, class}) or cut-outs ({dataset, masks: true}, or a list of them)
    "persons": AnyOf(Seq(Section(PART_KEYS, required=("dataset",)), min_length=1),
                     Section(PART_KEYS, required=("dataset",))),
    "n": Int(1),
    "seed": Int(0),
    "height_range": Seq(Num(0, 1, lo_open=True), length=2),  # person height / scene height
    "label": Str(),  # a recipe class, or "teacher"
}
SOURCE_KEYS = {  # one entry of data.train / val / test / extra_eval
    "dataset": Str(_datasets),
    "split": Str(),
    "folder": Str(),
    "tfds": Str(["stl10"]),
    "paste": Section(PASTE_KEYS, required=("scenes", "persons", "n")),
    "data_dir": Str(optional=True),
    "manual_dir": Str(optional=True),
    "label_map": MapOf(Str(), Str(optional=True)),
    "max_per_class": Int(1, optional=True),
    "seed": Int(0),
    "labels": Str(["teacher"]),  # labels from the kd teachers instead of the source's own
}
SOURCE = Section(SOURCE_KEYS, one_of=("dataset", "folder", "tfds", "paste"))
AUGMENT_KEYS = {
    "crop": Str(["none", "pad", "random_resized"]),
    "pad": Int(0),
    "flip": Bool(),
    "scale": Seq(Num(0, 1, lo_open=True), length=2),
    "brightness": Num(0),
    "contrast": Num(0, 1),
    "mixup": Num(0, 1),  # fraction of views blended from two images, labelled by the teachers only
    "mosaic": Num(0, 1),  # fraction of views tiled 2x2 from four images, labelled by the teachers only
    "shuffle_buffer": Int(1, optional=True),
}
DATA_KEYS = {
    "train": AnyOf(Seq(SOURCE, min_length=1), SOURCE),
    "val": Section(SOURCE_KEYS, one_of=SOURCE.one_of, optional=True),
    "test": Section(SOURCE_KEYS, one_of=SOURCE.one_of, optional=True),
    "holdout": Num(0, 1, lo_open=True, hi_open=True, optional=True),
    "extra_eval": Seq(SOURCE, optional=True),
    "balance": AnyOf(Bool(), Str(["teacher"])),  # teacher: balance on the teachers' label where none
    "epoch_images": Int(1, optional=True),
    "train_size": Seq(Int(1), length=2, optional=True),
    "augment": Section(AUGMENT_KEYS, optional=True),
    "sensor": Str(_sensors),  # every split's pixels as a sensor condition delivers them (data/sensor.py)
}
TRAINING_KEYS = {
    "epochs": Int(1),
    "batch_size": Int(1),
    "binary_lr": Num(0, lo_open=True),
    "real_lr": Num(0, lo_open=True),
    "warmup_epochs": Num(0),
    "min_lr_fraction": Num(0, 1),
    "label_smoothing": Num(0, 1, hi_open=True),
    "seed": Int(0),
    "threshold_init": Str(["uniform", "quantiles"]),
    "init_weights": Str(optional=True),
    "real_from_binary": Bool(),
    "select_smoothing": Int(1),
    "ema_momentum": Num(0, 1, lo_open=True, hi_open=True, optional=True),
    "precision": Str(["float32", "mixed_bfloat16", "auto"]),
    "optimizer": Str(["adam", "sgd"]),
    "momentum": Num(0, 1, hi_open=True),
    "weight_decay": Num(0),
}
TEACHER_KEYS = {  # one entry of kd.teachers
    "path": Str(),
    "input_range": Seq(Num(), length=2),
    "output": Str(["probabilities", "logits"]),
    "classes": Seq(Str(), optional=True),
    "weight": Num(0, optional=True),
}
KD_KEYS = {
    "teacher": Str(optional=True),  # "twin" or a run folder (its recipe.yaml + best_weights.h5)
    "alpha": Num(0, 1),
    "temperature": Num(0, lo_open=True),
    "teacher_epochs": Int(1),
    "teachers": Seq(AnyOf(Section(TEACHER_KEYS, required=("path",)), Str()), optional=True),
    # K fixed augmented views per training image, labelled by the teachers once and cached
    # (glt_keras.training.view_cache); absent or 0: the teachers label every live view.
    "view_cache": Int(0, optional=True),
}
PRUNING_KEYS = {
    "target_ratio": Num(0, 1, hi_open=True),
    "score": Str(["bn", "l1"]),
    "allocation": Str(["global", "layer"]),
    "start_epoch": Int(0),
    "end_epoch": Int(0, optional=True),
    "frequency_steps": Int(1),
    "block_size": Int(1),
    "layers": Seq(AnyOf(Str(), Int(0)), optional=True),
    "init_weights": Str(optional=True),
    "full_model": Section(MODEL_KEYS, optional=True),
}
RECIPE_KEYS = {
    "name": Str(),
    "task": Str(optional=True),
    "description": Str(optional=True),
    "input_shape": Seq(Int(1), length=3),
    "classes": Seq(Str(), min_length=1),
    "model": Section(MODEL_KEYS),
    "data": Section(DATA_KEYS, optional=True),
    "training": Section(TRAINING_KEYS, optional=True),
    "kd": Section(KD_KEYS, optional=True),
    "pruning": Section(PRUNING_KEYS, optional=True),
}
RECIPE = Section(RECIPE_KEYS, required=("name", "model", "input_shape", "classes"))


def _sources(data: dict):
    for key in ("train", "val", "test", "extra_eval"):
        value = data.get(key)
        for i, spec in enumerate(value if isinstance(value, list) else [value] if value else []):
            yield (f"data.{key}[{i}]" if isinstance(value, list) else f"data.{key}"), spec


def _join(where: str, key) -> str:
    return f"{where}.{key}" if where else str(key)


def validate(d: dict, label: str = "") -> None:
    """Check a recipe mapping against the schema above and the facts that join sections
    (class names, the order of pruning epochs): one ``RecipeError`` line naming the recipe
    (``label``), the key (``training.epochs``) and the problem."""
    try:
        _validate(d)
    except RecipeError as err:
        raise RecipeError(f"recipe {label}: {err}" if label else f"recipe: {err}") from None


def _validate(d: dict) -> None:
    where = ""
    if not isinstance(d, dict):
        raise RecipeError(f"not a YAML mapping (got {type(d).__name__}).")
    RECIPE.check(d, where)
    classes = list(d["classes"])
    if len(set(classes)) != len(classes):
        dup = sorted({c for c in classes if classes.count(c) > 1})
        raise RecipeError(f"classes lists {', '.join(dup)} more than once.")
    for key, spec in _sources(d.get("data") or {}):
        if ("dataset" in spec or "tfds" in spec) and "split" not in spec:
            raise RecipeError(f"{key} needs a split (e.g. split: train).")
        for name, target in (spec.get("label_map") or {}).items():
            if target is not None and target not in classes:
                raise RecipeError(f"{key}.label_map.{name}: {target!r} is not one of the "
                                  f"recipe's classes ({', '.join(classes)}).")
        paste = spec.get("paste")
        if paste:
            label = paste.get("label", "person")
            if label != "teacher" and label not in classes:
                raise RecipeError(f"{key}.paste.label: {label!r} is not one of the recipe's "
                                  f"classes ({', '.join(classes)}) nor 'teacher'.")
    kd = d.get("kd") or {}
    if kd.get("view_cache") and not kd.get("teachers"):
        raise RecipeError("kd.view_cache caches the outputs of kd.teachers, which names no teacher file.")
    augment = (d.get("data") or {}).get("augment") or {}
    if augment.get("mixup") and not kd.get("teachers"):
        raise RecipeError("data.augment.mixup blends two images into one that has no hard label: it needs "
                          "kd.teachers (teacher files) to label each blend.")
    if augment.get("mosaic") and not kd.get("teachers"):
        raise RecipeError("data.augment.mosaic tiles four images into one that has no hard label: it needs "
                          "kd.teachers (teacher files) to label each mosaic.")
    _validate_model_keys(d["model"], "model")
    pruning = d.get("pruning") or {}
    if pruning.get("full_model"):
        _validate_model_keys(pruning["full_model"], "pruning.full_model")
    start, end = pruning.get("start_epoch", 0), pruning.get("end_epoch")
    if end is not None and end < start:
        raise RecipeError(f"pruning needs start_epoch <= end_epoch, got {start} > {end}.")


def _validate_model_keys(model: dict, where: str) -> None:
    """A residual topology takes only its own keys; the GLT topologies do not take them."""
    from .models import RESIDUAL_COMMON_KEYS, RESIDUAL_KEYS, RESIDUAL_TOPOLOGIES

    topology = model.get("topology", "glt96")
    if topology in RESIDUAL_TOPOLOGIES:
        for key in model:
            if key not in ("topology",) + RESIDUAL_KEYS + RESIDUAL_COMMON_KEYS:
                raise RecipeError(f"{where}.{key} does not apply to the residual topology {topology} "
                                  f"(its keys: topology, num_classes, {', '.join(RESIDUAL_KEYS)}).")
    else:
        for key in RESIDUAL_KEYS:
            if key in model:
                raise RecipeError(f"{where}.{key} applies only to the residual topologies "
                                  f"({', '.join(sorted(RESIDUAL_TOPOLOGIES))}), not to {topology}.")


@dataclass
class Recipe:
    """A zoo model's definition and training settings.

    Example:
        >>> r = Recipe(name="demo", model={"topology": "tiny", "num_classes": 10},
        ...            input_shape=(32, 32, 3), classes=[str(i) for i in range(10)])
        >>> r.training["batch_size"]
        64
    """

    name: str
    model: dict
    input_shape: tuple
    classes: list
    task: str = ""
    data: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    kd: dict = field(default_factory=dict)
    pruning: dict | None = None
    description: str = ""
    path: str | None = None

    def __post_init__(self):
        # Every section and key is checked here, once, before defaults are filled in.
        validate({key: getattr(self, key) for key in RECIPE_KEYS}, self.path or self.name)
        self.input_shape = tuple(int(v) for v in self.input_shape)
        self.data = dict(self.data or {})
        self.training = {**DEFAULT_TRAINING, **(self.training or {})}
        self.kd = {**DEFAULT_KD, **(self.kd or {})}
        self.model = dict(self.model)
        n = self.model.setdefault("num_classes", len(self.classes))
        if n != len(self.classes):
            raise RecipeError(
                f"recipe {self.name}: model.num_classes={n} but {len(self.classes)} classes are listed."
            )

    def build_model(self, **overrides):
        """The recipe's network (``glt_keras.models.build_network``: ``glt_net``, or
        ``resnet_net`` for a residual topology); keyword overrides win."""
        from .models import build_network

        kwargs = {**self.model, "input_shape": self.input_shape, **overrides}
        kwargs.setdefault("name", self.name)
        return build_network(**kwargs)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("path")
        d["input_shape"] = list(self.input_shape)
        return d

    def with_changes(self, **changes) -> "Recipe":
        d = copy.deepcopy(self.to_dict())
        for key, value in changes.items():
            if isinstance(value, dict) and isinstance(d.get(key), dict):
                d[key].update(value)
            else:
                d[key] = value
        return Recipe(**d, path=self.path)


def recipe_path(name_or_path: str | os.PathLike) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise FileNotFoundError(f"Recipe file {path} does not exist.")
        return path
    candidate = ZOO_DIR / str(name_or_path) / "recipe.yaml"
    if candidate.exists():
        return candidate
    known = sorted(p.parent.name for p in ZOO_DIR.glob("*/recipe.yaml"))
    raise FileNotFoundError(
        f"No recipe named {str(name_or_path)!r}: not a .yaml file and not in {ZOO_DIR}. "
        f"Known recipes: {', '.join(known) or 'none'}."
    )


def load_recipe(name_or_path: str | os.PathLike) -> Recipe:
    """Load ``zoo/<name>/recipe.yaml`` or a recipe file path."""
    path = recipe_path(name_or_path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError(f"recipe {path}: not valid YAML{at}: {problem}.") from None
    except UnicodeDecodeError as err:
        raise RecipeError(f"recipe {path}: not a UTF-8 text file ({err.reason}).") from None
    validate(data, str(path))
    return Recipe(**data, path=str(path))
