"""Validation sweep of OE-FSMC's per-method settings: the grid that set each method's ``oe_defaults``
(``Method.oe_defaults`` in ``oefsmc_jax/methods/``) and FSKD's and CD's recipe choices. The config's
``oe.lambda_jd``, ``oe.eta``, ``oe.bn_mode`` and ``oe.calibration_ood_share`` stay at their sentinels here, so every
cell runs its method's defaults except for the one factor its group changes; ``tuning_rule`` says how a value
replaces a default (``oefsmc_jax/experiments/tuning.py``).

The sweep is always around the *current* defaults. Its committed records (``docs/results/methods_sweep_cifar10/``)
were made around the defaults before it moved them (each record names its commit), so rerunning this config after
the move runs the sweep around the chosen values: a check that they hold, not a copy of those records.

Scored on a balanced validation split carved from the ID training images (``eval.split=val``); the test split is
never read. KD-style budget of the other grids: ResNet-20 teacher, 10 per class, long-tailed (rho = 10, equal
total), ``seeds`` seeds (3), the fine-tuning and compression settings of ``configs/methods_cifar10.py`` (200 steps of
32 + 32 images, SGD lr 0.02 x0.1 at 40 % and 80 %), but with each method's own recipe (CD's official short
fine-tuning, FSKD's Q folded at export) instead of the settings pinned for the committed grids.

Groups, one factor at a time around the current defaults, for each method M of BP, KD, MiR, PRACTISE, FSKD, CD:

- ``sweep_M_default``: arms ``base,oe`` at the method's defaults (the reference of every other group of M);
- ``sweep_M_eta``: ``oe.eta`` in {0, 0.01, 0.1}; ``sweep_M_lambda``: ``oe.lambda_jd`` in {0.3, 1, 3};
  ``sweep_M_bn``: ``oe.bn_mode`` joint / separate (methods that fine-tune; FSKD does not by default, so these do not
  apply to it);
- ``sweep_M_share``: ``oe.calibration_ood_share`` in {0, 0.25, 0.5, count} (methods with a data-dependent
  compression stage: PRACTISE, FSKD, CD; MiR's and BP's/KD's L1 pruning reads no data);
- ``sweep_fskd_target``: the other target of FSKD's block-output Q (``method.fskd.target``: branch, before the
  residual add, or block, after it); ``sweep_cd_finetune``: the other of CD's official fine-tuning and KD in the
  project's loop (``method.cd.finetune``); both with arms ``base,oe``, scored on the base arm (the recipe).

Values equal to a method's default are left out of its groups (``sweep_M_default`` holds them), so no cell runs
twice. Argument keys: steps, batch, seeds, methods (``+``-separated subset), runlocal (a tiny set-up check).
Run: ``python -m oefsmc_jax.experiments --config configs/methods_sweep_cifar10.py --workdir DIR``.
"""

import ml_collections

from oefsmc_jax.config_defaults import base_config, parse_arg, sibling
from oefsmc_jax.methods import METHODS, resolve_oe

methods_cifar10 = sibling(__file__, "methods_cifar10")

SWEEP_METHODS = ["bp", "kd", "mir", "practise", "fskd", "cd"]
SWEEP_ETA = (0.0, 0.01, 0.1)
SWEEP_LAMBDA = (0.3, 1.0, 3.0)
SWEEP_BN = ("joint", "separate")
SWEEP_SHARE = ("0", "0.25", "0.5", "count")
SWEEP_FSKD_TARGET = ("branch", "block")
SWEEP_CD_FINETUNE = ("official", "kd")


def _reset_to_method_defaults(b: ml_collections.ConfigDict) -> None:
    """Undo the committed grids' pins: OE-FSMC's settings back to their sentinels, CD and FSKD to their defaults."""
    d = base_config()
    for f in ("lambda_jd", "eta", "bn_mode", "calibration_ood_share"):
        b.oe[f] = d.oe[f]
    for m in ("cd", "fskd"):
        b.method[m] = ml_collections.ConfigDict(d.method[m].to_dict())


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The sweep; see the module docstring."""
    a = parse_arg(arg, {"steps": 200, "batch": 32, "seeds": 3, "methods": "+".join(SWEEP_METHODS),
                        "runlocal": False})
    methods = [m for m in a["methods"].split("+") if m]
    if not methods or set(methods) - set(SWEEP_METHODS):
        raise ValueError(f"config argument methods={a['methods']!r}: allowed: {'+'.join(SWEEP_METHODS)} "
                         "('+'-separated)")
    c = methods_cifar10.get_config(f"steps={a['steps']},batch={a['batch']},seeds=1,runlocal={int(a['runlocal'])}")
    b = c.base
    cd_iters = b.method.cd.iters  # methods_cifar10's (3,000; 6 for runlocal)
    _reset_to_method_defaults(b)
    b.method.cd.iters = cd_iters
    b.eval.split = "val"  # tuning: the test split is never read
    b.method.cache_compression = True  # the eta, lambda_jd and bn_mode groups reuse the default group's compression
    c.title = "Per-method OE-FSMC settings: validation sweep on real CIFAR-10 (JPEG q75), Tiny-ImageNet 32x32 pool"
    c.primary_contrasts = []  # a tuning sweep: every contrast is exploratory
    c.primary_declared_after_results = False
    # How the sweep sets the defaults (oefsmc_jax.experiments.tuning): written after 66 of its 126 cells had
    # run (CD, FSKD, most of PRACTISE), before any default was moved
    c.tuning_rule = {"metric": "top1", "margin": 0.5,
                   "candidates": {"oe": {"eta": list(SWEEP_ETA), "lambda_jd": list(SWEEP_LAMBDA),
                                         "bn_mode": list(SWEEP_BN), "calibration_ood_share": list(SWEEP_SHARE)},
                                  "method": {"fskd": {"target": list(SWEEP_FSKD_TARGET)},
                                             "cd": {"finetune": list(SWEEP_CD_FINETUNE)}}}}
    seeds = list(range(a["seeds"])) if not a["runlocal"] else [0]
    per_class = [10] if not a["runlocal"] else [2]
    groups = []
    for m in methods:
        cls = METHODS[m]
        d = resolve_oe(b, cls)
        cell = {"method": [m], "arch": ["resnet20"], "per_class": per_class, "mode": ["exp"], "seed": seeds}

        def group(name: str, field: str, values: tuple, default: object, cell: dict = cell, m: str = m,
                  arms: str = "oe") -> None:
            for v in values:
                if v != default:
                    groups.append({"name": f"sweep_{m}_{name}", **cell, "arms": arms, "overrides": {field: v}})

        groups.append({"name": f"sweep_{m}_default", **cell, "arms": "base,oe"})
        finetunes = m != "fskd"  # FSKD does not fine-tune by default: eta, lambda_jd and bn_mode do not apply
        if finetunes:
            group("eta", "oe.eta", SWEEP_ETA, d.eta)
            group("lambda", "oe.lambda_jd", SWEEP_LAMBDA, d.lambda_jd)
            group("bn", "oe.bn_mode", SWEEP_BN, d.bn_mode)
        if cls.uses_calibration:
            share = "count" if d.calibration_ood_share is None else f"{d.calibration_ood_share:g}"
            group("share", "oe.calibration_ood_share", SWEEP_SHARE, share)
        if m == "fskd":  # a recipe choice: scored on the base arm (the recipe), OE-FSMC's arm beside it
            group("target", "method.fskd.target", SWEEP_FSKD_TARGET, b.method.fskd.target, arms="base,oe")
        if m == "cd":
            group("finetune", "method.cd.finetune", SWEEP_CD_FINETUNE, b.method.cd.finetune, arms="base,oe")
    c.groups = groups
    return c
