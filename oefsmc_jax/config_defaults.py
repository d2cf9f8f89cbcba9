"""The full set of config fields with their defaults, and the ``key=value,...`` argument parser of the configs.

Config files in ``configs/`` start from :func:`base_config` and fill in data, architecture and budgets; every field
can be overridden on the command line with ``--config.FIELD=VALUE``. Fields marked [choice] in
``../shared/method.md`` are here so that each is easy to change.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import sys
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import ml_collections

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sibling(here: str, name: str) -> ModuleType:
    """The config file ``NAME.py`` in the folder of ``here`` (a config's ``__file__``), loaded once per process.

    Grid configs build on each other (``from oefsmc_jax.config_defaults import sibling``;
    ``paper = sibling(__file__, "paper_cifar10")``). ml_collections loads the config named on the command line by
    path, so its folder is not importable; this loads a neighbour by path too, without changing ``sys.path``."""
    path = pathlib.Path(here).resolve().parent / f"{name}.py"
    key = f"oefsmc_config_file:{path}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, path)
    if spec is None or not path.is_file():
        raise FileNotFoundError(f"config file {path} not found (asked for by {here})")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[key]
        raise
    return module


def source(kind: str, image_size: int, **fields: Any) -> ml_collections.ConfigDict:
    """A data-source config (see ``oefsmc_jax.data.sources``)."""
    return ml_collections.ConfigDict({"kind": kind, "image_size": image_size, "channels": 3, **fields})


def method_param_classes() -> dict[str, type]:
    """The hyper-parameter dataclass of every registered method that has its own sub-config
    (``config.method.NAME``), as the method declares it (``Method.config_params``)."""
    from oefsmc_jax.methods import METHODS

    return {name: m.config_params for name, m in METHODS.items() if m.config_params is not None}


def base_config() -> ml_collections.ConfigDict:
    """Every field with its default value."""
    c = ml_collections.ConfigDict()
    c.title = "few-sample compression"  # the heading of report.md
    c.seed = 0  # seeds the subsets, the OOD draw, initialisation and the step keys
    c.num_devices = 0  # 0 = all visible devices
    c.compile_cache = ""  # persistent XLA cache: "" = $OEFSMC_COMPILE_CACHE or ~/.cache/oefsmc_jax/xla; "off"
    c.cpu_fusion = ""  # XLA:CPU YNNPACK fusion (training/xla_cpu.py): "" = $OEFSMC_CPU_FUSION or exact; fast
    # (changes the gradients: opt-in only); off (XLA's own emitters). Ignored off the CPU
    c.cpu_wgrad = ""  # 3x3 filter gradients on a CPU (kernels/cpu_conv.py): "" = $OEFSMC_CPU_WGRAD or xla; kernel
    # (a hand-written C++ kernel built on first use with the system compiler; its float32 rounding differs from
    # xla's). Ignored off the CPU
    c.arms = "base,oe"  # comma-separated, all on the same subset (the table ARMS in oe/arms.py): base (method
    # alone), oe (method + OE-FSMC), oe_complement and oe_confidence (OE-FSMC with teacher-guided OOD selection,
    # method.md §4b), oe_random_matched / oe_random_matched_r (random OOD images at the teacher complement's count,
    # R off / on), oe_complement_r (teacher complement with R on, labels = the class each image was chosen for),
    # and the no-OOD rebalancing baselines resample (class-balanced sampling of the ID images) and logit_adjust
    # (logit-adjusted CE)

    c.data = ml_collections.ConfigDict()
    c.data.num_classes = 10
    c.data.class_names = ()  # names for the report (empty: class indices)
    c.data.image_size = 32  # the model's input side; sources are resized to it
    c.data.mean = IMAGENET_MEAN  # per-channel normalisation after x / 255
    c.data.std = IMAGENET_STD
    c.data.pad = 4  # random-crop padding (0 = off)
    c.data.flip = True  # random horizontal flip

    # Each source is a kind and its fields (oefsmc_jax/data/sources.py): npz (path, x_key, y_key; exclude_classes
    # with class_key leaves out the images of listed classes), tfds (name, split, data_dir, lazy, max_examples,
    # center_crop_fraction), digits (split), sklearn_photos (num_images, seed, grayscale)
    c.data.id = source("npz", 32, path="", split="")  # training split the few-sample set is drawn from
    c.data.test = source("npz", 32, path="", split="")  # balanced evaluation split (never trained on)
    c.data.ood = source("npz", 32, path="", split="")  # OOD pool

    c.subset = ml_collections.ConfigDict()
    c.subset.mode = "exp"  # balanced | exp
    c.subset.per_class = 10  # N (balanced), or the mean per class with equal_total
    c.subset.rho = 10.0  # imbalance ratio n_max / n_min
    c.subset.equal_total = True  # [choice] pick n_max so the total is K * per_class
    c.subset.class_order = "index"  # [choice] index | random (seeded permutation)
    c.subset.seed = 0

    c.arch = ml_collections.ConfigDict()
    c.arch.name = "resnet20"  # resnet<6n+2> (CIFAR) | vgg16 | imagenet_resnet18 / 34 / 50
    c.arch.shortcut = "A"  # CIFAR ResNets: A (zero-pad, as the pretrained teachers) | B (1x1 conv)
    c.arch.widths = (16, 32, 64)  # CIFAR ResNets: stage widths

    c.teacher = ml_collections.ConfigDict()
    c.teacher.checkpoint = ""  # Orbax model directory (import-teacher), or a pretrained .npz / .th / .pt of
    # either CIFAR family (akamaster option A, chenyaofo option B; told apart by their keys); empty = train one on
    # data.id (cached in the workdir). A teacher whose own normalisation differs from data.mean / data.std is refused
    c.teacher.steps = 1000  # training a teacher from scratch, with teacher.batch_size and teacher.optim
    c.teacher.batch_size = 128
    c.teacher.optim = ml_collections.ConfigDict({"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True,
                                                 "weight_decay": 5e-4, "schedule": "cosine", "warmup_steps": 0,
                                                 "decay_at": 0.4, "decay_factor": 0.1})

    c.method = ml_collections.ConfigDict()
    c.method.name = "kd"  # bp | kd | mir | practise | fskd | cd (oefsmc_jax/methods/, one file each)
    c.method.prune_ratio = 0.5  # fraction of each block's internal width pruned (float or one per stage; CD keeps
    # 1 - prune_ratio, one value)
    c.method.kd_gamma = 0.9  # KD's mix: (1 - gamma) CE + gamma tau^2 KL
    c.method.tau = 4.0  # KD temperature, also the temperature of OE-FSMC's joint distillation
    c.method.latency = "macs"  # how compression stages get latency: measure (median of jitted forwards) | macs
    # (the analytic MAC count, a deterministic proxy)
    # keep each distinct compressed student in oe.cache_dir and reuse it (compression_cache.py: keyed by the method,
    # teacher, calibration set, seed and code commit): for grids whose cells share a compression stage
    c.method.cache_compression = False

    # each method's own hyper-parameters, with the defaults of its dataclass (see the method's file)
    for name, params in method_param_classes().items():
        c.method[name] = ml_collections.ConfigDict(dataclasses.asdict(params()))

    c.student = ml_collections.ConfigDict()
    c.student.export_before_finetune = True  # fine-tune the physically smaller model (same function, faster)

    c.oe = ml_collections.ConfigDict()
    c.oe.size = -1  # m; -1 = K * n_max - n, which rebalances D in expectation [choice]
    c.oe.size_cap = 50000
    c.oe.alpha = -1.0  # -1 = max(beta) + min(beta); any alpha >= max(beta)
    c.oe.in_compression = True  # OOD images (with complementary labels) in the calibration set

    # This field and the three below default to a sentinel meaning "the method's own default" (Method.oe_defaults
    # in the method's file; resolved in one place, oefsmc_jax.methods.resolve_oe): -1 for the numbers, "method"
    # for the strings.
    # Each method's values come from the validation sweep of configs/methods_sweep_cifar10.py (its rule:
    # config.tuning_rule; its choices: docs/results/methods_sweep_cifar10/chosen.json, which tests/test_tuning.py
    # recomputes from the records and checks against the code).
    c.oe.lambda_jd = -1.0  # joint distillation weight (0 = off; -1 = the method's default) [choice]
    c.oe.eta = -1.0  # class-dependent regulariser R's weight (0 = off; -1 = the method's default) [choice]
    c.oe.bn_mode = "method"  # joint: BN sees ID and OOD together (Outlier Exposure) | separate: BN statistics from
    # ID only | method [choice]

    # total weight of the OOD rows in every compression-stage objective (PRACTISE's fit and recoverability, FSKD's
    # least squares, CD's layer terms): a fraction in [0, 1) written as a string ("0", "0.25": ID rows share 1 -
    # it, each part class-balanced by 1 / count(label) within it; "0" drops the OOD rows), "count" (1 / count(label)
    # over ID and OOD rows together) or "method" (the method's default) [choice]
    c.oe.calibration_ood_share = "method"
    c.oe.early_stopping = True  # stop on held-out OOD student-teacher agreement [choice]
    # with early stopping off: still score the held-out agreement and record what early stopping would have kept
    # (its step and that student's test accuracy), without using it; training and the reported weights are unchanged
    c.oe.track_best = False
    c.oe.early_stopping_arms = "ood"  # ood: only the arms with OOD images stop early (or track) | all: every arm
    c.oe.heldout = 1000  # size of the held-out OOD slice
    c.oe.eval_every = 50  # steps between two agreement checks
    c.oe.patience = 5  # checks without improvement before the run stops (the best weights are kept)
    c.oe.selection = "random"  # the 'oe' arm's OOD subset: random (paper) | teacher_complement | teacher_confidence

    # c: ceil(c * (n_max - n_k)) images per class. Chosen on the validation split only (configs/deconfound_cifar10.py,
    # groups sweep_c*: KD, 10 per class, rho 10, 3 seeds, c in 1/2.5/5 x R off/on): c = 1 with R on (arm
    # oe_complement_r) had the best mean validation top-1, by a margin inside the 3-seed noise
    # (docs/results/README.md has the figures).
    c.oe.selection_factor = 1.0
    c.oe.selection_eta = 0.0  # eta of the teacher-guided arms (method.md §4b: R off by default)
    c.oe.cache_dir = ""  # where the teacher's pool probabilities are cached ('' = WORKDIR/cache)

    c.train = ml_collections.ConfigDict()
    c.train.steps = 300  # fine-tuning steps
    c.train.batch_id = 64  # B_id, the global batch of ID images (divisible by the device count)
    c.train.batch_ood = 64  # B_ood, the global batch of OOD images [choice: B_id = B_ood]
    c.train.log_every = 25
    c.train.ckpt_every = 100
    c.train.max_nonfinite = 10  # consecutive non-finite (skipped) steps before the run stops with exit code 3, the
    # last good checkpoint kept
    c.train.host_batches = "auto"  # on: gather each step's images on the host (training/feed.py); off: the ID set
    # and OOD pool live on every device; auto: on when they exceed train.device_pool_mb
    c.train.device_pool_mb = 2048  # MiB, the threshold of host_batches=auto

    # the fine-tuning optimizer: name sgd | adam | adamw; schedule cosine | step | constant; decay_at a fraction of
    # the steps, or several (MiR's official (0.4, 0.8)), each multiplying lr by decay_factor (schedule step)
    c.optim = ml_collections.ConfigDict({"name": "sgd", "lr": 0.02, "momentum": 0.9, "nesterov": False,
                                         "weight_decay": 1e-4, "schedule": "cosine", "warmup_steps": 0,
                                         "decay_at": 0.4, "decay_factor": 0.1})

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 256
    c.eval.latency = True  # measure teacher and student latency (median of jitted forwards)
    c.eval.split = "test"  # test: data.test | val: a balanced split of held-back ID training images (for tuning)
    c.eval.val_per_class = 100
    return c


def parse_arg(arg: str | None, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Parse a config argument ``'k=v,k=v'`` against ``defaults`` (which also fixes each value's type).

    Unknown keys and values of the wrong type fail with a one-line error naming the key and what is allowed.
    """
    out = dict(defaults)
    if not arg:
        return out
    for item in arg.split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise ValueError(f"config argument {item!r}: expected key=value; keys: {', '.join(sorted(defaults))}")
        key, value = (s.strip() for s in item.split("=", 1))
        if key not in defaults:
            raise ValueError(f"config argument: unknown key {key!r}; allowed: {', '.join(sorted(defaults))}")
        ref = defaults[key]
        try:
            if isinstance(ref, bool):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError
                out[key] = value.lower() in ("1", "true", "yes")
            elif isinstance(ref, int):
                out[key] = int(value)
            elif isinstance(ref, float):
                out[key] = float(value)
            else:
                out[key] = value
        except ValueError:
            raise ValueError(f"config argument {key}={value!r}: expected a {type(ref).__name__}") from None
    return out


def parse_budgets(text: str) -> list[int]:
    """The per-class budgets of a grid's ``budgets`` argument: positive counts, ``+``-separated (``'10+50'``);
    anything else fails with a one-line error naming the argument."""
    try:
        budgets = [int(n) for n in text.split("+") if n.strip()]
    except ValueError:
        budgets = []
    if not budgets or min(budgets) < 1:
        raise ValueError(f"config argument budgets={text!r}: positive per-class counts, '+'-separated, e.g. 10+50")
    return budgets


def apply_common_args(c: ml_collections.ConfigDict, a: Mapping[str, Any]) -> None:
    """Copy the argument keys shared by all configs (method, arch, budget, imbalance, OE, seed) into ``c``."""
    c.method.name = a["method"]
    c.arch.name = a["arch"]
    c.subset.per_class = a["per_class"]
    c.subset.rho = float(a["rho"])
    c.subset.mode = "balanced" if float(a["rho"]) == 1.0 else "exp"
    c.arms = {"0": "base", "1": "oe", "both": "base,oe"}.get(str(a["oe"]), str(a["oe"]))
    c.seed = a["seed"]
    c.subset.seed = a["seed"]
    c.train.steps = a["steps"]


COMMON_ARGS = {"method": "kd", "arch": "resnet20", "per_class": 10, "rho": 10.0, "oe": "both", "seed": 0,
               "steps": 300}
