"""CIFAR-100 through ``tfds.data_source`` (prepare with ``tfds build cifar100``), OOD = Tiny-ImageNet 32x32.

No CIFAR-100 data or teacher ships with this project: give ``teacher=PATH`` (an Orbax model written by this
tool), or leave it empty to train a teacher from scratch on the whole training split first (``teacher.steps``).
Argument keys: method, arch, per_class, rho, oe, seed, steps, teacher, ood (a path to an npz OOD pool; empty =
the shared Tiny-ImageNet file), runlocal.
"""

import os
import pathlib

from oefsmc_jax.config_defaults import COMMON_ARGS, apply_common_args, base_config, parse_arg, source


def get_config(arg: str | None = None):
    """CIFAR-100 config."""
    a = parse_arg(arg, {**COMMON_ARGS, "arch": "resnet56", "teacher": "", "ood": "", "runlocal": False,
                        "steps": 1000})
    c = base_config()
    apply_common_args(c, a)
    c.title = f"CIFAR-100: {a['method']} on {a['arch']}, {a['per_class']}/class, rho={a['rho']:g}"
    c.data.num_classes = 100
    c.data.image_size = 32
    c.data.mean = (0.507, 0.487, 0.441)
    c.data.std = (0.267, 0.256, 0.276)
    c.data.id = source("tfds", 32, name="cifar100", split="train", data_dir="", lazy=False)
    c.data.test = source("tfds", 32, name="cifar100", split="test", data_dir="", lazy=False)
    shared = pathlib.Path(os.environ.get(
        "OEFSMC_DATA", pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    c.data.ood = source("npz", 32, path=a["ood"] or str(shared / "tinyimagenet_val_32x32.npz"), split="val",
                        y_key="none")
    c.teacher.checkpoint = a["teacher"]
    c.teacher.steps = 30000
    c.method.prune_ratio = 0.5
    c.train.log_every = 50
    c.train.ckpt_every = 200
    c.oe.eval_every = 100
    if a["runlocal"]:
        c.train.steps = 20
        c.teacher.steps = 20
        c.train.log_every = 10
        c.oe.eval_every = 10
        c.oe.heldout = 200
        c.eval.latency = False
    return c
