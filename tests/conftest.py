import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import glt_keras  # noqa: E402,F401  (sets the Keras flavour before TensorFlow loads)
