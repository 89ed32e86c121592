"""Teachers from files: public classifiers whose probabilities a student learns from.

A recipe names its teachers in ``kd.teachers``; each is a model file that already knows the
task (a ``.tflite`` float, uint8 or int8 model, a Keras ``.h5``, or a training run folder of this
project: the network its ``recipe.yaml`` describes with its ``best_weights.h5``, e.g. the
real-valued ``runs/cifar10_teacher``)::

    kd:
      teachers:
        - {path: ../shared/anchors/vww_96_float.tflite, input_range: [0, 1]}
        - {path: ../shared/anchors/wake_vision/wv_quality_mobilenetv2.tflite, input_range: [0, 255]}
      alpha: 0.2          # weight of the hard label, where an image has one
      temperature: 1.0

Per teacher: ``input_range`` is the real value range its input expects for pixels 0..255
(``[0, 1]`` for ``pixels / 255``; ``[-1, 1]``; ``[0, 255]`` raw); a quantized input is then
quantized with the file's own scale and zero point. ``output`` says whether the file gives
``probabilities`` (default) or ``logits``; ``classes`` names its outputs in order (default:
the recipe's classes); ``weight`` weighs it in the average (default 1).

Consistent teaching: :func:`with_teacher_targets` runs every teacher on the batch of augmented
views the student trains on (crop, flip, exposure, paste all happen first), resized to the
teacher's input size, so the target always describes the image the student sees. With
``kd.view_cache: K`` the teachers label ``K`` fixed views of every image once, ahead of training,
and the student trains on exactly those views (:mod:`glt_keras.training.view_cache`). The teachers'
probabilities are averaged (weighted). Every file is checked before training starts: a missing
or unreadable file, or an input / output shape that does not fit the recipe, is a
:class:`TeacherError` naming the file.

    >>> ensemble = load_teachers([{"path": "teacher.tflite"}], classes=["no", "yes"])  # doctest: +SKIP
    >>> train_ds = with_teacher_targets(train_ds, ensemble)                            # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

import numpy as np

from .. import recipe as recipe_schema
from .._io import sha256_of

__all__ = ["FileTeacher", "TeacherEnsemble", "TeacherError", "load_teachers", "recipe_teachers", "resolve_teacher_path",
           "sampling_classes", "with_teacher_targets"]

OUTPUTS = ("probabilities", "logits")
#: What a training run folder must hold to be a teacher.
RUN_FILES = ("recipe.yaml", "best_weights.h5")
TEACHER_KEYS = tuple(recipe_schema.TEACHER_KEYS)


class TeacherError(ValueError):
    """A teacher file that cannot teach this recipe; the message names the file and why."""


@dataclass
class FileTeacher:
    """One teacher model file, run by the TFLite interpreter (a Keras file is converted once).

    ``predict(images)`` takes float pixels ``(N, H, W, 3)`` in 0..255 at the teacher's input
    size and returns ``(N, len(recipe classes))`` probabilities in the recipe's class order.
    """

    path: Path
    input_range: tuple
    output: str
    class_index: np.ndarray  # recipe class of each teacher output
    num_classes: int
    weight: float

    def __post_init__(self):
        self._lock = threading.Lock()
        self._interpreter = _interpreter(self.path)
        details = self._interpreter.get_input_details()
        if len(details) != 1:
            raise TeacherError(f"teacher {self.path}: {len(details)} inputs; a teacher takes one image batch.")
        self._input = details[0]
        shape = tuple(int(v) for v in self._input["shape"])
        if len(shape) != 4 or shape[-1] != 3:
            raise TeacherError(f"teacher {self.path}: input shape {list(shape)} is not (batch, height, width, 3).")
        self.input_hw = shape[1:3]
        outputs = self._interpreter.get_output_details()
        if len(outputs) != 1:
            raise TeacherError(f"teacher {self.path}: {len(outputs)} outputs; a teacher has one score vector.")
        self._output = outputs[0]
        out_shape = tuple(int(v) for v in self._output["shape"])
        if len(out_shape) != 2 or out_shape[-1] != len(self.class_index):
            raise TeacherError(
                f"teacher {self.path}: output shape {list(out_shape)} does not give one score for each of "
                f"its {len(self.class_index)} classes.")
        self._batch = shape[0]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def sha256(self) -> str:
        return teacher_sha256(self.path)

    def _quantize(self, images: np.ndarray) -> np.ndarray:
        lo, hi = self.input_range
        real = images.astype(np.float32) * np.float32((hi - lo) / 255.0) + np.float32(lo)
        dtype = self._input["dtype"]
        if dtype == np.float32:
            return real
        scale, zero = self._input["quantization"]
        info = np.iinfo(dtype)
        return np.clip(np.rint(real / scale + zero), info.min, info.max).astype(dtype)

    def _scores(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            if batch.shape[0] != self._batch:
                self._interpreter.resize_tensor_input(self._input["index"], list(batch.shape))
                self._interpreter.allocate_tensors()
                self._batch = batch.shape[0]
            self._interpreter.set_tensor(self._input["index"], batch)
            self._interpreter.invoke()
            raw = self._interpreter.get_tensor(self._output["index"]).astype(np.float64)
        scale, zero = self._output["quantization"]
        if self._output["dtype"] != np.float32 and scale:
            raw = (raw - zero) * scale
        return raw

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities ``(N, recipe classes)`` for float pixels at the teacher's input size."""
        scores = self._scores(self._quantize(np.asarray(images)))
        if self.output == "logits":
            scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = np.clip(scores, 0.0, None)
        probs /= np.maximum(probs.sum(-1, keepdims=True), 1e-12)
        out = np.zeros((len(probs), self.num_classes), np.float32)
        np.add.at(out.T, self.class_index, probs.T)
        return out


def _run_model(path: Path):
    """The float32 Keras network of a run folder (its recipe, its best weights)."""
    import tensorflow as tf

    from ..models import load_weights

    recipe = recipe_schema.load_recipe(path / "recipe.yaml")
    policy = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy("float32")  # convert the float32 network, whatever trains
    try:
        model = recipe.build_model()
    finally:
        tf.keras.mixed_precision.set_global_policy(policy)
    load_weights(model, path / "best_weights.h5")
    return model


def teacher_sha256(path: Path) -> str:
    """What identifies a teacher's function: the file's SHA-256; for a run folder, that of its
    recipe and best weights together (a resumed teacher run is another teacher)."""
    if not path.is_dir():
        return sha256_of(path)
    return hashlib.sha256("".join(sha256_of(path / f) for f in RUN_FILES).encode()).hexdigest()


#: Flatbuffers converted from Keras teachers, by path and content: an ensemble's copies (one per
#: worker thread) convert once.
_CONVERTED = {}


def _keras_flatbuffer(path: Path) -> bytes:
    """A Keras teacher (a run folder, or an ``.h5`` / ``.keras`` model file) as TFLite."""
    import tensorflow as tf

    from .. import layers  # noqa: F401  (registers the custom layers a zoo file may hold)

    key = (str(path), teacher_sha256(path))
    if key not in _CONVERTED:
        try:
            model = _run_model(path) if path.is_dir() else tf.keras.models.load_model(str(path), compile=False)
            _CONVERTED[key] = tf.lite.TFLiteConverter.from_keras_model(model).convert()
        except Exception as err:  # many error types for an unreadable or unconvertible model
            what = "its run's network does not load or convert" if path.is_dir() else "not a loadable Keras model"
            raise TeacherError(f"teacher {path}: {what} ({type(err).__name__}: "
                               f"{str(err).splitlines()[0][:200] if str(err) else ''}).") from err
    return _CONVERTED[key]


def _interpreter(path: Path):
    import tensorflow as tf

    if path.is_dir() or path.suffix in (".h5", ".keras"):
        kwargs = {"model_content": _keras_flatbuffer(path)}
    else:
        kwargs = {"model_path": str(path)}
    try:
        interpreter = tf.lite.Interpreter(**kwargs, num_threads=1)
        interpreter.allocate_tensors()
    except Exception as err:
        raise TeacherError(f"teacher {path}: not a readable TFLite model ({type(err).__name__}: "
                           f"{str(err).splitlines()[0][:200] if str(err) else ''}).") from err
    return interpreter


class TeacherEnsemble:
    """Several :class:`FileTeacher` whose probabilities are averaged with their weights."""

    def __init__(self, teachers: Sequence[FileTeacher]):
        if not teachers:
            raise TeacherError("a teacher ensemble needs at least one teacher.")
        self.teachers = list(teachers)
        total = sum(t.weight for t in self.teachers)
        self.weights = [t.weight / total for t in self.teachers]
        self.num_classes = self.teachers[0].num_classes

    def copy(self) -> "TeacherEnsemble":
        """The same teachers with interpreters of their own (one per thread: an interpreter
        is not thread-safe)."""
        from dataclasses import replace

        return TeacherEnsemble([replace(t) for t in self.teachers])

    def __repr__(self):
        return "TeacherEnsemble(" + ", ".join(f"{t.name} x{w:.2f}" for t, w in zip(self.teachers, self.weights)) + ")"

    def predict(self, images: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
        """Averaged probabilities for uint8 / float pixels of any size (resized per teacher)."""
        import tensorflow as tf

        images = np.asarray(images)
        out = np.zeros((len(images), self.num_classes), np.float32)
        for start in range(0, len(images), batch_size):
            chunk = tf.constant(images[start:start + batch_size], tf.float32)
            out[start:start + batch_size] = sum(
                w * t.predict(_resize(chunk, t.input_hw).numpy()) for t, w in zip(self.teachers, self.weights))
        return out

    def graph_predict(self, images):
        """The averaged probabilities as a TensorFlow op on a float32 batch (for tf.data)."""
        import tensorflow as tf

        total = 0.0
        for teacher, weight in zip(self.teachers, self.weights):
            probs = tf.numpy_function(teacher.predict, [_resize(images, teacher.input_hw)], tf.float32,
                                      stateful=False)
            total += weight * tf.ensure_shape(probs, [None, self.num_classes])
        return total


def _resize(images, hw):
    import tensorflow as tf

    if tuple(images.shape[1:3]) == tuple(hw):
        return images
    # Bilinear, as the teachers' own scores on VWW were measured (96x96 images resized up).
    return tf.clip_by_value(tf.image.resize(images, hw, method="bilinear"), 0.0, 255.0)


def resolve_teacher_path(path_text: str, base_dir=None) -> Path:
    """Where a ``kd.teachers`` path points: absolute as given; else the first that exists of
    the current folder, ``base_dir`` (the recipe's folder) and the project root."""
    path = Path(os.path.expanduser(str(path_text)))
    if path.is_absolute():
        return path
    candidates = [Path.cwd() / path] + ([Path(base_dir) / path] if base_dir else [])
    candidates.append(recipe_schema.ZOO_DIR.parent / path)  # recipes name ../shared/... from the project root
    for candidate in candidates:
        if candidate.exists():
            return candidate.resolve()
    return candidates[0]


def load_teachers(specs, *, classes: Sequence[str], base_dir=None) -> TeacherEnsemble:
    """Check and load ``kd.teachers`` (a list of mappings or paths) for a recipe's ``classes``.

    Relative paths are looked up from the current folder, then ``base_dir`` (the recipe's
    folder), then the project root. Raises :class:`TeacherError` before any training starts.
    """
    if isinstance(specs, (str, os.PathLike, dict)):
        specs = [specs]
    teachers: List[FileTeacher] = []
    for spec in specs:
        spec = {"path": spec} if isinstance(spec, (str, os.PathLike)) else dict(spec)
        unknown = sorted(set(spec) - set(TEACHER_KEYS))
        if unknown or "path" not in spec:
            raise TeacherError(f"teacher {spec}: " + (f"unknown keys {unknown}; " if unknown else "no path; ")
                               + f"a teacher takes {list(TEACHER_KEYS)}.")
        path = resolve_teacher_path(spec["path"], base_dir)
        if path.is_dir():
            missing = [f for f in RUN_FILES if not (path / f).is_file()]
            if missing:
                raise TeacherError(f"teacher {spec['path']}: a run folder used as a teacher needs "
                                   f"{' and '.join(missing)} (has the run finished an epoch?).")
        elif not path.is_file():
            raise TeacherError(f"teacher {spec['path']}: file not found (looked at {path}).")
        input_range = tuple(float(v) for v in spec.get("input_range", (0.0, 1.0)))
        if len(input_range) != 2 or not input_range[0] < input_range[1]:
            raise TeacherError(f"teacher {path}: input_range must be [low, high] with low < high, got {spec['input_range']}.")
        output = spec.get("output", "probabilities")
        if output not in OUTPUTS:
            raise TeacherError(f"teacher {path}: output must be one of {list(OUTPUTS)}, got {output!r}.")
        names = list(spec.get("classes") or classes)
        missing = [n for n in names if n not in classes]
        if missing:
            raise TeacherError(f"teacher {path}: classes {missing} are not among the recipe's {list(classes)}.")
        weight = float(spec.get("weight", 1.0))
        if not weight > 0:
            raise TeacherError(f"teacher {path}: weight must be > 0, got {weight}.")
        teachers.append(FileTeacher(path, input_range, output, np.array([list(classes).index(n) for n in names]),
                                    len(classes), weight))
    return TeacherEnsemble(teachers)


def recipe_teachers(recipe) -> TeacherEnsemble:
    """The ensemble a recipe's ``kd.teachers`` names, relative paths resolved from the recipe's folder."""
    return load_teachers(recipe.kd["teachers"], classes=recipe.classes,
                         base_dir=Path(recipe.path).parent if recipe.path else None)


def with_teacher_targets(dataset, ensemble: TeacherEnsemble):
    """``(images, labels)`` batches -> ``(images, (labels, teacher probabilities))``: the
    teachers see exactly the augmented views the student will see."""
    import tensorflow as tf

    def add(images, labels):
        return images, (labels, ensemble.graph_predict(tf.cast(images, tf.float32)))

    return dataset.map(add, num_parallel_calls=1).prefetch(2)


def sampling_classes_key(x, y, ensemble: TeacherEnsemble) -> str:
    """What decides :func:`sampling_classes`: the images, their hard labels and the teachers."""
    import hashlib
    import json

    from .._io import sha256_of_array

    teachers = [{"sha256": t.sha256, "input_range": [float(v) for v in t.input_range], "output": t.output,
                 "class_index": [int(c) for c in t.class_index], "weight": float(w)}
                for t, w in zip(ensemble.teachers, ensemble.weights)]
    labels = hashlib.sha256(np.ascontiguousarray(np.asarray(y, np.int64))).hexdigest()
    text = json.dumps({"images": sha256_of_array(x), "labels": labels, "teachers": teachers},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def sampling_classes(x, y, ensemble: TeacherEnsemble, *, cache=None, shared_dir=None, verbose=1) -> np.ndarray:
    """The class to balance each training image on (``data.balance: teacher``): its hard label
    where it has one, else the teachers' top class on the stored image. Labelling a few tens of
    thousands of images takes minutes, so the result is kept in ``cache`` (an ``.npz`` in the run
    folder, for a resumed run) and in ``shared_dir`` as ``classes_<key>.npz`` (beside the teacher
    view caches: another run with the same images, labels and teachers reuses it). Either is used
    only while its key (:func:`sampling_classes_key`) matches."""
    import io

    from .._io import atomic_write

    y = np.asarray(y)
    key = sampling_classes_key(x, y, ensemble)
    shared = Path(shared_dir) / f"classes_{key}.npz" if shared_dir is not None else None
    for path in (cache, shared):
        if path is not None and Path(path).is_file():
            with np.load(path) as z:
                if "key" in z.files and str(z["key"]) == key:
                    classes = z["classes"]
                    if cache is not None and path == shared:
                        Path(cache).parent.mkdir(parents=True, exist_ok=True)
                        atomic_write(cache, Path(shared).read_bytes())
                    return classes
    classes = y.copy()
    unlabeled = np.flatnonzero(y < 0)
    if len(unlabeled):
        if verbose:
            print(f"Labelling {len(unlabeled)} training images with {ensemble} for class-balanced sampling...")
        classes[unlabeled] = ensemble.predict(x[unlabeled]).argmax(-1)
    if verbose:
        print(f"Training images per class (hard label, else the teachers'): {np.bincount(classes).tolist()}.")
    buffer = io.BytesIO()
    np.savez(buffer, key=np.array(key), classes=classes)
    for path in (cache, shared):
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, buffer.getvalue())
    return classes
