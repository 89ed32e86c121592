"""glt-keras: a Keras model zoo of fully-binarized networks with a Generic Learned Thermometer.

Importing this package sets ``TF_USE_LEGACY_KERAS=1`` before TensorFlow loads, because
Larq and Larq Compute Engine only work with ``tf-keras`` (Keras 2), not Keras 3.
"""
import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _check_keras_version():
    if os.environ.get("TF_USE_LEGACY_KERAS") not in ("1", "true", "True"):
        raise ImportError(
            "glt_keras needs TF_USE_LEGACY_KERAS=1 (Larq does not support Keras 3), "
            f"but it is set to {os.environ.get('TF_USE_LEGACY_KERAS')!r}. Unset it or set it to 1."
        )
    if "tensorflow" in sys.modules:
        import tensorflow as tf

        module = getattr(tf.keras, "__name__", "")
        if not module.startswith("tf_keras"):
            raise ImportError(
                f"TensorFlow was imported before glt_keras with Keras 3 ({module}) as tf.keras. "
                "Import glt_keras first, or set TF_USE_LEGACY_KERAS=1 before importing TensorFlow."
            )


_check_keras_version()

__version__ = "0.1.0"
