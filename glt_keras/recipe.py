"""Recipes: everything that defines a zoo model and how it is trained, as pure data.

A recipe is ``zoo/<name>/recipe.yaml``. Loading a zoo model reads its recipe to build
the architecture; nothing here imports the training code.
"""
from __future__ import annotations

import copy
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
}

# teacher: a real-valued twin ("twin") or a run folder; teachers: model files
# (glt_keras.training.teachers). alpha weighs the hard label against the teacher.
DEFAULT_KD = {"teacher": None, "teachers": None, "alpha": 0.5, "temperature": 4.0, "teacher_epochs": 20}


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
        self.input_shape = tuple(int(v) for v in self.input_shape)
        if len(self.input_shape) != 3:
            raise ValueError(f"recipe {self.name}: input_shape must be (H, W, C), got {self.input_shape}.")
        self.training = {**DEFAULT_TRAINING, **(self.training or {})}
        self.kd = {**DEFAULT_KD, **(self.kd or {})}
        self.model = dict(self.model)
        n = self.model.setdefault("num_classes", len(self.classes))
        if n != len(self.classes):
            raise ValueError(
                f"recipe {self.name}: model.num_classes={n} but {len(self.classes)} classes are listed."
            )

    def build_model(self, **overrides):
        """The recipe's network (``glt_keras.models.glt_net``); keyword overrides win."""
        from .models import glt_net

        kwargs = {**self.model, "input_shape": self.input_shape, **overrides}
        kwargs.setdefault("name", self.name)
        return glt_net(**kwargs)

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
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError(f"Recipe {path} is not a YAML mapping.")
    unknown = set(data) - set(Recipe.__dataclass_fields__)
    if unknown:
        raise ValueError(f"Recipe {path}: unknown keys {sorted(unknown)}.")
    missing = {"name", "model", "input_shape", "classes"} - set(data)
    if missing:
        raise ValueError(f"Recipe {path}: missing keys {sorted(missing)}.")
    return Recipe(**data, path=str(path))
