"""The embedded default: scikit-learn's digits as ID data, crops of its bundled photos as the OOD pool.

Trains a small teacher (cached in the workdir), draws a long-tailed few-sample set (exp, rho = 10, 10 per class
on average), and compresses the teacher with KD with and without OE-FSMC. No download; about 2 minutes on 2 CPU
cores. Argument: the keys of ``COMMON_ARGS`` (e.g. ``configs/demo.py:method=bp,per_class=5``). The architecture is
ResNet-8, or ResNet-14 with ``method=practise`` (ResNet-8 has one block per stage: nothing PRACTISE may drop).
"""

from oefsmc_jax.config_defaults import COMMON_ARGS, apply_common_args, base_config, parse_arg, source

DIGIT_NAMES = tuple(str(i) for i in range(10))


def get_config(arg: str | None = None):
    """Demo config; ``arg`` is ``key=value,...`` over method, arch, per_class, rho, oe, seed, steps."""
    a = parse_arg(arg, {**COMMON_ARGS, "arch": "", "per_class": 5, "steps": 200})
    a["arch"] = a["arch"] or ("resnet14" if a["method"] == "practise" else "resnet8")
    c = base_config()
    apply_common_args(c, a)
    c.title = "demo: digits, long-tailed few-sample set, OOD = photo crops"
    size = 16
    c.data.num_classes = 10
    c.data.class_names = DIGIT_NAMES
    c.data.image_size = size
    c.data.mean = (0.5, 0.5, 0.5)
    c.data.std = (0.5, 0.5, 0.5)
    c.data.pad = 2
    c.data.flip = False  # digits are not mirror-symmetric
    c.data.id = source("digits", size, split="train")
    c.data.test = source("digits", size, split="test")
    c.data.ood = source("sklearn_photos", size, num_images=2000, seed=0, grayscale=True)
    c.arch.widths = (16, 32, 64)
    c.teacher.steps = 300
    c.teacher.batch_size = 128
    c.method.prune_ratio = 0.5
    c.oe.heldout = 500
    c.oe.eval_every = 25
    c.oe.patience = 4
    c.train.batch_id = 32
    c.train.batch_ood = 32
    c.train.log_every = 50
    c.optim.lr = 0.02
    return c
