import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import glt_keras  # noqa: E402,F401  (sets the Keras flavour before TensorFlow loads)


import importlib.util  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def load_benchmark(name: str):
    """The script ``benchmarks/<name>.py`` as a module (the benchmarks are scripts, not a
    package). Registered in ``sys.modules`` while loading: dataclasses look their module up."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    return module


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """Two easy classes (dark / bright 16x16 scenes) as an ordinary image-folder tree."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label, (lo, hi) in {"dark": (0, 110), "bright": (145, 256)}.items():
        (root / label).mkdir()
        for i in range(48):
            Image.fromarray(rng.integers(lo, hi, (16, 16, 3)).astype(np.uint8)).save(root / label / f"{i:03d}.png")
    return root
