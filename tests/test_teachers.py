"""Teachers from files: loading and checking, probabilities, consistent views, the loss, a run."""
import numpy as np
import pytest
import tensorflow as tf

from glt_keras.data import make_dataset
from glt_keras.recipe import Recipe
from glt_keras.training.distill import TargetDistiller, soft_target_loss
from glt_keras.training.run import train
from glt_keras.training.teachers import TeacherError, load_teachers, with_teacher_targets

CLASSES = ["dark", "bright"]


def _keras_teacher(size=12, classes=2, logits=False):
    """A fixed 'brightness' classifier: score = +-(mean(x) - 0.5) * 8, on pixels / 255."""
    inputs = tf.keras.Input((size, size, 3))
    mean = tf.keras.layers.GlobalAveragePooling2D()(inputs)
    dense = tf.keras.layers.Dense(classes)
    out = dense(mean)
    if not logits:
        out = tf.keras.layers.Softmax()(out)
    model = tf.keras.Model(inputs, out)
    kernel = np.zeros((3, classes), np.float32)
    kernel[:, -1], kernel[:, 0] = 8 / 3, -8 / 3
    bias = np.zeros(classes, np.float32)
    bias[-1], bias[0] = -4.0, 4.0
    dense.set_weights([kernel, bias])
    return model


def _write_tflite(model, path, *, uint8=False):
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if uint8:
        rng = np.random.default_rng(0)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([rng.uniform(0, 1, (1,) + model.input_shape[1:]).astype("float32")]
                                                    for _ in range(32))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.uint8
    path.write_bytes(converter.convert())
    return path


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    model = _keras_teacher()
    model.save(root / "teacher.h5")
    return {
        "keras": model,
        "float": _write_tflite(model, root / "teacher.tflite"),
        "uint8": _write_tflite(model, root / "teacher_uint8.tflite", uint8=True),
        "logits": _write_tflite(_keras_teacher(logits=True), root / "logits.tflite"),
        "three": _write_tflite(_keras_teacher(classes=3), root / "three.tflite"),
        "h5": root / "teacher.h5",
        "root": root,
    }


def _pixels(n=8, size=12, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


def test_float_teacher_gives_the_models_probabilities(teacher_files):
    x = _pixels()
    want = teacher_files["keras"].predict(x / 255.0, verbose=0)
    got = load_teachers([{"path": str(teacher_files["float"]), "input_range": [0, 1]}], classes=CLASSES).predict(x)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_logits_teacher_and_uint8_teacher_agree_with_float(teacher_files):
    x = _pixels(seed=1)
    want = teacher_files["keras"].predict(x / 255.0, verbose=0)
    logits = load_teachers([{"path": str(teacher_files["logits"]), "output": "logits"}], classes=CLASSES)
    np.testing.assert_allclose(logits.predict(x), want, atol=1e-5)
    quantized = load_teachers([str(teacher_files["uint8"])], classes=CLASSES)
    assert quantized.teachers[0]._input["dtype"] == np.uint8  # really quantized
    np.testing.assert_allclose(quantized.predict(x), want, atol=0.03)


def test_keras_file_teacher(teacher_files):
    x = _pixels(seed=2)
    want = teacher_files["keras"].predict(x / 255.0, verbose=0)
    np.testing.assert_allclose(load_teachers([str(teacher_files["h5"])], classes=CLASSES).predict(x), want, atol=1e-5)


def test_teacher_resizes_to_its_input_and_maps_classes(teacher_files):
    x = _pixels(size=24, seed=3)  # the teacher takes 12x12
    straight = load_teachers([str(teacher_files["float"])], classes=CLASSES).predict(x)
    swapped = load_teachers([{"path": str(teacher_files["float"]), "classes": ["bright", "dark"]}],
                            classes=CLASSES).predict(x)
    np.testing.assert_allclose(swapped, straight[:, ::-1], atol=1e-6)
    bright = np.full((1, 24, 24, 3), 250.0, np.float32)
    assert load_teachers([str(teacher_files["float"])], classes=CLASSES).predict(bright)[0, 1] > 0.9


def test_ensemble_is_the_weighted_average(teacher_files):
    x = _pixels(seed=4)
    a = load_teachers([str(teacher_files["float"])], classes=CLASSES).predict(x)
    b = load_teachers([{"path": str(teacher_files["float"]), "classes": ["bright", "dark"]}], classes=CLASSES).predict(x)
    both = load_teachers([{"path": str(teacher_files["float"]), "weight": 3},
                          {"path": str(teacher_files["float"]), "classes": ["bright", "dark"]}], classes=CLASSES)
    np.testing.assert_allclose(both.predict(x), 0.75 * a + 0.25 * b, atol=1e-6)


@pytest.mark.parametrize("spec, message", [
    ({"path": "nowhere/teacher.tflite"}, "file not found"),
    ({"path": "{root}/corrupt.tflite"}, "not a readable TFLite model"),
    ({"path": "{root}/corrupt.h5"}, "not a loadable Keras model"),
    ({"path": "{three}"}, "output shape"),
    ({"path": "{float}", "output": "odds"}, "output must be one of"),
    ({"path": "{float}", "input_range": [1, 0]}, "input_range"),
    ({"path": "{float}", "classes": ["dark", "cat"]}, "not among the recipe's"),
    ({"path": "{float}", "weight": 0}, "weight must be > 0"),
    ({"path": "{float}", "size": 3}, "unknown keys"),
])
def test_bad_teacher_is_named_before_training(teacher_files, spec, message):
    root = teacher_files["root"]
    (root / "corrupt.tflite").write_bytes(b"not a flatbuffer" * 10)
    (root / "corrupt.h5").write_bytes(b"not hdf5" * 10)
    spec = {k: v.format(root=root, three=teacher_files["three"], float=teacher_files["float"])
            if isinstance(v, str) else v for k, v in spec.items()}
    with pytest.raises(TeacherError, match=message) as err:
        load_teachers([spec], classes=CLASSES)
    assert "teacher" in str(err.value)


def test_teacher_with_a_non_image_input_is_refused(tmp_path):
    inputs = tf.keras.Input((5,))
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(2, activation="softmax")(inputs))
    path = _write_tflite(model, tmp_path / "vector.tflite")
    with pytest.raises(TeacherError, match=r"not \(batch, height, width, 3\)"):
        load_teachers([str(path)], classes=CLASSES)


def test_teachers_see_the_augmented_view_the_student_sees(teacher_files):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (32, 16, 16, 3)).astype(np.uint8)
    y = np.full(32, -1, np.int32)
    ensemble = load_teachers([str(teacher_files["float"])], classes=CLASSES)
    ds = make_dataset(x, y, batch_size=8, training=True, image_size=(12, 12), crop="random_resized",
                      brightness=40.0, contrast=0.3, seed=3)
    for images, (labels, probs) in with_teacher_targets(ds, ensemble).take(3):
        np.testing.assert_array_equal(labels.numpy(), -1)
        # The same images, labelled again outside the pipeline: the targets describe this view.
        np.testing.assert_allclose(probs.numpy(), ensemble.predict(images.numpy()), atol=1e-6)


def test_soft_target_loss_by_hand_and_unlabelled_images():
    s = np.array([[2.0, -1.0], [0.5, 0.3], [-1.0, 1.0]], np.float32)
    p = np.array([[0.8, 0.2], [0.3, 0.7], [0.5, 0.5]], np.float32)
    y = np.array([0, -1, 1])
    alpha, temp = 0.3, 2.0

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    pt = softmax(np.log(p) / temp)
    ps = softmax(s / temp)
    kl = (pt * (np.log(pt) - np.log(ps))).sum(-1)
    ce = -np.log(softmax(s)[np.arange(3), np.maximum(y, 0)]) * (y >= 0)
    want = np.mean(alpha * ce + (1 - alpha) * temp ** 2 * kl)
    got = soft_target_loss(y, s, p, alpha=alpha, temperature=temp)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_target_distiller_learns_the_teacher_without_labels():
    from glt_keras import models

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (64, 16, 16, 3)).astype("float32")
    bright = (x.mean((1, 2, 3)) > 127.5).astype("float32")
    probs = np.stack([1 - bright, bright], 1) * 0.9 + 0.05
    student = models.glt_net(input_shape=(16, 16, 3), num_classes=2, topology="tiny", levels=4,
                             classifier_activation=None)
    distiller = TargetDistiller(student, alpha=0.0, temperature=1.0)
    distiller.compile(optimizer=tf.keras.optimizers.legacy.Adam(1e-2),
                      metrics=[tf.keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    ds = tf.data.Dataset.from_tensor_slices((x, (np.full(64, -1, np.int32), probs))).batch(16)
    before = distiller.evaluate(x, bright.astype("int32"), verbose=0, return_dict=True)
    distiller.fit(ds.repeat(), steps_per_epoch=20, epochs=3, verbose=0)
    after = distiller.evaluate(x, bright.astype("int32"), verbose=0, return_dict=True)
    assert after["loss"] < before["loss"]


def test_run_with_teacher_files_and_teacher_labelled_source(image_folder, teacher_files, tmp_path):
    recipe = Recipe(
        name="tiny_teachers", input_shape=(16, 16, 3), classes=["bright", "dark"],  # the folder's order
        model={"topology": "tiny", "levels": 4},
        data={"train": [{"folder": str(image_folder)},
                        {"folder": str(image_folder), "labels": "teacher"}],
              "holdout": 0.25, "augment": {"crop": "random_resized", "flip": True}},
        training={"epochs": 2, "batch_size": 16, "select_smoothing": 2},
        kd={"teachers": [{"path": str(teacher_files["float"]), "classes": CLASSES}], "alpha": 0.2, "temperature": 1.0},
    )
    summary = train(recipe, out_dir=tmp_path / "run", steps_per_epoch=3, verbose=0)
    assert summary["epochs"] == 2 and "best_val_accuracy_smooth" in summary
    history = (tmp_path / "run" / "history.csv").read_text().splitlines()
    header = history[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in history[1:]]
    assert float(rows[1]["val_accuracy_smooth"]) == pytest.approx(
        (float(rows[0]["val_accuracy"]) + float(rows[1]["val_accuracy"])) / 2)
    assert (tmp_path / "run" / "best_weights.h5").exists()


def test_run_refuses_a_bad_teacher_before_writing_anything(image_folder, tmp_path):
    recipe = Recipe(name="tiny_bad_teacher", input_shape=(16, 16, 3), classes=CLASSES,
                    model={"topology": "tiny", "levels": 4}, data={"train": {"folder": str(image_folder)}},
                    kd={"teachers": [{"path": str(tmp_path / "missing.tflite")}]})
    with pytest.raises(TeacherError, match="missing.tflite"):
        train(recipe, out_dir=tmp_path / "run", verbose=0)
    assert not (tmp_path / "run").exists()


def test_teacher_labelled_images_need_a_teacher_and_no_balance(image_folder, teacher_files, tmp_path):
    base = dict(name="tiny_unlabelled", input_shape=(16, 16, 3), classes=["bright", "dark"],
                model={"topology": "tiny", "levels": 4})
    no_teacher = Recipe(**base, data={"train": {"folder": str(image_folder), "labels": "teacher"}})
    with pytest.raises(ValueError, match="names no teacher"):
        train(no_teacher, out_dir=tmp_path / "a", verbose=0)
    balanced = Recipe(**base, data={"train": {"folder": str(image_folder), "labels": "teacher"}, "balance": True},
                      kd={"teachers": [{"path": str(teacher_files["float"]), "classes": CLASSES}]})
    with pytest.raises(ValueError, match="use balance: teacher"):
        train(balanced, out_dir=tmp_path / "b", verbose=0)


def test_sampling_classes_use_hard_labels_then_the_teachers_and_are_cached(teacher_files, tmp_path, monkeypatch):
    from glt_keras.training.teachers import sampling_classes

    x = np.concatenate([np.full((3, 12, 12, 3), 240, np.uint8), np.full((3, 12, 12, 3), 10, np.uint8)])
    y = np.array([0, -1, -1, 1, -1, -1])  # hard labels win over the (brightness) teacher
    ensemble = load_teachers([str(teacher_files["float"])], classes=CLASSES)  # 0 dark, 1 bright
    cache = tmp_path / "classes.npz"
    got = sampling_classes(x, y, ensemble, cache=cache, verbose=0)
    assert got.tolist() == [0, 1, 1, 1, 0, 0] and cache.exists()
    monkeypatch.setattr(type(ensemble), "predict", lambda *a, **k: pytest.fail("cache not used"))
    assert sampling_classes(x, y, ensemble, cache=cache, verbose=0).tolist() == got.tolist()
    with pytest.raises(pytest.fail.Exception, match="cache not used"):  # other images: labelled again
        sampling_classes(x[:5], y[:5], ensemble, cache=cache, verbose=0)
    with pytest.raises(pytest.fail.Exception, match="cache not used"):  # other hard labels: again
        sampling_classes(x, np.array([0, -1, -1, 1, -1, 0]), ensemble, cache=cache, verbose=0)


def test_sampling_classes_are_shared_between_runs_with_the_same_images_and_teachers(teacher_files, tmp_path,
                                                                                     monkeypatch):
    from glt_keras.training.teachers import sampling_classes

    x = np.concatenate([np.full((3, 12, 12, 3), 240, np.uint8), np.full((3, 12, 12, 3), 10, np.uint8)])
    y = np.array([0, -1, -1, 1, -1, -1])
    shared = tmp_path / "teacher_views"
    ensemble = load_teachers([str(teacher_files["float"])], classes=CLASSES)
    got = sampling_classes(x, y, ensemble, cache=tmp_path / "run1" / "classes.npz", shared_dir=shared, verbose=0)
    assert len(list(shared.glob("classes_*.npz"))) == 1
    predict = type(ensemble).predict
    monkeypatch.setattr(type(ensemble), "predict", lambda *a, **k: pytest.fail("labelled again"))
    # A second run folder with the same images, labels and teachers: copied from the shared file.
    again = sampling_classes(x, y, ensemble, cache=tmp_path / "run2" / "classes.npz", shared_dir=shared, verbose=0)
    assert again.tolist() == got.tolist() and (tmp_path / "run2" / "classes.npz").exists()
    # Other teachers (here: the same file weighted with a second one) never take these classes.
    both = load_teachers([str(teacher_files["float"]), str(teacher_files["float"])], classes=CLASSES)
    with pytest.raises(pytest.fail.Exception, match="labelled again"):
        sampling_classes(x, y, both, cache=tmp_path / "run1" / "classes.npz", shared_dir=shared, verbose=0)
    monkeypatch.setattr(type(ensemble), "predict", predict)
    # A cache file of the earlier format (no key) is labelled again, not trusted.
    old = tmp_path / "old.npz"
    np.savez(old, fingerprint=np.array([6, 0]), classes=np.zeros(6, int))
    assert sampling_classes(x, y, ensemble, cache=old, verbose=0).tolist() == got.tolist()


def test_make_dataset_balances_on_given_classes():
    x = np.zeros((100, 4, 4, 3), np.uint8)
    x[:10] = 255  # 10 of one class, 90 of the other, by balance_by (y says nothing)
    ds = make_dataset(x, np.full(100, -1, np.int32), batch_size=100, training=True, balance=True,
                      balance_by=(x[:, 0, 0, 0] > 0).astype(int), flip=False, seed=0)
    images, labels = next(iter(ds))
    share = float((images.numpy()[:, 0, 0, 0] > 0).mean())
    assert 0.35 < share < 0.65 and (labels.numpy() == -1).all()


def test_card_reports_each_teacher_and_their_average(teacher_files):
    from glt_keras.training.run import Splits
    from glt_keras.zoo_cli import teacher_scores

    x = np.concatenate([np.full((3, 12, 12, 3), 240, np.uint8), np.full((1, 12, 12, 3), 10, np.uint8)])
    y = np.array([1, 1, 0, 0])  # the brightness teacher gets 3 of 4
    swapped = {"path": str(teacher_files["float"]), "classes": ["bright", "dark"]}  # gets 1 of 4
    recipe = Recipe(name="t", input_shape=(12, 12, 3), classes=CLASSES, model={"topology": "tiny"},
                    kd={"teachers": [str(teacher_files["float"]), swapped]})
    scores = teacher_scores(recipe, Splits(train=(x, y), val=(x, y), test=None, class_names=CLASSES))
    assert list(scores.values())[0] == {"val": 0.75} and list(scores.values())[1] == {"val": 0.25}
    assert len(scores) == 3 and " + " in list(scores)[2]
