"""The corrected methods grid: OE-FSMC plugged into all six methods under one fair protocol (declared before it ran,
with the per-method settings of ``methods_sweep_cifar10.py``; all 130 of its cells ran at ``70372bb``, read in
``docs/results/README.md``, records in ``docs/results/methods_fair_cifar10``).

What makes it fair, against the committed ``methods_cifar10`` grid:

- every method runs with **its own OE-FSMC settings** (``Method.oe_defaults``: whether R applies, ``lambda_jd``,
  ``eta``, ``bn_mode``, the OOD share of the compression-stage weight), the values its validation sweep chose; the
  config leaves ``oe.*`` at their sentinels, so nothing here overrides them;
- every **base arm is its method's own recipe**: CD's official short fine-tuning (``method.cd.finetune=official``),
  FSKD with its block-output corrections folded at export, PRACTISE's adaptor fits, MiR's frozen classifier;
- **the same early stopping for every arm: none** (``oe.early_stopping = False``), so every arm trains all its steps;
- **the same fine-tuning budget for every method that uses the project's loop**: ``steps`` steps of ``batch`` ID
  (+ ``batch`` OOD) images, SGD lr 0.02 x0.1 at 40 % and 80 % (shortened for a 2-core CPU: MiR's official schedule
  is 2,000 steps of 64). CD's official fine-tuning keeps its own length (100 steps at lr 1e-5); FSKD does not
  fine-tune.

Cells: BP, KD, MiR, PRACTISE, FSKD and CD x 10 and 50 per class x ``seeds`` paired seeds, ResNet-20 teacher,
Tiny-ImageNet 32x32 pool:

- ``fair`` (long-tailed, rho = 10, equal totals): arms ``base``, ``oe`` (the paper's arm: random OOD images, R as
  the method has it) and the teacher arm (teacher-complement selection at c = 1; with R on, ``oe_complement_r``,
  for methods whose R is on, ``oe_complement`` for those whose R is off: KD, MiR and PRACTISE by default);
- ``fair_balanced``: the base arm on the balanced set of the same total (the imbalance drop);
- ``fair_cd_kd``: CD with KD fine-tuning in the project's loop instead of its official one (``method.cd.finetune=kd``),
  base arm: with the CD ``oe`` arm it separates what OE-FSMC's OOD images add from the distillation it brings.

Primary contrasts (declared here, before any cell runs; the summary Holm-corrects over all of them, everything else
is exploratory): per method and budget, on the long-tailed sets, the paper's arm − base, the teacher arm − base, and
the teacher arm − the paper's arm (5 methods x 2 budgets x 3 = 30). FSKD is left out of the family: under the
settings its sweep chose (no fine-tuning, no weight for OOD rows in its least squares) its OOD arms are the base
method by construction (:func:`ood_inert`); they run as a check.

Argument keys: steps, batch, seeds, fit_steps, cd_iters (as in ``methods_cifar10.py``), methods (``+``-separated
subset, in run order), budgets (``+``-separated), runlocal (a tiny set-up check). Cells run method by method, all
seeds of one method and budget before the next, so a grid stopped early holds complete paired sets. Run:
``python -m oefsmc_jax.experiments --config configs/methods_fair_cifar10.py --workdir DIR``.
"""

import ml_collections

from oefsmc_jax.config_defaults import base_config, parse_arg, parse_budgets, sibling
from oefsmc_jax.methods import METHODS, resolve_oe

methods_cifar10 = sibling(__file__, "methods_cifar10")

FAIR_METHODS = ["bp", "kd", "mir", "practise", "fskd", "cd"]


def teacher_arm(base: ml_collections.ConfigDict, method: str) -> str:
    """The teacher arm of ``method``: teacher-complement selection with R on where the method's R is on (its
    ``eta`` is not 0), else with R off (an arm cannot switch on an R the method does not have)."""
    return "oe_complement_r" if resolve_oe(base, METHODS[method]).eta > 0 else "oe_complement"


def ood_inert(base: ml_collections.ConfigDict, method: str) -> bool:
    """True where OOD images cannot change ``method``'s student under its own settings: FSKD without fine-tuning
    whose least squares give the OOD rows no weight (``calibration_ood_share`` 0). Its OE-FSMC and teacher arms
    are then the base method by construction, so they still run (a check that they equal it) but stay out of the
    primary family, where they would only dilute the correction."""
    share = resolve_oe(base, METHODS[method]).calibration_ood_share
    return method == "fskd" and not base.method.fskd.finetune and share == 0.0


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The grid; see the module docstring."""
    a = parse_arg(arg, {"steps": 200, "batch": 32, "seeds": 5, "fit_steps": 40, "cd_iters": 3000,
                        "methods": "+".join(FAIR_METHODS), "budgets": "10+50", "runlocal": False})
    methods = [m for m in a["methods"].split("+") if m]
    if not methods or set(methods) - set(FAIR_METHODS):
        raise ValueError(f"config argument methods={a['methods']!r}: allowed: {'+'.join(FAIR_METHODS)} "
                         "('+'-separated)")
    budgets = parse_budgets(a["budgets"])
    c = methods_cifar10.get_config(f"steps={a['steps']},batch={a['batch']},seeds=1,fit_steps={a['fit_steps']},"
                                   f"cd_iters={a['cd_iters']},runlocal={int(a['runlocal'])}")
    b = c.base
    d = base_config()
    for f in ("lambda_jd", "eta", "bn_mode", "calibration_ood_share"):  # each method's own settings
        b.oe[f] = d.oe[f]
    for m in ("cd", "fskd"):  # each method's own recipe
        iters = b.method[m].get("iters")
        b.method[m] = ml_collections.ConfigDict(d.method[m].to_dict())
        if iters is not None:
            b.method[m].iters = iters
    b.method.fskd.target = "block"  # its sweep's choice; defined for ResNet-20's identity shortcuts
    b.oe.selection_factor = 1.0
    b.oe.early_stopping = False
    c.title = "OE-FSMC under one fair protocol for six methods on real CIFAR-10 (JPEG q75), Tiny-ImageNet 32x32 pool"
    seeds = list(range(a["seeds"])) if not a["runlocal"] else [0]
    if a["runlocal"]:
        budgets = [2]
    cell = {"arch": ["resnet20"], "seed": seeds}
    groups = []
    for m in methods:
        for n in budgets:
            arms = f"base,oe,{teacher_arm(b, m)}"
            groups.append({"name": "fair", **cell, "method": [m], "per_class": [n], "mode": ["exp"], "arms": arms})
            groups.append({"name": "fair_balanced", **cell, "method": [m], "per_class": [n], "mode": ["balanced"],
                           "arms": "base"})
            if m == "cd":
                groups.append({"name": "fair_cd_kd", **cell, "method": [m], "per_class": [n], "mode": ["exp"],
                               "arms": "base", "overrides": {"method.cd.finetune": "kd"}})
    c.groups = groups
    c.primary_contrasts = [] if a["runlocal"] else [
        {"a": x, "b": y, "group": "fair", "method": m, "per_class": n, "mode": "exp",
         "label": f"{m.upper()}, {n}/class: {label}"}
        for m in methods if not ood_inert(b, m) for n in budgets
        for x, y, label in (("oe", "base", "OE-FSMC − base"),
                            (teacher_arm(b, m), "base", "teacher arm − base"),
                            (teacher_arm(b, m), "oe", "teacher arm − OE-FSMC"))]
    c.primary_declared_after_results = False
    return c
