"""A run's data: the few-sample set, the OOD subset and its held-out slice, the evaluation split, checked disjoint.

:func:`prepare_data` reads the sources named in ``config.data``, draws the few-sample set (``subset.*``) and the
OOD subset from their named random streams (:mod:`oefsmc_jax.seeds`), carves the balanced validation split when
``eval.split`` is ``val``, and refuses any overlap between the sets that must stay apart. What it needs of the OOD
pool is given by the caller (:class:`DataNeeds`, from the run's arms: :func:`oefsmc_jax.oe.arms.data_needs`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from oefsmc_jax import paths, seeds
from oefsmc_jax.data.sources import (
    ImageSet,
    Source,
    check_disjoint,
    load_source,
    open_source,
    source_hashes,
    tfds_labels,
)
from oefsmc_jax.data.subsets import (
    class_counts,
    class_order_permutation,
    default_ood_size,
    few_sample_indices,
    ood_split,
)
from oefsmc_jax.progress import log


@dataclasses.dataclass(frozen=True)
class DataNeeds:
    """What a run needs of the OOD pool."""

    ood: bool = False  # some arm trains on OOD images: the OOD subset is drawn
    heldout: bool = False  # some arm stops early on held-out OOD agreement: the held-out slice is drawn
    candidates: bool = False  # teacher-guided selection: the pool minus the held-out slice, hashed and checked


@dataclasses.dataclass
class RunData:
    """The data of a run: the few-sample set, the OOD subset and held-out slice, and the test split."""

    train: ImageSet  # few-sample ID set D
    counts: np.ndarray  # n_k
    ood: ImageSet | None  # D_o
    heldout: ImageSet | None  # held-out OOD slice for early stopping
    test: ImageSet
    full_train: ImageSet | None  # the whole ID training split (only for sources that are cheap to load)
    subset: dict | None = None  # counts and chosen indices (also in subset.json and in every checkpoint)
    candidates: Source | None = None  # the OOD pool minus the held-out slice: what teacher-guided selection sees
    candidate_hashes: np.ndarray | None = None  # their content hashes (uint64), from the overlap check


def _labels_and_loader(cfg: Any, cache: paths.Path) -> tuple[np.ndarray, Callable[[np.ndarray], ImageSet],
                                                                ImageSet | None]:
    if cfg.kind == "tfds" and cfg.get("lazy", False):
        labels = tfds_labels(cfg, cache)
        return labels, lambda idx: load_source(cfg, idx), None
    full = load_source(cfg)
    return full.y, full.take, full


def _evaluation_split(config: Any, labels: np.ndarray, idx: np.ndarray,
                      load_train: Callable[[np.ndarray], ImageSet]) -> ImageSet:
    """The test split, or with ``eval.split=val`` a balanced validation split carved from the ID training images
    outside the few-sample set (for tuning: no choice is ever made on the test split)."""
    k = config.data.num_classes
    if config.eval.split == "val":
        rest = np.asarray(labels).copy()
        rest[np.asarray(idx)] = -1
        val_idx = few_sample_indices(seeds.key(config.subset.seed, "val_split"), rest,
                                     np.full(k, config.eval.val_per_class, np.int64))
        test = load_train(val_idx)
        test = ImageSet(test.x, test.y, f"{test.name}[val]")
    else:
        test = load_source(config.data.test)
    y_test = np.asarray(test.y)
    if len(y_test) and (y_test.min() < 0 or y_test.max() >= k):
        bad = y_test[(y_test < 0) | (y_test >= k)]
        raise ValueError(f"evaluation split {test.name}: {len(bad)} labels outside [0, {k}) (e.g. {int(bad[0])}); "
                         f"check data.test / data.num_classes")
    return test


def prepare_data(config: Any, workdir: paths.Path, needs: DataNeeds) -> RunData:
    """Load the sources, draw the few-sample set and (as ``needs`` asks) the OOD subset, held-out slice and
    selection candidates, and check that they are disjoint from each other and from the evaluation split. Nothing
    is written; the chosen indices are in ``RunData.subset``."""
    k = config.data.num_classes
    s = config.subset
    labels, load_train, full_train = _labels_and_loader(config.data.id, workdir / "cache" / "id_labels.npz")
    order = class_order_permutation(k, s.seed) if s.class_order == "random" else None
    counts = class_counts(k, s.mode, s.per_class, s.rho, s.equal_total, order)
    idx = few_sample_indices(seeds.key(s.seed, "few_sample"), labels, counts)
    train = load_train(idx)
    test = _evaluation_split(config, labels, idx, load_train)
    log(f"data: few-sample set {len(train)} images, counts per class {counts.tolist()}; test {len(test)} images")

    ood = heldout = candidates = cand_hashes = None
    ood_idx = held_idx = np.zeros(0, np.int64)
    if needs.ood or needs.heldout:
        pool = open_source(config.data.ood)  # nothing is read yet: only the chosen images, or chunks
        m = config.oe.size if config.oe.size >= 0 else default_ood_size(counts, config.oe.size_cap or None)
        held_n = config.oe.heldout if config.oe.early_stopping or config.oe.get("track_best", False) else 0
        if m + held_n > len(pool):
            raise ValueError(f"oe.size + oe.heldout = {m} + {held_n} exceeds the OOD pool's {len(pool)} images "
                             f"({pool.name}); lower oe.size / oe.heldout or use a larger pool")
        ood_idx, held_idx = ood_split(seeds.key(s.seed, "ood_split"), len(pool), m, held_n)
        ood, heldout = pool.take(ood_idx), pool.take(held_idx)
        used = ImageSet(np.concatenate([ood.x, heldout.x]), np.concatenate([ood.y, heldout.y]), pool.name)
        if needs.candidates:
            candidates = pool.subset(np.setdiff1d(np.arange(len(pool)), held_idx))
            cand_hashes = source_hashes(candidates)  # one streamed pass over the pool
            check_disjoint(candidates, train, "the OOD pool overlaps the in-distribution few-sample set",
                           cand_hashes)
            check_disjoint(candidates, test, "the OOD pool overlaps the evaluation split (it must never be used "
                                             "to train)", cand_hashes)
        check_disjoint(used, train, "the OOD images overlap the in-distribution few-sample set")
        check_disjoint(used, test, "the OOD images overlap the evaluation split (it must never be used to train)")
        log(f"data: OOD subset {len(ood)} images, held-out OOD slice {len(heldout)} from {pool.name}")
    check_disjoint(train, test, "the few-sample training set overlaps the evaluation split")
    subset = {"counts": counts.tolist(), "id_indices": np.asarray(idx).tolist(), "ood_indices": ood_idx.tolist(),
              "heldout_indices": held_idx.tolist(), "id_source": train.name, "test_source": test.name}
    return RunData(train, counts, ood, heldout, test, full_train, subset, candidates, cand_hashes)
