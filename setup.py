"""glt-keras: fully-binarized Keras networks with a Generic Learned Thermometer."""
from setuptools import find_packages, setup

# One set of versions known to work together (see README, "The stack").
INSTALL_REQUIRES = [
    "tensorflow==2.16.2",
    "tf-keras==2.16.0",
    "larq==0.14.0",
    "larq-compute-engine==0.16.0",
    "tensorflow-model-optimization==0.8.0",
    "tensorflow-datasets>=4.9,<4.10",
    "tensorflow-metadata<1.17",  # 1.17+ needs protobuf 5; TF 2.16 pins protobuf < 5
    "importlib_resources",
    "numpy<2",
    "pycocotools",
    "matplotlib",
    "tqdm",
    "pyyaml",
    # Image.Resampling (9.1+); the bench resizes anchors with its antialiased bilinear, as
    # ../shared/anchors measured them.
    "pillow>=9.1,<14",
]

setup(
    name="glt-keras",
    version="0.1.0",
    description="Fully-binarized Keras model zoo with a Generic Learned Thermometer, "
    "knowledge distillation, block pruning and LCE / microcontroller export.",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.12",
    packages=find_packages(include=["glt_keras", "glt_keras.*"]),
    package_data={"glt_keras": ["mcu/templates/*"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": ["pytest>=7"]},
    entry_points={"console_scripts": ["glt-keras=glt_keras.cli:main"]},
)
