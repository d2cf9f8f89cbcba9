"""Data: image sources, few-sample / OOD subsets (method.md section 1) and augmentation."""

from oefsmc_jax.data.augment import augment_batch, example_keys, flip, normalize, pad_crop
from oefsmc_jax.data.sources import (
    DataOverlapError,
    ImageSet,
    Source,
    check_disjoint,
    image_hashes,
    load_source,
    open_source,
    prepare_image,
    source_hashes,
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
    "Source",
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
    "open_source",
    "pad_crop",
    "prepare_image",
    "shot_groups",
    "source_hashes",
    "tfds_labels",
]
