"""A confirmatory grid for the teacher-guided OOD selection, declared before it ran (committed at ``0ede5db``; run in
full, read in ``docs/results/README.md``, records in ``docs/results/confirm_cifar10``).

The exploratory grids (``deconfound_cifar10``, ``selection_cifar10``) found the teacher-complement arm ahead of the
paper's arm for KD at 10 per class, on seeds 0-4, with the classes always made rare in index order. This grid asks
the same question on what those grids never saw, with its primary contrasts fixed here, before any of it runs:

- KD, ResNet-20 teacher, long-tailed sets (rho = 10, equal totals) at 10 and 50 per class, 200 fine-tuning steps of
  32 + 32 images, ``lambda_jd = 0.3``, Tiny-ImageNet pool (argument ``pool``), c = 1 (``oe.selection_factor``);
- **fresh seeds 5-14** (10 seeds; the deconfound grids used 0-4) and **``subset.class_order = random``**: each seed
  draws its own seeded permutation of the classes, so each seed has a different set of rare classes;
- **early stopping off for every arm** (``oe.early_stopping = False``): every arm trains all its steps;
- arms: ``base``, ``oe`` (the paper's arm), ``oe_random_matched`` (random images at the teacher arm's count, R off),
  ``oe_confidence``, ``oe_complement`` and ``oe_complement_r`` (the teacher arm, R off / on; "R on" is cross-entropy
  on the class the teacher chose each image for, a pseudo-label, not the paper's complementary-label R).

Primary contrasts (``primary_contrasts``; the summary Holm-corrects over these four, everything else is
exploratory): the teacher arm chosen on the validation split (``oe_complement_r``, c = 1, R on) minus the paper's
arm, and minus the base method, at 10 and at 50 per class.

Argument keys: steps, batch, pool (as in ``deconfound_cifar10.py``), runlocal (a tiny set-up check). Run:
``python -m oefsmc_jax.experiments --config configs/confirm_cifar10.py --workdir DIR``.
"""

import ml_collections

from oefsmc_jax.config_defaults import parse_arg, sibling

deconfound_cifar10 = sibling(__file__, "deconfound_cifar10")

ARMS = "base,oe,oe_random_matched,oe_confidence,oe_complement,oe_complement_r"
SEEDS = list(range(5, 15))
BUDGETS = (10, 50)
TEACHER_ARM = "oe_complement_r"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The grid; see the module docstring."""
    a = parse_arg(arg, {"steps": 200, "batch": 32, "pool": "tiny", "runlocal": False})
    c = deconfound_cifar10.get_config(f"pool={a['pool']},steps={a['steps']},batch={a['batch']},seeds=1,"
                                      f"runlocal={int(a['runlocal'])}")
    b = c.base  # OE-FSMC's settings pinned as committed (paper_cifar10.pin_committed_settings)
    b.oe.selection_factor = 1.0
    b.oe.early_stopping = False
    b.subset.class_order = "random"
    c.title = f"Confirmatory grid: teacher-guided OOD selection, KD on real CIFAR-10, pool {a['pool']}"
    kd = {"method": ["kd"], "arch": ["resnet20"], "mode": ["exp"]}
    if a["runlocal"]:
        c.groups = [{"name": "confirm", **kd, "per_class": [2], "seed": SEEDS[:1], "arms": ARMS}]
        c.primary_contrasts = []
        c.primary_declared_after_results = False
        return c
    c.groups = [{"name": "confirm", **kd, "per_class": [n], "seed": SEEDS, "arms": ARMS} for n in BUDGETS]
    c.primary_contrasts = [
        {"a": TEACHER_ARM, "b": other, "group": "confirm", "method": "kd", "per_class": n, "mode": "exp",
         "label": f"teacher arm (c = 1, R on) − {name}, {n}/class"}
        for n in BUDGETS for other, name in (("oe", "the paper's arm"), ("base", "KD"))]
    c.primary_declared_after_results = False
    return c
