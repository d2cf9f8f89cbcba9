"""CIFAR-10: pretrained CIFAR ResNet teacher, long-tailed few-sample set, Tiny-ImageNet 32x32 as the OOD pool.

``data=shared`` (default) reads the real data of ``../shared/data`` (or ``$OEFSMC_DATA``): the JPEG-q75 CIFAR-10
training images (first 1000 per class) as the ID source, the full JPEG test set, Tiny-ImageNet val 32x32 as the OOD
pool, and the akamaster teacher ``.npz`` of ``arch``. ``data=tfds`` reads ``cifar10`` through ``tfds.data_source``
(prepare it first with ``tfds build cifar10``) and needs ``teacher=PATH``.

Argument keys: method, arch, per_class, rho, oe (0 | 1 | both), seed, steps, data (shared | tfds), teacher (a path;
empty = the shared teacher of ``arch``), family (akamaster: option-A shortcuts, ImageNet normalisation, the default;
chenyaofo: the second family, option-B shortcuts and CIFAR-10 normalisation), pool (tiny: Tiny-ImageNet val, the
default; tiny_disjoint: without its 30 CIFAR-10-like classes; dtd: DTD textures), runlocal (1 = a few steps to check the
set-up).
Example: ``--config configs/cifar10.py:method=kd,arch=resnet56,per_class=10,rho=10,oe=1``.
"""

import glob
import json
import os
import pathlib

import ml_collections

from oefsmc_jax.config_defaults import COMMON_ARGS, apply_common_args, base_config, parse_arg, source

CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def shared_data() -> pathlib.Path:
    """The shared data folder: ``$OEFSMC_DATA`` or ``../shared/data`` next to the repository."""
    default = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return pathlib.Path(os.environ.get("OEFSMC_DATA", default))


def akamaster_teacher(arch: str) -> str:
    """Path of the shared akamaster ``.npz`` teacher for ``arch`` (e.g. resnet20), or '' if absent."""
    hits = sorted(glob.glob(str(shared_data() / "teachers" / "akamaster_cifar10_resnet" / f"{arch}-*.npz")))
    return hits[0] if hits else ""


def chenyaofo_teacher(arch: str) -> str:
    """Path of the shared chenyaofo ``.npz`` teacher (option-B shortcuts) for ``arch``, or '' if absent."""
    hits = sorted(glob.glob(str(shared_data() / "teachers" / "chenyaofo_cifar10_resnet" / f"cifar10_{arch}-*.npz")))
    return hits[0] if hits else ""



POOLS = ("tiny", "tiny_disjoint", "dtd")


def ood_pool(pool: str) -> ml_collections.ConfigDict:
    """The OOD pool source: ``tiny`` (Tiny-ImageNet val 32x32, 10,000 images), ``tiny_disjoint`` (the same without
    the 30 classes that are CIFAR-10 classes in meaning or close to one, 8,500 images: the class-disjoint control)
    or ``dtd`` (1,200 DTD texture images of 10 classes, no class overlap at all)."""
    d = shared_data()
    if pool == "dtd":
        return source("npz", 32, path=str(d / "dtd10_32x32.npz"), split="dtd10", y_key="none")
    extra = {}
    if pool == "tiny_disjoint":
        overlap = json.loads((d / "tinyimagenet_cifar10_overlap.json").read_text())
        extra = {"exclude_classes": tuple(int(i) for i in overlap["all_indices"]), "class_key": "y"}
    return source("npz", 32, path=str(d / "tinyimagenet_val_32x32.npz"), split="val", y_key="none", **extra)


def get_config(arg: str | None = None):
    """CIFAR-10 config; see the module docstring for the argument keys."""
    a = parse_arg(arg, {**COMMON_ARGS, "data": "shared", "teacher": "", "family": "akamaster", "pool": "tiny",
                        "runlocal": False, "steps": 1000})
    if a["pool"] not in POOLS:
        raise ValueError(f"config argument pool={a['pool']!r}: allowed: {', '.join(POOLS)}")
    if a["family"] not in ("akamaster", "chenyaofo"):
        raise ValueError(f"config argument family={a['family']!r}: allowed: akamaster, chenyaofo")
    c = base_config()
    apply_common_args(c, a)
    c.title = f"CIFAR-10: {a['method']} on {a['arch']}, {a['per_class']}/class, rho={a['rho']:g}"
    c.data.num_classes = 10
    c.data.class_names = CLASS_NAMES
    c.data.image_size = 32
    if a["data"] == "shared":
        d = shared_data()
        c.data.id = source("npz", 32, path=str(d / "cifar10_train_jpeg75_10k.npz"), split="train")
        c.data.test = source("npz", 32, path=str(d / "cifar10_test_jpeg75.npz"), split="test")
        c.data.ood = ood_pool(a["pool"])
        if a["family"] == "chenyaofo":  # option-B shortcuts and CIFAR-10 normalisation
            c.teacher.checkpoint = a["teacher"] or chenyaofo_teacher(a["arch"])
            c.arch.shortcut = "B"
            from oefsmc_jax.convert import CHENYAOFO_MEAN, CHENYAOFO_STD

            c.data.mean, c.data.std = CHENYAOFO_MEAN, CHENYAOFO_STD
        else:
            c.teacher.checkpoint = a["teacher"] or akamaster_teacher(a["arch"])
    elif a["data"] == "tfds":
        c.data.id = source("tfds", 32, name="cifar10", split="train")
        c.data.test = source("tfds", 32, name="cifar10", split="test")
        c.data.ood = ood_pool(a["pool"])
        c.teacher.checkpoint = a["teacher"]
    else:
        raise ValueError(f"config argument data={a['data']!r}: allowed: shared, tfds")
    c.method.prune_ratio = 0.5
    c.train.batch_id = 64
    c.train.batch_ood = 64
    c.train.log_every = 50
    c.train.ckpt_every = 200
    c.oe.eval_every = 100
    c.oe.patience = 5
    c.oe.heldout = 200 if a["pool"] == "dtd" else 1000  # DTD's 1,200 images: leave room for the OOD subset
    if a["runlocal"]:
        c.train.steps = 20
        c.train.log_every = 10
        c.oe.eval_every = 10
        c.oe.heldout = 200
        c.eval.latency = False
    return c
