"""The per-view teacher cache (kd.view_cache): fixed views, the teachers' outputs on exactly
those pixels, resumable fills, keys that change with what decides the views, and a run that
trains without running a teacher."""
import json

import numpy as np
import pytest
import tensorflow as tf
import yaml

from glt_keras.data import make_dataset, make_views, view_params
from glt_keras.recipe import Recipe, RecipeError
from glt_keras.training import view_cache as vc
from glt_keras.training.teachers import FileTeacher, TeacherEnsemble, load_teachers
from test_teachers import CLASSES, _keras_teacher, _write_tflite

N, K = 12, 3
AUGMENT = {"crop": "random_resized", "flip": True, "brightness": 30.0, "contrast": 0.3}


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    return _write_tflite(_keras_teacher(), tmp_path_factory.mktemp("view_teachers") / "teacher.tflite")


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (N, 16, 16, 3)).astype(np.uint8)


def _recipe(teacher, *, views=K, augment=AUGMENT, seed=0, size=10):
    # 10x10 student views of 16x16 images; the 12x12 teacher gets them resized.
    return Recipe(name="tiny_views", input_shape=(size, size, 3), classes=CLASSES, model={"topology": "tiny"},
                  data={"train": {"folder": "unused"}, "augment": dict(augment)}, training={"seed": seed},
                  kd={"teachers": [str(teacher)], "view_cache": views})


def _all_views(x, recipe, views=K):
    """Every view (i, k) of x as an array (N, K, h, w, 3), built by make_views."""
    s = vc.view_settings(recipe)
    ii, kk = np.repeat(np.arange(len(x)), views), np.tile(np.arange(views), len(x))
    out = np.concatenate([b.numpy() for b in make_views(x, ii, kk, batch_size=7, seed=s["seed"],
                                                        image_size=s["image_size"], **s["augment"])])
    return out.reshape((len(x), views) + out.shape[1:])


def _pipeline(x, recipe, probs, batch_size=4):
    s = vc.view_settings(recipe)
    return make_dataset(x, np.arange(len(x), dtype=np.int32), batch_size=batch_size, training=True,
                        image_size=s["image_size"], seed=s["seed"], drop_remainder=True, view_targets=probs,
                        **s["augment"])


def _which_view(views, i, image):
    """The k whose view (i, k) is pixel for pixel ``image`` (exactly one)."""
    matches = [k for k in range(views.shape[1]) if np.array_equal(views[i, k], image)]
    assert len(matches) == 1, f"image {i}: matches views {matches}"
    return matches[0]


def test_the_pipeline_yields_the_views_the_teachers_labelled(teacher_file, images, tmp_path, monkeypatch):
    recipe = _recipe(teacher_file)
    ensemble = load_teachers(recipe.kd["teachers"], classes=CLASSES)
    labelled = []  # every batch the fill gave the teachers
    predict = TeacherEnsemble.predict
    monkeypatch.setattr(TeacherEnsemble, "predict",
                        lambda self, x, **kw: labelled.append(np.array(x)) or predict(self, x, **kw))
    monkeypatch.setattr(vc, "CHUNK_VIEWS", 9)  # 3 images a chunk: 4 chunks on 2 workers
    cache = vc.ensure_view_cache(recipe, images, ensemble, cache_dir=tmp_path, workers=2, verbose=0)
    monkeypatch.setattr(TeacherEnsemble, "predict", predict)
    assert cache.probs.shape == (N, K, 2) and len(labelled) == 4
    views = _all_views(images, recipe)
    # The fill labelled each view (i, k) once, these very pixels.
    index = {views[i, k].tobytes(): (i, k) for i in range(N) for k in range(K)}
    assert len(index) == N * K
    assert sorted(index[v.tobytes()] for batch in labelled for v in batch) == sorted(index.values())
    np.testing.assert_allclose(cache.probs.reshape(N * K, 2), ensemble.predict(views.reshape((N * K,) + views.shape[2:])),
                               atol=1e-6)
    for batch, (labels, targets) in _pipeline(images, recipe, cache.probs).take(6):
        batch, labels, targets = batch.numpy(), labels.numpy(), targets.numpy()
        for image, i, target in zip(batch, labels, targets):
            np.testing.assert_array_equal(target, cache.probs[i, _which_view(views, i, image)])
        # The teachers, run on the yielded images, give the yielded targets.
        np.testing.assert_allclose(targets, ensemble.predict(batch), atol=1e-6)


def test_views_differ_across_k_and_stay_the_same_across_epochs_and_runs(teacher_file, images):
    recipe = _recipe(teacher_file)
    views = _all_views(images, recipe)
    for i in range(N):  # augmentation still happens: the K views of an image differ
        assert all(not np.array_equal(views[i, a], views[i, b]) for a in range(K) for b in range(a))
    probs = np.random.default_rng(1).random((N, K, 2)).astype(np.float32)
    first = [(b.numpy(), t.numpy()) for b, (_, t) in _pipeline(images, recipe, probs).repeat().take(12)]
    again = [(b.numpy(), t.numpy()) for b, (_, t) in _pipeline(images, recipe, probs).repeat().take(12)]
    for (a, ta), (b, tb) in zip(first, again):  # another run: the same stream
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ta, tb)
    picked = {}
    labels = [l.numpy() for _, (l, _) in _pipeline(images, recipe, probs).repeat().take(12)]
    for (batch, _), ls in zip(first, labels):  # 4 epochs: every image is one of its K fixed views
        for image, i in zip(batch, ls):
            picked.setdefault(int(i), set()).add(_which_view(views, i, image))
    assert max(len(ks) for ks in picked.values()) > 1  # k is drawn anew
    # View (i, k) is a function of (seed, i, k) alone: not of the number of images or views.
    alone = view_params(0, [5], [2], **AUGMENT)
    table = view_params(0, np.repeat(np.arange(N), K), np.tile(np.arange(K), N), **AUGMENT)
    np.testing.assert_array_equal(alone[0], table[5 * K + 2])
    assert not np.array_equal(view_params(1, [5], [2], **AUGMENT), alone)


def test_mixup_views_are_blends_of_two_views_that_only_the_teachers_label(teacher_file, images, tmp_path):
    recipe = _recipe(teacher_file, augment={**AUGMENT, "mixup": 0.5})
    plain, views = _all_views(images, _recipe(teacher_file)), _all_views(images, recipe)
    params = view_params(0, np.repeat(np.arange(N), K), np.tile(np.arange(K), N), mixup=0.5, n_images=N, **AUGMENT)
    blended = params[:, 7].reshape(N, K) > 0.5
    assert 0 < blended.mean() < 1
    for i in range(N):
        for k in range(K):
            if not blended[i, k]:  # the other views are the views without mixup
                np.testing.assert_array_equal(views[i, k], plain[i, k])
                continue
            lam, j = params[i * K + k, 8], int(params[i * K + k, 9])
            assert j != i and not np.array_equal(views[i, k], plain[i, k])
            np.testing.assert_allclose(views[i, k], lam * plain[i, k] + (1 - lam) * plain[j, k], atol=1e-3)
    ensemble = load_teachers(recipe.kd["teachers"], classes=CLASSES)
    cache = vc.ensure_view_cache(recipe, images, ensemble, cache_dir=tmp_path, workers=1, verbose=0)
    np.testing.assert_allclose(cache.probs.reshape(N * K, 2), ensemble.predict(views.reshape((N * K,) + views.shape[2:])),
                               atol=1e-6)
    index = {views[i, k].tobytes(): (i, k) for i in range(N) for k in range(K)}
    seen = set()
    for batch, (labels, targets) in _pipeline(images, recipe, cache.probs).repeat().take(12):
        for image, label, target in zip(batch.numpy(), labels.numpy(), targets.numpy()):
            i, k = index[image.tobytes()]  # every yielded image is one of the fixed views
            seen.add(bool(blended[i, k]))
            # A blend has no hard label (-1); an unblended view keeps its own (here: its index).
            assert label == (-1 if blended[i, k] else i)
            np.testing.assert_array_equal(target, cache.probs[i, k])
    assert seen == {True, False}


def _quadrants(views):
    """The 2x2 mosaic of four float views (h, w, 3), each area-shrunk to its quadrant."""
    h, w = views[0].shape[:2]
    rows, cols = (h // 2, h - h // 2), (w // 2, w - w // 2)
    small = [tf.image.resize(v[None], (rows[j // 2], cols[j % 2]), method="area")[0].numpy()
             for j, v in enumerate(views)]
    return np.concatenate([np.concatenate(small[:2], axis=1), np.concatenate(small[2:], axis=1)], axis=0)


def test_mosaic_views_tile_four_views_never_blend_and_only_the_teachers_label(teacher_file, images, tmp_path):
    recipe = _recipe(teacher_file, augment={**AUGMENT, "mixup": 0.5, "mosaic": 0.4})
    plain, views = _all_views(images, _recipe(teacher_file)), _all_views(images, recipe)
    params = view_params(0, np.repeat(np.arange(N), K), np.tile(np.arange(K), N), mixup=0.5, mosaic=0.4,
                         n_images=N, **AUGMENT)
    tiled, blended = params[:, 10].reshape(N, K) > 0.5, params[:, 7].reshape(N, K) > 0.5
    assert 0 < tiled.mean() < 1 and blended.any() and not (tiled & blended).any()
    # Adding mosaic leaves the blends of a mixup-only recipe as they were (and their cached targets valid).
    mixup_only = view_params(0, np.repeat(np.arange(N), K), np.tile(np.arange(K), N), mixup=0.5, n_images=N,
                             **AUGMENT)
    np.testing.assert_array_equal(mixup_only[:, :10][~tiled.ravel()], params[:, :10][~tiled.ravel()])
    for i in range(N):
        for k in range(K):
            row = params[i * K + k]
            if tiled[i, k]:  # the view's own plain view top left, then view k of its three partners
                partners = [int(j) for j in row[11:14]]
                assert i not in partners
                np.testing.assert_allclose(views[i, k], _quadrants([plain[i, k]] + [plain[j, k] for j in partners]),
                                           atol=1e-3)
            elif not blended[i, k]:
                np.testing.assert_array_equal(views[i, k], plain[i, k])
    ensemble = load_teachers(recipe.kd["teachers"], classes=CLASSES)
    cache = vc.ensure_view_cache(recipe, images, ensemble, cache_dir=tmp_path, workers=1, verbose=0)
    index = {views[i, k].tobytes(): (i, k) for i in range(N) for k in range(K)}
    seen = set()
    for batch, (labels, targets) in _pipeline(images, recipe, cache.probs).repeat().take(16):
        for image, label, target in zip(batch.numpy(), labels.numpy(), targets.numpy()):
            i, k = index[image.tobytes()]  # the training stream yields the very pixels the teachers labelled
            seen.add(bool(tiled[i, k]))
            assert label == (-1 if tiled[i, k] or blended[i, k] else i)
            np.testing.assert_array_equal(target, cache.probs[i, k])
    assert seen == {True, False}


def test_live_mosaic_tiles_a_fraction_of_each_batch_from_its_next_three_images():
    x = np.random.default_rng(0).integers(0, 256, (32, 8, 8, 3)).astype(np.uint8)
    y = np.arange(32, dtype=np.int32)
    sources = {im.tobytes(): i for i, im in enumerate(x.astype(np.float32))}
    for p, lo, hi in ((0.0, 0, 0), (0.5, 0.25, 0.75), (1.0, 1, 1)):
        ds = make_dataset(x, y, batch_size=8, training=True, seed=3, drop_remainder=True, flip=False, mosaic=p)
        labels = []
        for images, batch_labels in ds.repeat().take(8):
            images, batch_labels = images.numpy(), batch_labels.numpy()
            labels += batch_labels.tolist()
            for image, label in zip(images, batch_labels):
                if label != -1:  # untouched: its source image
                    assert sources[image.tobytes()] == label
        tiled = np.array(labels) == -1
        assert lo <= tiled.mean() <= hi, p
    # The quadrants of a mosaic are shrunk images of the set: each is some image of x, area-averaged.
    ds = make_dataset(x, y, batch_size=8, training=True, seed=3, drop_remainder=True, flip=False, mosaic=1.0)
    images, _ = next(iter(ds))
    small = {tuple(_quadrants([im] * 4)[:4, :4].ravel().round(3)) for im in x.astype(np.float32)}
    for image in images.numpy():
        for qy in (0, 4):
            for qx in (0, 4):
                assert tuple(image[qy:qy + 4, qx:qx + 4].ravel().round(3)) in small
    with pytest.raises(ValueError, match="mosaic must be a fraction"):
        make_dataset(x, y, batch_size=8, training=True, mosaic=-0.1)


def test_mosaic_needs_teacher_files():
    base = dict(name="r", input_shape=(8, 8, 3), classes=CLASSES, model={"topology": "tiny"})
    with pytest.raises(RecipeError, match="data.augment.mosaic tiles four images"):
        Recipe(**base, data={"train": {"folder": "x"}, "augment": {"mosaic": 0.5}})
    Recipe(**base, data={"train": {"folder": "x"}, "augment": {"mosaic": 0.5}}, kd={"teachers": ["t.tflite"]})


def test_live_mixup_blends_a_fraction_of_each_batch_and_drops_their_labels():
    x = np.random.default_rng(0).integers(0, 256, (32, 8, 8, 3)).astype(np.uint8)
    y = np.arange(32, dtype=np.int32)
    sources = {im.tobytes() for im in x.astype(np.float32)}
    for p, lo, hi in ((0.0, 0, 0), (0.5, 0.25, 0.75), (1.0, 1, 1)):
        ds = make_dataset(x, y, batch_size=8, training=True, seed=3, drop_remainder=True, flip=False, mixup=p)
        labels, unchanged = [], []
        for images, batch_labels in ds.repeat().take(8):
            labels += batch_labels.numpy().tolist()
            unchanged += [im.tobytes() in sources for im in images.numpy()]
        blended = np.array(labels) == -1
        assert lo <= blended.mean() <= hi, p
        # Exactly the blended images are new pixels; the others are their source images.
        np.testing.assert_array_equal(~blended, np.array(unchanged))
    with pytest.raises(ValueError, match="mixup must be a fraction"):
        make_dataset(x, y, batch_size=8, training=True, mixup=1.5)


def test_mixup_needs_teacher_files():
    base = dict(name="r", input_shape=(8, 8, 3), classes=CLASSES, model={"topology": "tiny"})
    with pytest.raises(RecipeError, match="data.augment.mixup blends two images"):
        Recipe(**base, data={"train": {"folder": "x"}, "augment": {"mixup": 0.5}})
    with pytest.raises(RecipeError, match=r"mixup must be a number >= 0 and <= 1"):
        Recipe(**base, data={"train": {"folder": "x"}, "augment": {"mixup": 2}}, kd={"teachers": ["t.tflite"]})
    Recipe(**base, data={"train": {"folder": "x"}, "augment": {"mixup": 0.5}}, kd={"teachers": ["t.tflite"]})


def test_an_interrupted_fill_resumes_to_the_same_cache(teacher_file, images, tmp_path, monkeypatch):
    recipe = _recipe(teacher_file)
    ensemble = load_teachers(recipe.kd["teachers"], classes=CLASSES)
    monkeypatch.setattr(vc, "CHUNK_VIEWS", 6)  # 2 images a chunk: 6 chunks
    whole = vc.ensure_view_cache(recipe, images, ensemble, cache_dir=tmp_path / "whole", workers=1, verbose=0)

    predict, calls = FileTeacher.predict, []

    def killed_at_the_third_chunk(self, x):
        calls.append(len(x))
        if len(calls) >= 3:
            raise RuntimeError("killed")
        return predict(self, x)

    monkeypatch.setattr(FileTeacher, "predict", killed_at_the_third_chunk)
    with pytest.raises(RuntimeError, match="killed"):
        vc.ensure_view_cache(recipe, images, ensemble, cache_dir=tmp_path / "resumed", workers=1, verbose=0)
    assert not list((tmp_path / "resumed").glob("*.npz"))  # no final file from a broken fill
    assert len(list((tmp_path / "resumed").glob("*.parts/*.npy"))) == 2
    calls.clear()
    monkeypatch.setattr(FileTeacher, "predict", lambda self, x: calls.append(len(x)) or predict(self, x))
    resumed = vc.ensure_view_cache(recipe, images, ensemble, cache_dir=tmp_path / "resumed", workers=2, verbose=0)
    assert len(calls) == 4  # only the chunks that were missing
    # The fill's cost adds up over its calls (the killed one included).
    assert json.loads(resumed.path.with_suffix(".json").read_text())["fill_seconds"] > 0
    assert resumed.path.name == whole.path.name and not list((tmp_path / "resumed").glob("*.parts"))
    np.testing.assert_array_equal(resumed.probs, whole.probs)
    calls.clear()
    again = vc.ensure_view_cache(recipe, images, ensemble, cache_dir=tmp_path / "resumed", verbose=0)
    assert calls == [] and np.array_equal(again.probs, whole.probs)  # a complete cache is read, not filled


def test_the_key_changes_with_everything_that_decides_views_and_targets(teacher_file, images, tmp_path, capsys):
    teacher = tmp_path / "teacher.tflite"
    teacher.write_bytes(teacher_file.read_bytes())
    recipe = _recipe(teacher)

    def meta(recipe=recipe, x=images, views=K):
        ensemble = load_teachers(recipe.kd["teachers"], classes=CLASSES)
        return vc.cache_meta(x, ensemble, views, vc.view_settings(recipe))

    base = meta()
    changed_pixel = images.copy()
    changed_pixel[3, 4, 5, 1] ^= 1
    variants = {
        "augment.brightness": meta(_recipe(teacher, augment={**AUGMENT, "brightness": 20.0})),
        "augment.crop": meta(_recipe(teacher, augment={**AUGMENT, "crop": "pad"})),
        "seed": meta(_recipe(teacher, seed=1)),
        "image_size": meta(_recipe(teacher, size=12)),
        "views": meta(views=K + 1),
        "images.sha256": meta(x=changed_pixel),
        "augment.mixup": meta(_recipe(teacher, augment={**AUGMENT, "mixup": 0.5})),
        "augment.mosaic": meta(_recipe(teacher, augment={**AUGMENT, "mosaic": 0.5})),
    }
    for name, other in variants.items():
        assert vc.differences(base, other) == [name] and vc.cache_key(other) != vc.cache_key(base)
    # The same settings spelled differently (defaults written out, an int for a float) are the same views.
    spelled = {**AUGMENT, "brightness": 30, "pad": 4, "scale": [0.35, 1.0], "shuffle_buffer": 5, "mixup": 0,
               "mosaic": 0.0}
    assert vc.cache_key(meta(_recipe(teacher, augment=spelled))) == vc.cache_key(base)

    ensemble = load_teachers(recipe.kd["teachers"], classes=CLASSES)
    first = vc.ensure_view_cache(recipe, images, ensemble, cache_dir=tmp_path / "cache", verbose=0)
    # Another teacher file at the same path: a new key, a new fill, and the message says why.
    teacher.write_bytes(_write_tflite(_keras_teacher(logits=True), tmp_path / "other.tflite").read_bytes())
    assert vc.differences(base, meta()) == ["teachers[0].sha256"]
    ensemble = load_teachers(recipe.kd["teachers"], classes=CLASSES)
    second = vc.ensure_view_cache(recipe, images, ensemble, cache_dir=tmp_path / "cache", verbose=1)
    assert second.path != first.path and not np.allclose(second.probs, first.probs)
    assert "differs in teachers[0].sha256" in capsys.readouterr().out
    # A file under a key it was not made for is refused, naming what differs.
    first.path.replace(second.path)
    with pytest.raises(vc.ViewCacheError, match=r"differs in teachers\[0\]\.sha256"):
        vc.ensure_view_cache(recipe, images, ensemble, cache_dir=tmp_path / "cache", verbose=0)


def test_without_view_cache_the_pipeline_is_unchanged():
    """The batches of the live pipeline for a fixed seed, as recorded before fixed views existed."""
    # tf.data's op-level seeds combine with TensorFlow's global seed, which earlier tests may set:
    # the recording was made without one.
    tf.random.set_seed(None)
    x = np.random.default_rng(0).integers(0, 256, (24, 16, 16, 3)).astype(np.uint8)
    y = np.arange(24, dtype=np.int32)
    order = [[13, 15, 11, 5, 0, 4, 2, 6], [17, 1, 19, 12, 3, 20, 7, 9], [16, 23, 22, 10, 14, 18, 8, 21],
             [20, 14, 23, 16, 19, 12, 22, 11]]
    sums = {
        "random_resized": [[48032.66, 57220.09, 51119.02, 54007.55, 54063.67, 63504.91, 53175.28, 47826.42],
                           [45357.04, 59268.26, 47460.72, 62300.34, 55340.68, 42921.95, 58516.27, 63057.99]],
        "pad": [[95524.09, 100147.31, 96615.97, 95713.79, 100997.95, 104360.13, 95962.06, 94327.33],
                [90604.45, 102474.94, 92645.81, 102378.41, 100626.06, 89847.67, 99326.66, 104044.86]],
    }
    settings = {"random_resized": dict(image_size=(12, 12), brightness=30.0, contrast=0.3),
                "pad": dict(pad=2, brightness=10.0)}
    for crop, kwargs in settings.items():
        ds = make_dataset(x, y, batch_size=8, training=True, seed=5, drop_remainder=True, crop=crop, **kwargs)
        batches = list(ds.repeat().take(4))
        assert [b[1].numpy().tolist() for b in batches] == order
        for (images, _), want in zip(batches, sums[crop]):
            np.testing.assert_allclose(images.numpy().sum((1, 2, 3)), want, rtol=1e-6, atol=0.02)


def test_view_cache_needs_teachers_and_a_count():
    base = dict(name="r", input_shape=(8, 8, 3), classes=CLASSES, model={"topology": "tiny"})
    with pytest.raises(RecipeError, match="kd.view_cache caches the outputs of kd.teachers"):
        Recipe(**base, kd={"view_cache": 4})
    with pytest.raises(RecipeError, match=r"kd\.view_cache must be an integer >= 0"):
        Recipe(**base, kd={"teachers": ["t.tflite"], "view_cache": -1})
    assert vc.view_count(Recipe(**base, kd={"teachers": ["t.tflite"]})) == 0


def test_a_run_with_view_cache_trains_without_running_a_teacher(image_folder, teacher_file, tmp_path, monkeypatch,
                                                                capsys):
    from glt_keras import cli
    from glt_keras.training.run import train

    recipe = Recipe(
        name="tiny_view_cache", input_shape=(16, 16, 3), classes=["bright", "dark"],
        model={"topology": "tiny", "levels": 4},
        data={"train": [{"folder": str(image_folder)}, {"folder": str(image_folder), "labels": "teacher"}],
              "holdout": 0.25, "augment": {"crop": "random_resized", "flip": True, "brightness": 20.0}},
        training={"epochs": 1, "batch_size": 16},
        kd={"teachers": [{"path": str(teacher_file), "classes": CLASSES}], "alpha": 0.2, "temperature": 1.0,
            "view_cache": 2},
    )
    predict, calls = FileTeacher.predict, []
    monkeypatch.setattr(FileTeacher, "predict", lambda self, x: calls.append(len(x)) or predict(self, x))

    class DuringFit(tf.keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.before = len(calls)

        def on_train_end(self, logs=None):
            self.during = len(calls) - self.before

    during = DuringFit()
    cache_dir = tmp_path / "cache"
    train(recipe, out_dir=tmp_path / "run", steps_per_epoch=3, verbose=1, callbacks=[during],
          view_cache_dir=cache_dir)
    assert "teacher view cache:" in capsys.readouterr().out
    assert during.before > 0 and during.during == 0  # filled before fit; no teacher ran during it
    header, row = (tmp_path / "run" / "history.csv").read_text().splitlines()[:2]
    assert np.isfinite(float(dict(zip(header.split(","), row.split(",")))["loss"]))
    (cache,) = cache_dir.glob("*.npz")
    info = json.loads(cache.with_suffix(".json").read_text())
    assert info["made_for"] == "tiny_view_cache" and info["fill_seconds"] > 0
    # The run records the cache's cost (the card shows it beside the training time).
    recorded = json.loads((tmp_path / "run" / "summary.json").read_text())["teacher_view_cache"]
    assert recorded == {"file": cache.name, "views": 2 * info["meta"]["images"]["shape"][0],
                        "fill_seconds": info["fill_seconds"], "workers": info["workers"]}
    from glt_keras.zoo_cli import training_lines, training_record

    text = "\n".join(training_lines(training_record(recipe, "tiny_view_cache",
                                                     json.loads((tmp_path / "run" / "summary.json").read_text()))))
    assert f"view cache (`kd.view_cache`): {recorded['views']:,} fixed augmented views labelled once in" in text
    # glt-keras teachers cache finds the same cache: nothing to label.
    calls.clear()
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.to_dict()))
    assert cli.main(["teachers", "cache", str(path), "--cache-dir", str(cache_dir)]) == 0
    assert calls == [] and str(cache) in capsys.readouterr().out


def test_a_run_with_live_teachers_trains_on_mixup_blends(image_folder, teacher_file, tmp_path):
    from glt_keras.training.run import train

    recipe = Recipe(
        name="tiny_mixup", input_shape=(16, 16, 3), classes=["bright", "dark"],
        model={"topology": "tiny", "levels": 4},
        data={"train": {"folder": str(image_folder)}, "holdout": 0.25,
              "augment": {"crop": "random_resized", "flip": True, "mixup": 1.0}},
        training={"epochs": 1, "batch_size": 16},
        kd={"teachers": [{"path": str(teacher_file), "classes": CLASSES}], "alpha": 0.5, "temperature": 1.0},
    )
    train(recipe, out_dir=tmp_path / "run", steps_per_epoch=3, verbose=0)
    header, row = (tmp_path / "run" / "history.csv").read_text().splitlines()[:2]
    # Every view is a blend without a hard label: the loss is the teachers' term alone, and finite.
    assert np.isfinite(float(dict(zip(header.split(","), row.split(",")))["loss"]))
