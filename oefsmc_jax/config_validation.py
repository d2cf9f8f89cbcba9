"""Validate a run config before anything loads or compiles: every failure is one line naming the field."""

from __future__ import annotations

import os
from typing import Any

from oefsmc_jax.data.subsets import COUNT_MODES
from oefsmc_jax.errors import ConfigError
from oefsmc_jax.models.spec import build_arch, check_arch_name
from oefsmc_jax.training.optim import OPTIMIZERS, SCHEDULES

SOURCE_KINDS = ("npz", "tfds", "digits", "sklearn_photos")
CLASS_ORDERS = ("index", "random")


def _fail(field: str, msg: str) -> None:
    raise ConfigError(f"config.{field}: {msg}")


def _check_arch(name: str) -> None:
    try:
        check_arch_name(name)
    except ValueError as e:
        raise ConfigError(f"config.arch.name: {e}") from None


def _source_key(cfg: Any) -> tuple:
    if cfg.kind == "npz":
        return ("npz", os.path.abspath(cfg.path), cfg.get("split", ""))
    if cfg.kind == "tfds":
        return ("tfds", cfg.name, cfg.split)
    if cfg.kind == "digits":
        return ("digits", cfg.split)
    return (cfg.kind, cfg.get("seed", 0), cfg.get("num_images", 0))


def _check_source(field: str, cfg: Any) -> None:
    if cfg.kind not in SOURCE_KINDS:
        _fail(f"{field}.kind", f"unknown source {cfg.kind!r}; allowed: {', '.join(SOURCE_KINDS)}")
    if cfg.kind == "npz":
        if not cfg.get("path"):
            _fail(f"{field}.path", "an npz source needs a path to a file with 'x' (uint8 NHWC) and 'y'")
        if "://" in str(cfg.path):
            from oefsmc_jax import paths

            try:
                paths.check_reachable(cfg.path, "file")
            except ValueError as e:
                _fail(f"{field}.path", str(e))
            if not paths.as_path(cfg.path).is_file():
                _fail(f"{field}.path", f"file {cfg.path} does not exist")
        elif not os.path.isfile(cfg.path):
            _fail(f"{field}.path", f"file {cfg.path} does not exist")
    exclude = cfg.get("exclude_classes", ()) or ()
    if exclude and (cfg.kind != "npz" or not all(isinstance(c, int) and not isinstance(c, bool) for c in exclude)):
        _fail(f"{field}.exclude_classes", "must be class ids (ints) of an npz source's labels, got "
                                          f"{tuple(exclude)!r} for a {cfg.kind} source")
    if cfg.kind == "tfds" and not cfg.get("name"):
        _fail(f"{field}.name", "a tfds source needs a dataset name, e.g. cifar10")
    if cfg.kind in ("tfds", "digits") and not cfg.get("split"):
        _fail(f"{field}.split", f"a {cfg.kind} source needs a split")
    if int(cfg.image_size) < 1:
        _fail(f"{field}.image_size", f"must be >= 1, got {cfg.image_size}")


_ROLES = {"data.id": "the ID training split", "data.test": "the evaluation split", "data.ood": "the OOD pool"}


def _check_not_empty(field: str, cfg: Any) -> None:
    """Refuse a source with no images where its size is known without loading it (npz headers, the embedded
    sources' settings): otherwise an empty evaluation split is found only after the teacher has trained."""
    role = _ROLES[field]
    if cfg.kind == "npz" and "://" not in str(cfg.path):
        from oefsmc_jax.data.sources import npz_length

        if npz_length(cfg) == 0:
            what = " once exclude_classes are left out" if cfg.get("exclude_classes", ()) else ""
            _fail(f"{field}.path", f"{cfg.path} holds no images{what} (array {cfg.get('x_key', 'x')!r}); "
                                   f"{role} needs at least one")
    elif cfg.kind == "sklearn_photos" and int(cfg.get("num_images", 1000)) < 1:
        _fail(f"{field}.num_images", f"must be >= 1, got {cfg.num_images}: {role} would be empty")
    elif cfg.kind == "digits" and not 0.0 < float(cfg.get("test_fraction", 0.4)) < 1.0:
        _fail(f"{field}.test_fraction", f"must be in (0, 1), got {cfg.test_fraction}: one split would be empty")


def validate(config: Any, num_devices: int = 1) -> None:
    """Raise :class:`ConfigError` with one line naming the first bad field and what is allowed."""
    _check_compile_modes(config)
    _check_model(config)
    _check_subset(config.subset)
    method, arms = _check_method(config)
    uses_pool = _check_sources(config, arms)
    _check_oe(config, method, arms, uses_pool)
    _check_train(config.train, num_devices)
    _check_optimizers(config)
    _check_teacher(config.teacher, num_devices)
    _check_eval(config.eval)


def _check_compile_modes(config: Any) -> None:
    if config.cpu_fusion:
        from oefsmc_jax.training.xla_cpu import check_mode

        check_mode(config.cpu_fusion)
    if config.cpu_wgrad:
        from oefsmc_jax.kernels import cpu_conv

        cpu_conv.check_mode(config.cpu_wgrad)


def _check_model(config: Any) -> None:
    from oefsmc_jax.methods import METHODS

    if config.method.name not in METHODS:
        _fail("method.name", f"unknown method {config.method.name!r}; allowed: {', '.join(sorted(METHODS))}")
    _check_arch(config.arch.name)
    if config.arch.shortcut not in ("A", "B"):
        _fail("arch.shortcut", f"must be 'A' or 'B', got {config.arch.shortcut!r}")
    if config.data.num_classes < 2:
        _fail("data.num_classes", f"must be >= 2, got {config.data.num_classes}")
    if config.data.class_names and len(config.data.class_names) != config.data.num_classes:
        _fail("data.class_names", f"has {len(config.data.class_names)} names for {config.data.num_classes} classes")


def _check_subset(s: Any) -> None:
    if s.mode not in COUNT_MODES:
        _fail("subset.mode", f"unknown mode {s.mode!r}; allowed: {', '.join(COUNT_MODES)}")
    if not float(s.rho) >= 1.0:
        _fail("subset.rho", f"the imbalance ratio must be >= 1, got {s.rho}")
    if int(s.per_class) < 1:
        _fail("subset.per_class", f"the budget must be >= 1 sample per class, got {s.per_class}")
    if s.class_order not in CLASS_ORDERS:
        _fail("subset.class_order", f"must be one of {', '.join(CLASS_ORDERS)}, got {s.class_order!r}")


def _check_method(config: Any) -> tuple[Any, list]:
    """The method built from ``config.method`` and the config's arms, each checked against the method."""
    from oefsmc_jax.methods import build_method
    from oefsmc_jax.oe.arms import arms_of, check_arms

    if config.method.latency not in ("measure", "macs"):
        _fail("method.latency", f"must be 'measure' or 'macs', got {config.method.latency!r}")
    arms = arms_of(config)
    # the method's own hyper-parameters, and every arm against the method (e.g. no logit adjustment for a
    # label-free method); the teacher of a checkpoint has the architecture config.arch names
    method = build_method(config.method, build_arch(config.arch, config.data.num_classes))
    check_arms(arms, method)
    return method, arms


def _check_sources(config: Any, arms: list) -> bool:
    """Check every data source the run reads; returns whether it reads the OOD pool."""
    sources = [("data.id", config.data.id), ("data.test", config.data.test)]
    from oefsmc_jax.oe.arms import scores_heldout

    uses_pool = any(a.uses_ood for a in arms) or (scores_heldout(config) and config.oe.early_stopping_arms == "all")
    if uses_pool:
        sources.append(("data.ood", config.data.ood))
    for field, cfg in sources:
        _check_source(field, cfg)
        if field != "data.test" or config.eval.split == "test":  # eval.split=val never reads data.test
            _check_not_empty(field, cfg)
        if int(cfg.image_size) != int(config.data.image_size):
            _fail(f"{field}.image_size", f"is {cfg.image_size} but data.image_size is {config.data.image_size}")
    if _source_key(config.data.id) == _source_key(config.data.test):
        _fail("data.test", "is the same split as data.id: the evaluation split must never be used for training")
    if uses_pool:
        if _source_key(config.data.ood) == _source_key(config.data.id):
            _fail("data.ood", "is the same split as data.id: OOD images must be disjoint from the ID set")
        if _source_key(config.data.ood) == _source_key(config.data.test):
            _fail("data.ood", "is the same split as data.test: the evaluation split must never be used to train")
    return uses_pool


def _check_oe(config: Any, method: Any, arms: list, uses_pool: bool) -> None:
    from oefsmc_jax.methods import resolve_oe
    from oefsmc_jax.oe.arms import scores_heldout
    from oefsmc_jax.oe.selection import SELECTIONS

    oe = config.oe
    if oe.selection not in SELECTIONS:
        _fail("oe.selection", f"unknown rule {oe.selection!r}; allowed: {', '.join(SELECTIONS)}")
    if not oe.selection_factor > 0:
        _fail("oe.selection_factor", f"must be > 0, got {oe.selection_factor}")
    if oe.early_stopping_arms not in ("ood", "all"):
        _fail("oe.early_stopping_arms", f"must be 'ood' or 'all', got {oe.early_stopping_arms!r}")
    settings = resolve_oe(config, method)  # lambda_jd, eta, bn_mode, calibration_ood_share: one line if bad
    for a in arms:
        if a.reg == "on" and settings.eta == 0:
            _fail("oe.eta", f"arm {a.name!r} switches R on, but method {method.name!r} runs with eta 0 (its "
                            "default for a label-free recipe, or set so); set oe.eta > 0 or drop the arm")
    if oe.alpha != -1 and not 0 < oe.alpha:
        _fail("oe.alpha", f"must be -1 (max(beta) + min(beta)) or a value >= max(beta), got {oe.alpha}")
    if oe.size < -1:
        _fail("oe.size", f"must be -1 (automatic) or >= 0, got {oe.size}")
    if not isinstance(oe.get("track_best", False), bool):
        _fail("oe.track_best", f"must be True or False, got {oe.track_best!r}")
    if oe.get("track_best", False) and oe.early_stopping:
        _fail("oe.track_best", "records what early stopping would have kept in a run without it; with "
                               "oe.early_stopping = True the run keeps it already: set one of the two")
    if scores_heldout(config) and uses_pool and (
            oe.eval_every < 1 or oe.patience < 1 or oe.heldout < 1):
        what = "early stopping" if oe.early_stopping else "oe.track_best"
        _fail("oe.eval_every", f"{what} needs oe.eval_every >= 1, oe.patience >= 1 and oe.heldout >= 1")


def _check_train(t: Any, num_devices: int) -> None:
    if t.steps < 1:
        _fail("train.steps", f"must be >= 1, got {t.steps}")
    for f in ("batch_id", "batch_ood"):
        b = t[f]
        if b < 1:
            _fail(f"train.{f}", f"must be >= 1, got {b}")
        if b % num_devices:
            _fail(f"train.{f}", f"{b} is not divisible by the device count {num_devices}")
    if t.log_every < 1 or t.ckpt_every < 1:
        _fail("train.log_every", "train.log_every and train.ckpt_every must be >= 1")
    if t.max_nonfinite < 1:
        _fail("train.max_nonfinite", f"must be >= 1 (consecutive non-finite steps tolerated), got {t.max_nonfinite}")
    if str(t.host_batches) not in ("auto", "on", "off"):
        _fail("train.host_batches", f"{t.host_batches!r} is not allowed; choose auto, on or off")
    if t.device_pool_mb < 0:
        _fail("train.device_pool_mb", f"must be >= 0 (MiB), got {t.device_pool_mb}")


def _check_optimizers(config: Any) -> None:
    for field, o in (("optim", config.optim), ("teacher.optim", config.teacher.optim)):
        if o.name not in OPTIMIZERS:
            _fail(f"{field}.name", f"unknown optimizer {o.name!r}; allowed: {', '.join(OPTIMIZERS)}")
        if o.schedule not in SCHEDULES:
            _fail(f"{field}.schedule", f"unknown schedule {o.schedule!r}; allowed: {', '.join(SCHEDULES)}")
        if not o.lr > 0:
            _fail(f"{field}.lr", f"must be > 0, got {o.lr}")


def _check_teacher(teacher: Any, num_devices: int) -> None:
    if teacher.checkpoint:
        if not os.path.exists(teacher.checkpoint):
            _fail("teacher.checkpoint", f"{teacher.checkpoint} does not exist")
        return
    if teacher.batch_size % num_devices:
        _fail("teacher.batch_size", f"{teacher.batch_size} is not divisible by the device count {num_devices}")
    if teacher.steps < 1:
        _fail("teacher.steps", "must be >= 1 when no teacher.checkpoint is given")


def _check_eval(e: Any) -> None:
    if e.split not in ("test", "val"):
        _fail("eval.split", f"must be 'test' or 'val', got {e.split!r}")
    if e.split == "val" and e.val_per_class < 1:
        _fail("eval.val_per_class", f"must be >= 1, got {e.val_per_class}")
    if e.batch_size < 1:
        _fail("eval.batch_size", f"must be >= 1, got {e.batch_size}")
