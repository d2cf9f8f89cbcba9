"""The fixed 2,000-step comparison: the teacher-guided arm against the paper's arm and KD when every arm trains its
whole budget, declared before it runs.

The 2,000-step runs of ``deconfound_cifar10`` (``docs/results/deconfound_cifar10/tiny_2000steps``) stopped early on
held-out OOD agreement, so their contrasts mix the arms with the stopping rule. This grid runs the same cells with
early stopping off for every arm:

- KD, ResNet-20 teacher, long-tailed sets (rho = 10, equal totals, classes made rare in index order) at 10 and 50
  per class, seeds 0-4 (the seeds, subsets and OOD images of those runs), 2,000 fine-tuning steps of 32 + 32 images,
  ``lambda_jd = 0.3``, Tiny-ImageNet pool, c = 1;
- arms ``base`` (KD), ``oe`` (the paper's arm), ``oe_random_matched`` (random images at the teacher arm's count, R
  off), ``oe_confidence`` (the teacher's most confident images) and ``oe_complement_r`` (the teacher arm: the
  teacher's complement, R on; "R on" is cross-entropy on the class each image was chosen for, a pseudo-label, not
  the paper's complementary-label R);
- ``oe.early_stopping = False`` with ``oe.track_best = True`` for every arm: each run reports its weights after all
  2,000 steps, and records beside them (``tracked_best``) what early stopping (held-out agreement every 100 steps,
  patience 5, as those runs had it) would have kept: its step and that student's test accuracy. The kept figures
  are exploratory.

Primary contrasts (``primary_contrasts``; the summary Holm-corrects over these four, everything else is
exploratory): the teacher arm minus the paper's arm, and minus KD, at 10 and at 50 per class, final weights.

Argument keys: steps, batch, seeds, budgets (``+``-separated), runlocal (a tiny set-up check). Run:
``python -m oefsmc_jax.experiments --config configs/fixed_budget_cifar10.py --workdir DIR`` (resumable; one
``budgets=`` per core splits it in two).
"""

import ml_collections

from oefsmc_jax.config_defaults import parse_arg, parse_budgets, sibling

deconfound_cifar10 = sibling(__file__, "deconfound_cifar10")

ARMS = "base,oe,oe_random_matched,oe_confidence,oe_complement_r"
TEACHER_ARM = "oe_complement_r"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The grid; see the module docstring."""
    a = parse_arg(arg, {"steps": 2000, "batch": 32, "seeds": 5, "budgets": "10+50", "runlocal": False})
    budgets = parse_budgets(a["budgets"])
    if a["seeds"] < 1:
        raise ValueError(f"config argument seeds={a['seeds']}: at least 1")
    c = deconfound_cifar10.get_config(f"pool=tiny,steps={a['steps']},batch={a['batch']},seeds=1,"
                                      f"runlocal={int(a['runlocal'])}")
    b = c.base  # OE-FSMC's settings pinned as committed (paper_cifar10.pin_committed_settings), lambda_jd 0.3
    b.oe.selection_factor = 1.0
    b.oe.early_stopping = False
    b.oe.track_best = True
    b.oe.early_stopping_arms = "all"  # every arm, KD included, records what early stopping would have kept
    # the stopping rule and logging of the early-stopped 2,000-step runs these pair with
    b.oe.eval_every, b.oe.patience = 100, 5
    b.train.log_every, b.train.ckpt_every = 250, 500
    c.title = "Fixed 2,000-step comparison: teacher-guided OOD selection, KD on real CIFAR-10, early stopping off"
    kd = {"method": ["kd"], "arch": ["resnet20"], "mode": ["exp"]}
    if a["runlocal"]:
        b.oe.eval_every, b.oe.patience = 1, 2
        c.groups = [{"name": "fixed", **kd, "per_class": [2], "seed": [0], "arms": ARMS}]
        c.primary_contrasts = []
        c.primary_declared_after_results = False
        return c
    seeds = list(range(a["seeds"]))
    c.groups = [{"name": "fixed", **kd, "per_class": [n], "seed": seeds, "arms": ARMS} for n in budgets]
    c.primary_contrasts = [
        {"a": TEACHER_ARM, "b": other, "group": "fixed", "method": "kd", "per_class": n, "mode": "exp",
         "label": f"teacher arm (c = 1, R on) − {name}, {n}/class, {a['steps']:,} steps"}
        for n in budgets for other, name in (("oe", "the paper's arm"), ("base", "KD"))]
    c.primary_declared_after_results = False
    return c
