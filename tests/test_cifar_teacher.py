"""The real-valued CIFAR teacher (issue 18): residual topologies, SGD + weight decay, the
teacher recipe, and students distilling in-graph from a teacher run of another topology."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import yaml

from glt_keras import models
from glt_keras.recipe import Recipe, RecipeError, load_recipe
from glt_keras.training import precision
from glt_keras.training.distill import Distiller
from glt_keras.training.run import load_teacher, train
from glt_keras.training.schedule import decayed_kernels, make_optimizer, weight_decay_transform
from glt_keras.training.teachers import TeacherError

ROOT = Path(__file__).resolve().parents[1]
TEACHER_RECIPE = ROOT / "recipes" / "cifar10_teacher.yaml"
SGD = {"optimizer": "sgd", "momentum": 0.9, "real_lr": 0.05, "weight_decay": 5e-4, "warmup_epochs": 0}


def teacher_recipe(folder=None, *, classes=("bright", "dark"), input_shape=(16, 16, 3), **training):
    return Recipe(
        name="tiny_teacher", input_shape=input_shape, classes=list(classes),
        model={"topology": "resnet_tiny"},
        data={"train": {"folder": str(folder)}, "holdout": 0.25, "augment": {"crop": "pad", "pad": 2}} if folder else {},
        training={"epochs": 1, "batch_size": 16, **SGD, **training},
    )


def student_recipe(folder, teacher):
    return Recipe(
        name="tiny_student", input_shape=(16, 16, 3), classes=["bright", "dark"],
        model={"topology": "tiny", "levels": 4},
        data={"train": {"folder": str(folder)}, "holdout": 0.25, "augment": {"flip": True}},
        training={"epochs": 1, "batch_size": 16, "binary_lr": 1e-2, "real_lr": 1e-2},
        kd={"teacher": str(teacher), "alpha": 0.5, "temperature": 4.0},
    )


def fake_run(run_dir: Path, recipe: Recipe) -> Path:
    """A teacher run folder as training leaves it: recipe.yaml + best_weights.h5 (untrained)."""
    run_dir.mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    models.save_weights(recipe.build_model(), run_dir / "best_weights.h5")
    return run_dir


# ----------------------------------------------------------------------------- topology
def test_resnet_builds_from_a_recipe_real_valued_on_raw_pixels():
    model = teacher_recipe(input_shape=(32, 32, 3)).build_model(classifier_activation=None)
    summary = models.model_summary(model)
    assert summary["binary_params"] == 0 and summary["real_params"] == model.count_params()
    assert any(isinstance(layer, tf.keras.layers.Add) for layer in model.layers)  # residual
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype("float32")
    assert model(x).shape == (2, 2)
    with pytest.raises(tf.errors.InvalidArgumentError, match="normalised"):
        model(x / 255.0)  # pixels 0..255, normalised inside the model


def test_resnet20_size_matches_the_paper():
    summary = models.model_summary(models.build_network(topology="resnet20", input_shape=(32, 32, 3), num_classes=10))
    assert 0.26e6 < summary["params"] < 0.28e6 and 40e6 < summary["macs"] < 42e6  # He et al.: 0.27 M


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_resnet_trains_and_its_loss_decreases(policy):
    recipe = teacher_recipe(input_shape=(32, 32, 3))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (16, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 2, 16)
    with precision.policy(policy):
        model = recipe.build_model(classifier_activation=None)
        model.compile(optimizer=make_optimizer(recipe.training, 10, 1, model),
                      loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert model.output.dtype == tf.float32  # float32 logits under bfloat16 compute
    assert isinstance(model.optimizer, tf.keras.optimizers.legacy.SGD)  # no CaseOptimizer: nothing binary
    before = model.evaluate(x, y, verbose=0)
    for _ in range(5):
        model.train_on_batch(x, y)
    assert model.evaluate(x, y, verbose=0) < before


def test_weight_decay_adds_w_to_kernel_gradients_only():
    model = models.build_network(topology="resnet_tiny", input_shape=(16, 16, 3), num_classes=3)
    kernels = decayed_kernels(model)
    convs = [l for l in model.layers if isinstance(l, (tf.keras.layers.Conv2D, tf.keras.layers.Dense))]
    assert len(kernels) == len(convs) and all(v.name.endswith("kernel:0") for v in kernels)
    transform = weight_decay_transform(model, 0.1)
    pairs = [(tf.zeros_like(v), v) for v in model.trainable_variables]
    for (g, v), (g0, _) in zip(transform(pairs), pairs):
        want = 0.1 * v.numpy() if any(v is k for k in kernels) else g0.numpy()
        np.testing.assert_allclose(g.numpy(), want, rtol=1e-6)
    # A binary student decays none of its latent binary weights (only its real-valued kernels).
    binary = models.glt_net(input_shape=(16, 16, 3), num_classes=2, topology="tiny")
    assert all(getattr(v, "precision", 32) != 1 for v in decayed_kernels(binary))


@pytest.mark.parametrize("change, message", [
    (lambda d: d["model"].update(width_multiplier=2.0, topology="glt32"), r"model\.width_multiplier applies only to the residual"),
    (lambda d: d["model"].update(widths=[16, 32]), r"model\.widths does not apply to the residual topology resnet_tiny"),
    (lambda d: d["training"].update(optimizer="rmsprop"), r"training\.optimizer must be one of 'adam', 'sgd'"),
    (lambda d: d["training"].update(weight_decay=-1e-4), r"training\.weight_decay must be a number >= 0"),
    (lambda d: d["training"].update(momentum=1.0), r"training\.momentum must be a number >= 0 and < 1"),
])
def test_recipe_keys_of_the_teacher_are_checked(change, message):
    d = teacher_recipe().to_dict()
    change(d)
    with pytest.raises(RecipeError, match=message):
        Recipe(**d)


# ----------------------------------------------------------------------------- the recipe
def test_the_cifar10_teacher_recipe_and_its_student_snippet():
    recipe = load_recipe(TEACHER_RECIPE)
    assert recipe.model["topology"] == "resnet20" and recipe.training["optimizer"] == "sgd"
    assert recipe.data["holdout"] and recipe.data["test"]["split"] == "test"
    header = TEACHER_RECIPE.read_text().split("\nname:")[0]
    assert "glt-keras train recipes/cifar10_teacher.yaml --out runs/cifar10_teacher" in header
    snippet = yaml.safe_load(re.search(r"^#\s+(kd: \{teacher: runs/cifar10_teacher.*\})$", header, re.M).group(1))
    student = load_recipe("cifar10_binary").with_changes(**snippet)  # the schema takes it
    assert student.kd["teacher"] == "runs/cifar10_teacher"
    cached = yaml.safe_load(re.search(r"^#\s+(kd: \{teachers: \[\{path: runs/cifar10_teacher.*\})$", header, re.M).group(1))
    student = load_recipe("cifar10_binary").with_changes(kd={"teacher": None, **cached["kd"]})
    assert student.kd["teachers"][0]["path"] == "runs/cifar10_teacher" and student.kd["view_cache"] == 8
    assert student.classes == recipe.classes and student.input_shape == recipe.input_shape
    summary = models.model_summary(recipe.build_model())
    assert summary["binary_params"] == 0 and 1.0e6 < summary["params"] < 1.2e6


def test_a_glt32_student_distils_from_the_cifar10_teacher_in_graph(tmp_path):
    """The real pair: zoo/cifar10_binary with kd.teacher at a cifar10_teacher run folder."""
    run = fake_run(tmp_path / "cifar10_teacher", load_recipe(TEACHER_RECIPE))
    student_recipe_ = load_recipe("cifar10_binary").with_changes(kd={"teacher": str(run)})
    teacher = load_teacher(student_recipe_, verbose=0)
    assert teacher.name == "cifar10_teacher" and not teacher.trainable and teacher.output_shape == (None, 10)
    distiller = Distiller(student_recipe_.build_model(classifier_activation=None), teacher, alpha=0.5, temperature=4.0)
    distiller.compile(optimizer=tf.keras.optimizers.legacy.Adam(1e-3))
    x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)).astype("float32")
    assert np.isfinite(distiller.train_on_batch(x, np.arange(4)))


# ----------------------------------------------------------------------------- runs
class Trainer(tf.keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.trainer = self.model


def test_teacher_run_resumes_and_a_student_distils_from_it(tmp_path, image_folder):
    teacher_dir = tmp_path / "teacher"
    train(teacher_recipe(image_folder), out_dir=teacher_dir, verbose=0)
    summary = train(teacher_recipe(image_folder, epochs=2), out_dir=teacher_dir, verbose=0, resume=True)
    assert summary["epochs"] == 2 and summary["sessions"] == 2
    reader = tf.train.load_checkpoint(str(teacher_dir / "checkpoints/epoch_2/ckpt"))
    names = reader.get_variable_to_shape_map()
    assert reader.get_tensor("optimizer/iter/.ATTRIBUTES/VARIABLE_VALUE") == 2 * (72 // 16)
    assert any("/momentum/" in k for k in names)  # SGD's momentum came back with the run

    seen = Trainer()
    train(student_recipe(image_folder, teacher_dir), out_dir=tmp_path / "student", verbose=0,
          steps_per_epoch=1, callbacks=[seen])
    assert isinstance(seen.trainer, Distiller)
    assert seen.trainer.teacher.name == "tiny_teacher"  # the run's own topology, not the student's twin
    assert (tmp_path / "student" / "best_weights.h5").exists()


@pytest.mark.parametrize("kwargs, message", [
    (dict(classes=("bright", "dark", "grey")), r"the teacher has 3 classes \(bright, dark, grey\), the student tiny_student has 2"),
    (dict(input_shape=(32, 32, 3)), r"the teacher takes \[32, 32, 3\] images, the student tiny_student \[16, 16, 3\]"),
])
def test_a_teacher_that_does_not_fit_is_a_one_line_error_naming_the_file(tmp_path, image_folder, kwargs, message):
    run = fake_run(tmp_path / "teacher", teacher_recipe(**kwargs))
    with pytest.raises(TeacherError, match=message) as err:
        train(student_recipe(image_folder, run), out_dir=tmp_path / "student", verbose=0)
    assert str(run / "best_weights.h5") in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "student").exists()  # refused before anything was written


def test_a_teacher_run_without_weights_is_a_clear_error(tmp_path, image_folder):
    (tmp_path / "teacher").mkdir()
    with pytest.raises(FileNotFoundError, match=r"teacher weights .*best_weights\.h5 not found"):
        train(student_recipe(image_folder, tmp_path / "teacher"), out_dir=tmp_path / "student", verbose=0)


def test_a_teacher_run_folder_serves_as_a_teacher_file(tmp_path):
    """kd.teachers accepts a run folder (for the view cache and mixup): the teacher computes
    what the run's own Keras network computes, and its identity follows its weights."""
    from glt_keras.training.teachers import load_teachers

    recipe = teacher_recipe()
    run = fake_run(tmp_path / "teacher", recipe)
    ensemble = load_teachers([{"path": str(run), "input_range": [0, 255]}], classes=recipe.classes)
    x = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3)).astype(np.float32)
    keras_model = recipe.build_model()
    models.load_weights(keras_model, run / "best_weights.h5")
    np.testing.assert_allclose(ensemble.predict(x), keras_model.predict(x, verbose=0), atol=1e-5)
    before = ensemble.teachers[0].sha256
    tf.keras.utils.set_random_seed(1)
    models.save_weights(recipe.build_model(), run / "best_weights.h5")  # the run went on: other weights
    assert load_teachers([str(run)], classes=recipe.classes).teachers[0].sha256 != before
    (run / "best_weights.h5").unlink()
    with pytest.raises(TeacherError, match=r"run folder used as a teacher needs best_weights\.h5"):
        load_teachers([str(run)], classes=recipe.classes)
