"""Data loading: real archives in ``shared/data``, original layouts, TFDS STL-10, COCO VWW, and
tf.data pipelines with augmentation.

TensorFlow is imported only by the functions that need it (``make_dataset``,
``load_tfds_stl10``), so the array loaders stay quick to import.
"""
from .augment import make_dataset, make_views, paste_augment, random_subset, resize_uint8, view_params
from .catalog import DATASETS, Dataset, DatasetInfo, inria_group_key
from .cutouts import person_cutouts
from .image_files import CorruptImageError
from .sources import (
    cache_dir,
    find_data_dir,
    load_arrays,
    load_coco_vww,
    load_image_folder,
    load_tfds_stl10,
    person_scenes_sources,
)

__all__ = [
    "DATASETS",
    "CorruptImageError",
    "Dataset",
    "DatasetInfo",
    "cache_dir",
    "find_data_dir",
    "inria_group_key",
    "load_arrays",
    "load_coco_vww",
    "load_image_folder",
    "load_tfds_stl10",
    "make_dataset",
    "make_views",
    "paste_augment",
    "person_cutouts",
    "person_scenes_sources",
    "random_subset",
    "resize_uint8",
    "view_params",
]
