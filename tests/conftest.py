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


def randomize_batchnorms(model, seed: int = 0):
    """Random affine BatchNorm parameters, in place. An untrained BatchNorm is the identity, so a
    fresh binary network's logits are often the same integer sum: an exact tie whose argmax flips
    with the last bit of Keras's (oneDNN's) or TFLite's rounding, and trained weights look like
    fresh ones. Random affines make ties practically impossible and loaded weights observable."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            gamma, beta, *stats = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape).astype(np.float32),
                               rng.normal(0.0, 0.5, beta.shape).astype(np.float32), *stats])
    return model


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


def resume_probe():
    """A Keras callback recording what a (resumed) run starts from: ``first_epoch`` (1-based number
    of the first epoch it trains) and ``optimizer_steps`` (each inner optimizer's step counter at
    that epoch's end). A resume that restored its checkpoint counts the earlier epochs' steps too;
    a restart, or a resume on a fresh optimizer, counts only this epoch's."""
    import tensorflow as tf

    class ResumeProbe(tf.keras.callbacks.Callback):
        first_epoch = None
        optimizer_steps = None

        def on_epoch_end(self, epoch, logs=None):
            if self.first_epoch is None:
                optimizer = self.model.optimizer
                self.first_epoch = epoch + 1
                self.optimizer_steps = [int(o.iterations.numpy())
                                        for o in getattr(optimizer, "optimizers", [optimizer])]

    return ResumeProbe()


def checkpoint_optimizer_steps(run, epoch: int) -> list:
    """The step counters saved in a run's checkpoint of ``epoch``, sorted (larq's CaseOptimizer
    counts steps in its inner optimizers: binary and real-valued)."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(Path(run) / "checkpoints" / f"epoch_{epoch}" / "ckpt"))
    return sorted(int(reader.get_tensor(k)) for k in reader.get_variable_to_shape_map()
                  if k.startswith("optimizer/optimizer_") and "/iter/" in k)
