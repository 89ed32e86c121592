"""Tests of glt_keras.data: archive loaders, caches, folder / COCO / TFDS loaders, tf.data pipelines.

Tests on the real archives in ../shared/data skip when that folder is missing. They share one
session-wide cache dir, so each archive is decoded once per test run (CIFAR-10, both splits: ~25 s;
vww_val500 ~1 s; INRIA ~5 s). person_scenes and caltech101 (~15 s each) run only with
GLT_TEST_ALL_DATA=1.
"""
import io
import json
import os
import pickle
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

import glt_keras  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
from glt_keras import data as gd
from glt_keras.data import sources

# --------------------------------------------------------------------------------------------
# helpers


def _img_bytes(color, size=(8, 8), fmt="PNG"):
    """Encoded image of one colour; size is (width, height)."""
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def _make_tar(path, members):
    """Write a .tar.gz with {name: bytes} members."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


RED, BLUE = (250, 10, 10), (10, 10, 250)


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("GLT_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def fake_vww(tmp_path):
    """A small vww_val500.tar.gz: 3 red 'person' and 2 blue 'non_person' PNGs (one not 96x96)."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    members = {f"vww_val500/person/p{i}.png": _img_bytes(RED, (96, 96)) for i in range(3)}
    members["vww_val500/non_person/n0.png"] = _img_bytes(BLUE, (96, 96))
    members["vww_val500/non_person/n1.png"] = _img_bytes(BLUE, (40, 50))
    _make_tar(data_dir / "vww_val500.tar.gz", members)
    return data_dir


# --------------------------------------------------------------------------------------------
# find_data_dir / cache_dir


def test_find_data_dir_argument_and_env(tmp_path, monkeypatch):
    monkeypatch.delenv("GLT_DATA_DIR", raising=False)
    assert gd.find_data_dir(tmp_path) == tmp_path.resolve()
    monkeypatch.setenv("GLT_DATA_DIR", str(tmp_path))
    assert gd.find_data_dir() == tmp_path.resolve()
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as e:
        gd.find_data_dir(missing)
    assert str(missing) in str(e.value) and "GLT_DATA_DIR" in str(e.value) and "--data-dir" in str(e.value)
    monkeypatch.setenv("GLT_DATA_DIR", str(missing))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        gd.find_data_dir()


def test_find_data_dir_defaults_and_error_lists_places(tmp_path, monkeypatch):
    monkeypatch.delenv("GLT_DATA_DIR", raising=False)
    project = tmp_path / "a" / "project"
    cwd = tmp_path / "b" / "work"
    project.mkdir(parents=True)
    cwd.mkdir(parents=True)
    monkeypatch.setattr(sources, "_project_root", lambda: project)
    monkeypatch.chdir(cwd)
    with pytest.raises(FileNotFoundError) as e:
        gd.find_data_dir()
    msg = str(e.value)
    assert str(tmp_path / "a" / "shared" / "data") in msg
    assert str(tmp_path / "b" / "shared" / "data") in msg
    assert "--data-dir" in msg and "GLT_DATA_DIR" in msg
    # ../shared/data from the current directory
    (tmp_path / "b" / "shared" / "data").mkdir(parents=True)
    assert gd.find_data_dir() == (tmp_path / "b" / "shared" / "data").resolve()
    # ../shared/data next to the project wins
    (tmp_path / "a" / "shared" / "data").mkdir(parents=True)
    assert gd.find_data_dir() == (tmp_path / "a" / "shared" / "data").resolve()


def test_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("GLT_CACHE_DIR", str(tmp_path / "c1"))
    assert gd.cache_dir() == tmp_path / "c1" and (tmp_path / "c1").is_dir()
    monkeypatch.delenv("GLT_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert gd.cache_dir() == tmp_path / "home" / ".cache" / "glt_keras"
    assert gd.cache_dir().is_dir()


# --------------------------------------------------------------------------------------------
# load_arrays errors and caching (small archives made here)


def test_unknown_dataset_and_split_errors(tmp_path):
    with pytest.raises(ValueError) as e:
        gd.load_arrays("imagenet", "train", data_dir=tmp_path)
    for name in gd.DATASETS:
        assert name in str(e.value)
    with pytest.raises(ValueError) as e:
        gd.load_arrays("cifar10", "val", data_dir=tmp_path)
    assert "'val'" in str(e.value) and "train" in str(e.value) and "test" in str(e.value)
    with pytest.raises(ValueError, match="val"):
        gd.load_arrays("vww_val500", "train", data_dir=tmp_path)


def test_missing_archive_names_where_it_looked(tmp_path, cache_env):
    with pytest.raises(FileNotFoundError) as e:
        gd.load_arrays("cifar10", "test", data_dir=tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "cifar10_jpg.tar.gz") in msg and "GLT_DATA_DIR" in msg


def test_datasets_table():
    assert set(gd.DATASETS) == {"cifar10", "vww_val500", "person_scenes", "inria_person", "caltech101",
                                "imagenette", "pennfudan", "coco128"}
    assert list(gd.DATASETS["cifar10"].class_names) == [
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    for name in ("vww_val500", "person_scenes", "inria_person", "pennfudan", "coco128"):
        assert list(gd.DATASETS[name].class_names) == ["non_person", "person"]
    cal = gd.DATASETS["caltech101"].class_names
    assert len(cal) == 102 and "BACKGROUND_Google" in cal and list(cal) == sorted(cal)
    assert gd.DATASETS["inria_person"].image_size == (128, 64)


def test_archive_decode_cache_and_cache_hit(fake_vww, cache_env, monkeypatch):
    ds = gd.load_arrays("vww_val500", "val", data_dir=fake_vww)
    assert ds.x.shape == (5, 96, 96, 3) and ds.x.dtype == np.uint8 and ds.y.dtype == np.int32
    assert ds.class_names == ["non_person", "person"]
    assert ds.class_counts().tolist() == [2, 3]
    # labels follow the folders: person images are red, non_person blue
    red = ds.x[..., 0].mean(axis=(1, 2)) > ds.x[..., 2].mean(axis=(1, 2))
    np.testing.assert_array_equal(red, ds.y == 1)
    cached = list(cache_env.glob("vww_val500_val_*.npz"))
    assert len(cached) == 1
    assert not list(cache_env.glob("*.tmp"))

    def no_tar(*args, **kwargs):
        raise AssertionError("tarfile.open called on a cache hit")

    monkeypatch.setattr(tarfile, "open", no_tar)
    again = gd.load_arrays("vww_val500", "val", data_dir=fake_vww)
    np.testing.assert_array_equal(again.x, ds.x)
    np.testing.assert_array_equal(again.y, ds.y)
    assert again.class_names == ds.class_names
    assert list(again.files) == list(ds.files)
    # cache=False decodes again (and so opens the archive)
    with pytest.raises(AssertionError, match="cache hit"):
        gd.load_arrays("vww_val500", "val", data_dir=fake_vww, cache=False)


def test_cache_keyed_by_archive_size_and_mtime(fake_vww, cache_env):
    gd.load_arrays("vww_val500", "val", data_dir=fake_vww)
    archive = fake_vww / "vww_val500.tar.gz"
    _make_tar(archive, {"vww_val500/person/p.png": _img_bytes(RED, (96, 96)),
                        "vww_val500/non_person/n.png": _img_bytes(BLUE, (96, 96))})
    os.utime(archive, (time.time() + 10, time.time() + 10))
    ds = gd.load_arrays("vww_val500", "val", data_dir=fake_vww)
    assert len(ds) == 2
    # The stale decode is removed: one cached copy per dataset, not one per archive ever seen.
    assert len(list(cache_env.glob("vww_val500_val_*.npz"))) == 1
    (cache_env / "vww_val500_val_1_2_v0.npz").write_bytes(b"old cache version")
    (cache_env / "cifar10_test_1_2_v1.npz").write_bytes(b"another dataset")
    os.utime(archive, (time.time() + 20, time.time() + 20))
    assert len(gd.load_arrays("vww_val500", "val", data_dir=fake_vww)) == 2
    assert sorted(p.name.split("_")[0] for p in cache_env.glob("*.npz")) == ["cifar10", "vww"]


def test_cache_false_writes_nothing(fake_vww, cache_env):
    ds = gd.load_arrays("vww_val500", "val", data_dir=fake_vww, cache=False)
    assert len(ds) == 5
    assert not list(cache_env.glob("*.npz"))


def test_corrupt_image_in_archive_is_named(tmp_path, cache_env):
    _make_tar(tmp_path / "vww_val500.tar.gz", {
        "vww_val500/person/good.png": _img_bytes(RED, (96, 96)),
        "vww_val500/person/broken.png": _img_bytes(RED, (96, 96))[:40],
        "vww_val500/non_person/n.png": _img_bytes(BLUE, (96, 96)),
    })
    with pytest.raises(gd.CorruptImageError, match="vww_val500/person/broken.png"):
        gd.load_arrays("vww_val500", "val", data_dir=tmp_path)


def test_inria_group_keys():
    key = gd.inria_group_key
    assert key("inria_person/positive/crop001001a.jpg") == key("inria_person/positive/crop001001f.jpg")
    assert key("inria_person/positive/crop001001a.jpg") != key("inria_person/positive/crop001002a.jpg")
    assert key("inria_person/positive/person_and_bike_209b.jpg") == "pos:person_and_bike_209"
    assert key("inria_person/positive/crop_000010c.jpg") == "pos:crop_000010"
    assert key("inria_person/negative/100_0.jpg") == key("inria_person/negative/100_9.jpg") == "neg:100"
    assert key("inria_person/negative/101_0.jpg") == "neg:101"
    assert key("inria_person/negative/00000002a.jpg") == "neg:00000002"


def test_inria_split_by_source_photo(tmp_path, cache_env):
    members = {}
    for photo in range(1, 41):
        for letter in "ab":
            members[f"inria_person/positive/crop{photo:06d}{letter}.jpg"] = _img_bytes(RED, (64, 128), "JPEG")
        for k in range(3):
            members[f"inria_person/negative/{photo}_{k}.jpg"] = _img_bytes(BLUE, (64, 128), "JPEG")
    _make_tar(tmp_path / "inria_person_64x128.tar.gz", members)
    train = gd.load_arrays("inria_person", "train", data_dir=tmp_path)
    test = gd.load_arrays("inria_person", "test", data_dir=tmp_path)
    assert train.x.shape[1:] == (128, 64, 3)
    assert len(train) + len(test) == 200 and len(test) > 0 and len(train) > len(test)
    assert not set(train.groups.tolist()) & set(test.groups.tolist())
    for ds in (train, test):  # both mirror crops of a photo share a group
        for f, g in zip(ds.files, ds.groups):
            if f.endswith("a.jpg"):
                mate = np.flatnonzero(ds.files == f[:-5] + "b.jpg")
                assert len(mate) == 1 and ds.groups[mate[0]] == g


def test_person_scenes_labels_sources_and_split(tmp_path, cache_env):
    """The VWW-style scenes the person models train on: label from the folder, source from the
    file name, a train / val split by file-name hash that no file crosses."""
    members = {"vww_like/labels.csv": b"file,source\n"}
    for i in range(30):
        members[f"vww_like/person/voc_{i:04d}.jpg"] = _img_bytes(RED, (160, 128), "JPEG")
        members[f"vww_like/no_person/voc_{100 + i:04d}.jpg"] = _img_bytes(BLUE, (128, 140), "JPEG")
        members[f"vww_like/no_person/intel_{i:05d}.jpg"] = _img_bytes(BLUE, (150, 150), "JPEG")
    _make_tar(tmp_path / "person_scenes_128.tar.gz", members)
    train = gd.load_arrays("person_scenes", "train", data_dir=tmp_path)
    val = gd.load_arrays("person_scenes", "val", data_dir=tmp_path)
    assert train.x.shape[1:] == (128, 128, 3) and len(val) > 0 and len(train) > len(val)
    assert len(train) + len(val) == 90 and not set(train.files.tolist()) & set(val.files.tolist())
    for ds in (train, val):
        person = np.array(["/person/" in f for f in ds.files])
        assert (ds.y == person).all() and train.class_names == ["non_person", "person"]
        assert (ds.sources == np.where(np.char.find(ds.files.astype(str), "intel_") >= 0, "intel", "voc")).all()
        red = ds.x[..., 0].mean(axis=(1, 2)) > ds.x[..., 2].mean(axis=(1, 2))  # the pixels follow their file
        assert (red == person).all()
    np.testing.assert_array_equal(gd.person_scenes_sources("val", data_dir=tmp_path), val.sources)
    # The split is a property of the file name: the same files land in the same split again.
    again = gd.load_arrays("person_scenes", "val", data_dir=tmp_path)
    assert again.files.tolist() == val.files.tolist()


def test_person_scenes_rejects_an_unknown_folder(tmp_path, cache_env):
    members = {"vww_like/person/voc_0001.jpg": _img_bytes(RED, (128, 128), "JPEG"),
               "vww_like/people/voc_0002.jpg": _img_bytes(RED, (128, 128), "JPEG")}
    _make_tar(tmp_path / "person_scenes_128.tar.gz", members)
    with pytest.raises(ValueError, match=r"unexpected folder 'people'.*person/ or no_person/"):
        gd.load_arrays("person_scenes", "train", data_dir=tmp_path)


def test_caltech_lists_and_non_image_entries(tmp_path, cache_env):
    members = {}
    for cls in ("BACKGROUND_Google", "Faces", "accordion"):
        for i in range(1, 4):
            members[f"caltech101/{cls}/image_{i:04d}.jpg"] = _img_bytes(RED, (120, 90), "JPEG")
    members["caltech101/train.txt"] = (
        b"BACKGROUND_Google/image_0001.jpg\nBACKGROUND_Google/tmp\nFaces/image_0001.jpg\n"
        b"Faces/image_0002.jpg\naccordion/image_0001.jpg\naccordion/image_0002.jpg\n")
    members["caltech101/test.txt"] = (
        b"BACKGROUND_Google/image_0002.jpg\nFaces/image_0003.jpg\naccordion/image_0003.jpg\n")
    _make_tar(tmp_path / "caltech101_128.tar.gz", members)
    with pytest.warns(UserWarning, match="tmp"):
        train = gd.load_arrays("caltech101", "train", data_dir=tmp_path)
    test = gd.load_arrays("caltech101", "test", data_dir=tmp_path)
    cal = list(gd.DATASETS["caltech101"].class_names)
    assert len(train) == 5 and len(test) == 3 and train.x.shape[1:] == (112, 112, 3)
    assert train.class_names == cal
    assert [train.class_names[c] for c in test.y] == ["BACKGROUND_Google", "Faces", "accordion"]


def test_extracted_folder_and_cifar_pickles(tmp_path, cache_env):
    # original-layout copy cifar10/<split>/<class>/*.jpg
    classes = list(gd.DATASETS["cifar10"].class_names)
    for split, n in (("train", 2), ("test", 1)):
        for c, cls in enumerate(classes):
            d = tmp_path / "cifar10" / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                (d / f"{i:04d}.jpg").write_bytes(_img_bytes((c * 25, 0, 0), (32, 32), "JPEG"))
    train = gd.load_arrays("cifar10", "train", data_dir=tmp_path)
    assert len(train) == 20 and train.class_counts().tolist() == [2] * 10
    assert abs(int(train.x[train.y == 9][..., 0].mean()) - 225) < 6  # truck folder colour
    # CIFAR-10 python pickles
    other = tmp_path / "pickles"
    batches = other / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for b in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 3, 9, 3]}
        (batches / b).write_bytes(pickle.dumps(d))
    test = gd.load_arrays("cifar10", "test", data_dir=other)
    assert test.x.shape == (4, 32, 32, 3) and test.y.tolist() == [0, 3, 9, 3]
    np.testing.assert_array_equal(test.x[0, :, :, 0].ravel(), d[b"data"][0, :1024])
    assert len(gd.load_arrays("cifar10", "train", data_dir=other)) == 20


# --------------------------------------------------------------------------------------------
# load_image_folder


def test_image_folder(tmp_path):
    root = tmp_path / "imgs"
    (root / "b_dogs").mkdir(parents=True)
    (root / "a_cats").mkdir()
    (root / "a_cats" / "x.JPG").write_bytes(_img_bytes(RED, (40, 30), "JPEG"))
    (root / "a_cats" / "y.jpeg").write_bytes(_img_bytes(RED, (20, 20), "JPEG"))
    (root / "b_dogs" / "z.png").write_bytes(_img_bytes(BLUE, (64, 48)))
    (root / "b_dogs" / "notes.txt").write_text("not an image")
    ds = gd.load_image_folder(root, image_size=16)
    assert ds.class_names == ["a_cats", "b_dogs"]
    assert ds.x.shape == (3, 16, 16, 3) and ds.y.tolist() == [0, 0, 1]
    assert ds.x[2, ..., 2].mean() > 200
    ds = gd.load_image_folder(root, image_size=(10, 20), class_names=["b_dogs", "a_cats"])
    assert ds.x.shape == (3, 10, 20, 3) and ds.y.tolist() == [0, 1, 1]
    # split sub-folder, as in an original-layout CIFAR copy root/train/<class>/*
    (tmp_path / "top" / "train" / "k").mkdir(parents=True)
    (tmp_path / "top" / "train" / "k" / "a.png").write_bytes(_img_bytes(RED, (8, 8)))
    assert len(gd.load_image_folder(tmp_path / "top", image_size=8, split="train")) == 1
    with pytest.raises(FileNotFoundError, match="test"):
        gd.load_image_folder(tmp_path / "top", image_size=8, split="test")


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_root"):
        gd.load_image_folder(tmp_path / "missing_root", image_size=8)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(_img_bytes(RED))
    with pytest.raises(ValueError, match="No class folders"):
        gd.load_image_folder(tmp_path / "flat", image_size=8)
    root = tmp_path / "tree"
    (root / "full").mkdir(parents=True)
    (root / "full" / "a.png").write_bytes(_img_bytes(RED))
    (root / "hollow").mkdir()
    with pytest.raises(ValueError, match="hollow"):
        gd.load_image_folder(root, image_size=8)
    (root / "hollow" / "ok.png").write_bytes(_img_bytes(RED))
    (root / "hollow" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(gd.CorruptImageError, match="broken.jpg"):
        gd.load_image_folder(root, image_size=8)


# --------------------------------------------------------------------------------------------
# COCO Visual Wake Words


def test_coco_vww_labels_follow_area_rule(tmp_path):
    images_dir = tmp_path / "val2014"
    images_dir.mkdir()
    W, H = 160, 120  # area 19200; 0.5% = 96 px
    boxes = {  # image id -> [(category, (x, y, w, h))]
        1: [(1, (10, 10, 40, 80))],            # big person -> person
        2: [(1, (5, 5, 4, 4))],                # 16 px person: under 0.5% -> non_person
        3: [],                                 # nothing -> non_person
        4: [(18, (0, 0, 100, 100))],           # big dog only -> non_person
        5: [(1, (0, 0, 8, 12))],               # exactly 0.5% -> not more than -> non_person
        6: [(1, (0, 0, 10, 10)), (1, (50, 50, 2, 2))],  # 100 px > 96 -> person
    }
    images, anns = [], []
    for image_id, objs in boxes.items():
        name = f"COCO_val2014_{image_id:012d}.jpg"
        Image.new("RGB", (W, H), (image_id * 30, 0, 0)).save(images_dir / name, quality=95)
        images.append({"id": image_id, "file_name": name, "width": W, "height": H})
        for cat, (x, y, w, h) in objs:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat,
                         "bbox": [x, y, w, h], "area": float(w * h) * 0.5, "iscrowd": 0,
                         "segmentation": [[x, y, x + w, y, x + w, y + h]]})
    js = tmp_path / "instances_val2014.json"
    js.write_text(json.dumps({"images": images, "annotations": anns, "categories": [
        {"id": 1, "name": "person", "supercategory": "person"},
        {"id": 18, "name": "dog", "supercategory": "animal"}]}))
    ds = gd.load_coco_vww(js, images_dir, image_size=64)
    assert ds.class_names == ["non_person", "person"]
    assert ds.groups.tolist() == [1, 2, 3, 4, 5, 6]
    assert ds.y.tolist() == [1, 0, 0, 0, 0, 1]
    assert ds.x.shape == (6, 64, 64, 3) and ds.x.dtype == np.uint8
    assert abs(int(ds.x[3, ..., 0].mean()) - 120) < 4  # image 4 is (120, 0, 0)
    # a lower threshold turns the 16 px person into a person
    assert gd.load_coco_vww(js, images_dir, min_area_fraction=0.0005).y.tolist() == [1, 1, 0, 0, 1, 1]
    with pytest.raises(FileNotFoundError, match="nope.json"):
        gd.load_coco_vww(tmp_path / "nope.json", images_dir)


# --------------------------------------------------------------------------------------------
# TFDS STL-10


def test_stl10_offline_error_and_mock(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with pytest.raises(FileNotFoundError) as e:
        gd.load_tfds_stl10("train", data_dir=tmp_path)
    assert "STL-10" in str(e.value) and "offline" in str(e.value) and str(tmp_path) in str(e.value)
    with tfds.testing.mock_data(num_examples=5):
        ds = gd.load_tfds_stl10("train", data_dir=tmp_path, image_size=48)
    assert ds.x.shape == (5, 48, 48, 3) and ds.x.dtype == np.uint8
    assert len(ds.class_names) == 10 and "airplane" in ds.class_names
    assert ds.y.dtype == np.int32 and ((ds.y >= 0) & (ds.y < 10)).all()


# --------------------------------------------------------------------------------------------
# make_dataset


def _collect(ds):
    xs, ys = [], []
    for xb, yb in ds:
        xs.append(xb.numpy())
        ys.append(yb.numpy())
    return np.concatenate(xs), np.concatenate(ys)


@pytest.fixture(scope="module")
def small_arrays():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    y = np.arange(40, dtype=np.int32)  # label = index, to identify images after shuffling
    return x, y


def test_make_dataset_eval(small_arrays):
    x, y = small_arrays
    ds = gd.make_dataset(x, y, batch_size=16, training=False)
    xb, yb = next(iter(ds))
    assert xb.dtype.name == "float32" and yb.dtype.name == "int32" and xb.shape == (16, 16, 16, 3)
    xs, ys = _collect(ds)
    np.testing.assert_array_equal(ys, y)  # in order
    np.testing.assert_array_equal(xs, x.astype(np.float32))  # raw pixel units, not normalised
    xs, _ = _collect(gd.make_dataset(x, y, batch_size=16, training=False, image_size=8))
    assert xs.shape == (40, 8, 8, 3) and xs.min() >= 0 and xs.max() <= 255
    np.testing.assert_allclose(xs[0, 0, 0], x[0, :2, :2].reshape(-1, 3).mean(0), atol=1e-3)  # area
    xs, _ = _collect(gd.make_dataset(x, y, batch_size=16, training=False, image_size=(24, 20)))
    assert xs.shape == (40, 24, 20, 3)
    assert len(list(gd.make_dataset(x, y, batch_size=16, training=False, drop_remainder=True))) == 2


def test_make_dataset_shuffle_flip_pad(small_arrays):
    x, y = small_arrays
    ds = gd.make_dataset(x, y, batch_size=8, training=True, flip=False, crop="pad", pad=0, seed=3)
    xs1, ys1 = _collect(ds)
    xs2, ys2 = _collect(ds)
    assert sorted(ys1.tolist()) == list(range(40))  # each image once per epoch
    assert ys1.tolist() != ys2.tolist()  # reshuffled each epoch
    np.testing.assert_array_equal(xs1, x[ys1].astype(np.float32))
    xs3, ys3 = _collect(gd.make_dataset(x, y, batch_size=8, training=True, flip=False, crop="pad",
                                        pad=0, seed=3))
    assert ys3.tolist() == ys1.tolist()  # deterministic for a seed

    xs, ys = _collect(gd.make_dataset(x, y, batch_size=8, training=True, crop="none", seed=1))
    flipped = [np.array_equal(a, x[l][:, ::-1]) for a, l in zip(xs, ys)]
    same = [np.array_equal(a, x[l]) for a, l in zip(xs, ys)]
    assert all(f or s for f, s in zip(flipped, same)) and 5 < sum(flipped) < 35

    xs, ys = _collect(gd.make_dataset(x, y, batch_size=8, training=True, crop="pad", pad=4, seed=2))
    assert xs.shape == (40, 16, 16, 3) and xs.dtype == np.float32
    offsets = set()
    for a, l in zip(xs, ys):
        padded = np.pad(x[l], ((4, 4), (4, 4), (0, 0)), mode="reflect").astype(np.float32)
        hits = [(oy, ox, f) for oy in range(9) for ox in range(9) for f in (0, 1)
                if np.array_equal(a, (padded[oy:oy + 16, ox:ox + 16][:, ::-1] if f else
                                      padded[oy:oy + 16, ox:ox + 16]))]
        assert hits, "output is not a (flipped) crop of the reflect-padded image"
        offsets.add(hits[0][:2])
    assert len(offsets) > 5


def test_make_dataset_shuffles_a_class_sorted_set_globally():
    # CIFAR-10 decodes class by class; a 10,000-index shuffle buffer over 30,000 sorted
    # images gave batches of 2-3 classes and BatchNorm statistics of those classes.
    n, k = 30000, 10
    x = np.zeros((n, 2, 2, 3), np.uint8)
    y = np.repeat(np.arange(k), n // k).astype(np.int32)
    ds = gd.make_dataset(x, y, batch_size=128, training=True, flip=False, seed=0)
    classes_per_batch = [len(np.unique(yb.numpy())) for _, yb in ds.take(20)]
    assert min(classes_per_batch) == k
    first = next(iter(ds))[1].numpy()
    assert np.bincount(first, minlength=k).max() < 30  # ~12.8 per class, not 40+


def test_make_dataset_random_resized_and_jitter(small_arrays):
    x, y = small_arrays
    ds = gd.make_dataset(x, y, batch_size=16, training=True, image_size=12, crop="random_resized",
                         scale=(0.35, 1.0), brightness=40, contrast=0.5, seed=0)
    xs, ys = _collect(ds)
    assert xs.shape == (40, 12, 12, 3) and xs.dtype == np.float32 and ys.dtype == np.int32
    assert xs.min() >= 0.0 and xs.max() <= 255.0
    assert sorted(ys.tolist()) == list(range(40))
    bright = np.full((8, 16, 16, 3), 250, np.uint8)
    xs, _ = _collect(gd.make_dataset(bright, np.zeros(8, np.int32), batch_size=8, training=True,
                                     brightness=60, seed=0))
    assert xs.max() == 255.0 and xs.min() >= 190.0 and len(np.unique(xs.mean(axis=(1, 2, 3)))) > 1
    with pytest.raises(ValueError, match="crop"):
        gd.make_dataset(x, y, batch_size=4, training=True, crop="center")


def test_make_dataset_balance():
    x = np.zeros((400, 8, 8, 3), np.uint8)
    y = np.zeros(400, np.int32)
    y[:20] = 1  # 5% positives
    ds = gd.make_dataset(x, y, batch_size=50, training=True, balance=True, seed=0)
    _, ys = _collect(ds)
    assert len(ys) == 400  # an epoch is still len(x) samples
    assert 0.4 < ys.mean() < 0.6
    _, ys = _collect(gd.make_dataset(x, y, batch_size=50, training=True, seed=0))
    assert ys.mean() == 0.05


def test_paste_augment_deterministic():
    rng = np.random.default_rng(0)
    scenes = rng.integers(0, 60, (6, 64, 64, 3), dtype=np.uint8)
    persons = np.full((3, 128, 64, 3), 230, np.uint8)
    a, ya = gd.paste_augment(scenes, persons, n=10, seed=5)
    b, _ = gd.paste_augment(scenes, persons, n=10, seed=5)
    c, _ = gd.paste_augment(scenes, persons, n=10, seed=6)
    assert a.shape == (10, 64, 64, 3) and a.dtype == np.uint8 and ya.tolist() == [1] * 10
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    bright = (a.astype(int).sum(-1) > 300).mean(axis=(1, 2))  # pasted pixels are brighter
    assert (bright > 0.01).all()


def test_paste_augment_with_cutouts_uses_their_masks():
    scenes = np.zeros((2, 64, 64, 3), np.uint8)
    person = np.full((40, 20, 3), 200, np.uint8)
    solid = np.ones((40, 20), np.float32)
    out, y = gd.paste_augment(scenes, [(person, solid)], n=4, seed=0, match_exposure=0, height_range=(0.5, 0.5))
    assert y.tolist() == [1] * 4
    for image in out:  # a 32x16 block of the person's colour, nothing else changed
        lit = (image == 200).all(-1)
        rows, cols = np.flatnonzero(lit.any(1)), np.flatnonzero(lit.any(0))
        assert len(rows) == 32 and 12 <= len(cols) <= 16  # may stick out sideways by a quarter
        assert lit.sum() == len(rows) * len(cols) and (image[~lit] == 0).all()
    invisible, _ = gd.paste_augment(scenes, [(person, np.zeros_like(solid))], n=2, seed=0)
    np.testing.assert_array_equal(invisible, 0)
    with pytest.raises(ValueError, match="cut-outs"):
        gd.paste_augment(scenes, [(person, solid[:5])], n=1)


def _mask_png(ids):
    buf = io.BytesIO()
    Image.fromarray(np.asarray(ids, np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def test_new_person_sets_and_their_cutouts(tmp_path, cache_env):
    """imagenette (class folders per split), pennfudan (images, masks left out) and coco128
    (person by the VWW area rule; polygons with COCO category ids, 1 = person)."""
    data = tmp_path / "data"
    data.mkdir()
    _make_tar(data / "imagenette_96.tar.gz", {
        "imagenette/train/tench/a.jpg": _img_bytes(RED, (96, 96), "JPEG"),
        "imagenette/train/church/b.jpg": _img_bytes(BLUE, (96, 96), "JPEG"),
        "imagenette/val/church/c.jpg": _img_bytes(BLUE, (96, 96), "JPEG")})
    train = gd.load_arrays("imagenette", "train", data_dir=data)
    assert len(train) == 2 and sorted(train.class_names[c] for c in train.y) == ["church", "tench"]
    assert len(gd.load_arrays("imagenette", "val", data_dir=data)) == 1

    ids = np.zeros((64, 80), np.uint8)
    ids[4:60, 10:30] = 1  # a person 56 px tall, 20 wide
    ids[20:40, 50:60] = 2  # one 20 px tall: below min_height
    _make_tar(data / "pennfudan_256.tar.gz", {
        "pennfudan/images/P1.jpg": _img_bytes(RED, (80, 64), "JPEG"),
        "pennfudan/masks/P1_mask.png": _mask_png(ids),
        "pennfudan/labels.csv": b"image,mask\n"})
    penn = gd.load_arrays("pennfudan", "train", data_dir=data)
    assert len(penn) == 1 and penn.y.tolist() == [1] and penn.files[0].endswith("images/P1.jpg")
    cuts = gd.person_cutouts("pennfudan", data_dir=data, min_height=30)
    assert [c[0].shape for c in cuts] == [(56, 20, 3)] and cuts[0][1].min() == 1.0
    assert len(gd.person_cutouts("pennfudan", data_dir=data, min_height=10)) == 2

    boxes = {"big": "0 0.5 0.5 0.1 0.1\n", "small": "0 0.5 0.5 0.05 0.05\n2 0.5 0.5 0.9 0.9\n"}
    members = {f"coco128_train2017/images/{k}.jpg": _img_bytes(RED, (100, 100), "JPEG") for k in boxes}
    members.update({f"coco128_train2017/labels_boxes/{k}.txt": v.encode() for k, v in boxes.items()})
    members["coco128_train2017/labels_polygons/big.txt"] = (
        b"1 0.1 0.1 0.5 0.1 0.5 0.9 0.1 0.9\n"  # a person 80 px tall
        b"3 0.6 0.1 0.9 0.1 0.9 0.9\n")  # COCO category 3: a car
    _make_tar(data / "coco128_train2017_256.tar.gz", members)
    coco = gd.load_arrays("coco128", "train", data_dir=data)
    labels = dict(zip([f.rsplit("/", 1)[-1] for f in coco.files], coco.y.tolist()))
    assert labels == {"big.jpg": 1, "small.jpg": 0}  # 1% of the image vs 0.25%
    people = gd.person_cutouts("coco128", data_dir=data)
    assert len(people) == 1 and 78 <= people[0][0].shape[0] <= 82 and 38 <= people[0][0].shape[1] <= 42
    with pytest.raises(ValueError, match="No person masks"):
        gd.person_cutouts("imagenette", data_dir=data)


# --------------------------------------------------------------------------------------------
# the real archives in ../shared/data


@pytest.fixture(scope="session")
def real_data_dir():
    try:
        return gd.find_data_dir()
    except FileNotFoundError as e:
        pytest.skip(f"real data not available ({e.args[0].splitlines()[0]}); set GLT_DATA_DIR")


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("glt_real_cache")


@pytest.fixture
def real(real_data_dir, real_cache, monkeypatch):
    monkeypatch.setenv("GLT_CACHE_DIR", str(real_cache))

    def load(name, split):
        if not (real_data_dir / gd.DATASETS[name].archive).is_file():
            pytest.skip(f"{gd.DATASETS[name].archive} not in {real_data_dir}")
        return gd.load_arrays(name, split, data_dir=real_data_dir)

    return load


def test_real_vww_val500(real):
    ds = real("vww_val500", "val")
    assert ds.x.shape == (500, 96, 96, 3) and ds.class_counts().tolist() == [250, 250]
    assert all(f.split("/")[1] == ds.class_names[c] for f, c in zip(ds.files, ds.y))


def test_real_cifar10(real, monkeypatch):
    test = real("cifar10", "test")
    assert test.x.shape == (10000, 32, 32, 3) and test.class_counts().tolist() == [1000] * 10
    assert test.class_names[0] == "airplane" and test.class_names[9] == "truck"
    assert all(f.split("/")[1] == test.class_names[c] for f, c in zip(test.files[::97], test.y[::97]))
    assert 100 < test.x.mean() < 140
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: pytest.fail("train split was not cached"))
    train = real("cifar10", "train")  # decoded in the same pass as test
    assert train.x.shape == (50000, 32, 32, 3) and train.class_counts().tolist() == [5000] * 10


def test_real_inria_person(real):
    train, test = real("inria_person", "train"), real("inria_person", "test")
    assert train.x.shape[1:] == (128, 64, 3)
    assert len(train) + len(test) == 6562
    assert (train.class_counts() + test.class_counts()).tolist() == [4146, 2416]
    assert 0.10 < len(test) / 6562 < 0.20
    assert not set(train.groups.tolist()) & set(test.groups.tolist())


needs_all = pytest.mark.skipif(os.environ.get("GLT_TEST_ALL_DATA") != "1",
                               reason="~15 s decode each; set GLT_TEST_ALL_DATA=1 to run")


@needs_all
def test_real_person_scenes(real):
    train, val = real("person_scenes", "train"), real("person_scenes", "val")
    assert train.x.shape[1:] == (128, 128, 3)
    assert (train.class_counts() + val.class_counts()).tolist() == [11779, 759]
    assert 0.07 < len(val) / (len(train) + len(val)) < 0.13
    assert set(np.unique(train.sources)) == {"voc", "intel"}
    assert (train.y[train.sources == "intel"] == 0).all()
    np.testing.assert_array_equal(gd.person_scenes_sources("val"), val.sources)
    assert not set(train.files.tolist()) & set(val.files.tolist())


@needs_all
def test_real_caltech101(real):
    train, test = real("caltech101", "train"), real("caltech101", "test")
    assert train.x.shape == (6095, 112, 112, 3)  # train.txt: 6,096 lines, one is "BACKGROUND_Google/tmp"
    assert test.x.shape == (3049, 112, 112, 3)
    assert len(train.class_names) == 102 and (train.class_counts() > 0).all()
    assert (test.class_counts() > 0).all()


def test_random_subset_spans_a_class_sorted_set():
    from glt_keras.data import random_subset

    x = np.arange(1000).reshape(1000, 1)
    y = np.repeat(np.arange(10), 100)  # sorted by class, as CIFAR-10 decodes
    xs, ys = random_subset(256, x, y, seed=0)
    assert len(ys) == 256 and len(np.unique(ys)) == 10  # the first 256 would hold 3 classes
    np.testing.assert_array_equal(xs[:, 0] // 100, ys)  # pairs stay aligned
    assert len(np.unique(xs)) == 256  # no repeats
    np.testing.assert_array_equal(random_subset(256, x, seed=0), xs)  # seeded
    assert len(random_subset(5000, y)) == 1000  # at most all
    with pytest.raises(ValueError, match="different lengths"):
        random_subset(3, x, y[:10])


def test_real_pennfudan_and_coco128(real, real_data_dir):
    penn, coco = real("pennfudan", "train"), real("coco128", "train")
    assert penn.x.shape == (170, 128, 128, 3) and penn.y.tolist() == [1] * 170
    assert coco.x.shape == (128, 128, 128, 3) and coco.class_counts().tolist() == [75, 53]
    assert len(gd.person_cutouts("pennfudan", data_dir=real_data_dir)) > 350  # 423 people, the tall ones
    assert len(gd.person_cutouts("coco128", data_dir=real_data_dir)) > 50


@needs_all
def test_real_imagenette(real):
    train, val = real("imagenette", "train"), real("imagenette", "val")
    assert train.x.shape == (9469, 96, 96, 3) and val.x.shape == (3925, 96, 96, 3)
    assert (train.class_counts() > 800).all()
