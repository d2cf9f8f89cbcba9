"""Data: image sources, few-sample / OOD subsets (method.md section 1) and augmentation."""

from oefsmc_jax.data.augment import augment_batch, example_keys, flip, normalize, pad_crop
from oefsmc_jax.data.sources import (
    DataOverlapError,
    ImageSet,
    check_disjoint,
    image_hashes,
    load_source,
    prepare_image,
    tfds_labels,
)
from oefsmc_jax.data.subsets import (
    COUNT_MODES,
    SHOT_GROUP_NAMES,
    class_counts,
    class_order_permutation,
    default_ood_size,
    few_sample_indices,
    ood_split,
    shot_groups,
)

__all__ = [
    "COUNT_MODES",
    "SHOT_GROUP_NAMES",
    "DataOverlapError",
    "ImageSet",
    "augment_batch",
    "check_disjoint",
    "class_counts",
    "class_order_permutation",
    "default_ood_size",
    "example_keys",
    "few_sample_indices",
    "flip",
    "image_hashes",
    "load_source",
    "normalize",
    "ood_split",
    "pad_crop",
    "prepare_image",
    "shot_groups",
    "tfds_labels",
]
