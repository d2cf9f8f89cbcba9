"""The experiment runner: grid expansion, resumable results, paired summaries; the no-OOD baselines; val split."""

import json
import math
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from helpers import config, tiny_spec

from oefsmc_jax.data.prepare import prepare_data
from oefsmc_jax.errors import ConfigError
from oefsmc_jax.evaluation import paired_difference
from oefsmc_jax.experiments import cell_config, expand, read_results, run_grid, summarize
from oefsmc_jax.experiments.summarize import paired_table
from oefsmc_jax.methods import BP, KD
from oefsmc_jax.models import init_variables
from oefsmc_jax.oe.arms import ARMS, class_balanced_probs, data_needs
from oefsmc_jax.training.checkpoint import load_model, save_model

REPO = pathlib.Path(__file__).resolve().parents[1]
deconfound_cifar10 = config("deconfound_cifar10")
demo = config("demo")
large_cifar10 = config("large_cifar10")
methods_cifar10 = config("methods_cifar10")
methods_sweep_cifar10 = config("methods_sweep_cifar10")
methods_fair_cifar10 = config("methods_fair_cifar10")
paper_cifar10 = config("paper_cifar10")
selection_cifar10 = config("selection_cifar10")


def test_expand_and_cell_config():
    groups = [{"name": "g", "method": ["bp", "kd"], "arch": ["resnet8"], "per_class": [2, 4], "mode": ["exp"],
               "seed": [0, 1], "arms": "base,oe", "overrides": {"oe.eta": 0.3}}]
    cells = expand(groups)
    assert len(cells) == 8 and len({c.id for c in cells}) == 8
    assert cells[0].id == "bp-resnet8-n2-exp-eta0.3-s0" and cells[0].arms == ("base", "oe")
    c = cell_config(demo.get_config(), cells[-1], {"resnet8": "/some/teacher"}, rho=5.0)
    assert (c.method.name, c.subset.per_class, c.subset.rho, c.seed, c.subset.seed, c.oe.eta, c.arms) == (
        "kd", 4, 5.0, 1, 1, 0.3, "base,oe")
    assert c.teacher.checkpoint == "/some/teacher"
    with pytest.raises(ValueError, match="grid group 'x' lacks the axes"):
        expand([{"name": "x", "method": ["kd"]}])


@pytest.mark.needs_data
def test_paper_grid_validates():
    from oefsmc_jax.config_validation import validate

    grid = paper_cifar10.get_config()
    cells = expand(grid.groups)
    assert len(cells) == 12 + 12 + 4 + 2 + 18
    for cell in cells:
        validate(cell_config(grid.base, cell, dict(grid.teacher_for_arch), grid.rho), num_devices=4)


@pytest.mark.needs_data
def test_selection_grid_validates():
    from oefsmc_jax.config_validation import validate

    grid = selection_cifar10.get_config()
    cells = expand(grid.groups)
    assert len(cells) == 20 + 5 + 6
    assert [c.id for c in cells if c.arms == ("base", "oe", "oe_complement")] == [
        f"kd-resnet20-n50-exp-s{s}" for s in range(5, 10)]
    assert cells[0].arms == ("base", "oe", "oe_complement", "oe_confidence", "resample", "logit_adjust")
    for cell in cells:
        validate(cell_config(grid.base, cell, dict(grid.teacher_for_arch), grid.rho), num_devices=4)


@pytest.mark.needs_data
def test_methods_sweep_grid_validates_on_the_val_split_at_each_methods_defaults():
    from oefsmc_jax.config_validation import validate
    from oefsmc_jax.methods import METHODS, resolve_oe

    grid = methods_sweep_cifar10.get_config()
    cells = expand(grid.groups)
    assert {c.method for c in cells} == {"bp", "kd", "mir", "practise", "fskd", "cd"}
    assert {c.seed for c in cells} == {0, 1, 2} and len({c.id for c in cells}) == len(cells)
    assert {c.group for c in cells if c.method == "mir"} == {f"sweep_mir_{g}" for g in ("default", "eta", "lambda",
                                                                                         "bn")}
    assert {"sweep_cd_share", "sweep_fskd_share", "sweep_practise_share", "sweep_fskd_target"} <= {c.group
                                                                                                  for c in cells}
    for cell in cells:
        c = cell_config(grid.base, cell, dict(grid.teacher_for_arch), grid.rho)
        assert c.eval.split == "val"
        validate(c, num_devices=4)
        if not cell.overrides:  # the reference cells run each method's own defaults and recipe
            assert resolve_oe(c, METHODS[cell.method]) == METHODS[cell.method].oe_defaults
            assert (c.method.cd.finetune, c.method.cd.batch_size, c.method.fskd.fold) == ("official", 0, "export")


@pytest.mark.needs_data
def test_fair_methods_grid_runs_each_methods_own_settings_and_declares_its_contrasts():
    from oefsmc_jax.config_validation import validate
    from oefsmc_jax.methods import METHODS, resolve_oe

    grid = methods_fair_cifar10.get_config()
    cells = expand(grid.groups)
    assert len(cells) == 6 * 2 * 5 * 2 + 2 * 5  # methods x budgets x seeds x (long-tailed, balanced) + CD + KD
    assert {c.method for c in cells} == {"bp", "kd", "mir", "practise", "fskd", "cd"}
    teacher = {c.method: c.arms[2] for c in cells if c.group == "fair"}
    # R stays off where the method's R is off: MiR's and PRACTISE's label-free recipes, KD by its sweep
    assert teacher == {"bp": "oe_complement_r", "kd": "oe_complement", "mir": "oe_complement",
                       "practise": "oe_complement", "fskd": "oe_complement_r", "cd": "oe_complement_r"}
    for cell in cells:
        c = cell_config(grid.base, cell, dict(grid.teacher_for_arch), grid.rho)
        validate(c, num_devices=4)
        assert c.eval.split == "test" and c.oe.early_stopping is False
        assert resolve_oe(c, METHODS[cell.method]) == METHODS[cell.method].oe_defaults
        assert c.method.cd.finetune == ("kd" if cell.group == "fair_cd_kd" else "official")
        assert (c.method.cd.batch_size, c.method.fskd.fold) == (0, "export")
    contrasts = grid.primary_contrasts
    assert len(contrasts) == 30 and grid.primary_declared_after_results is False
    assert "fskd" not in {p["method"] for p in contrasts}  # its OOD arms are the base method by construction
    assert {(p["a"], p["b"]) for p in contrasts if p["method"] == "mir"} == {
        ("oe", "base"), ("oe_complement", "base"), ("oe_complement", "oe")}


def test_committed_grids_pin_the_settings_they_ran_with():
    """The committed records reproduce: eta 0.1 for every OOD arm (MiR and PRACTISE too), BN joint, 1/count
    calibration weights, CD with the project's loop on a 128-row subset, FSKD folded at each solve."""
    from oefsmc_jax.methods import METHODS, resolve_oe

    confirm_cifar10 = config("confirm_cifar10")

    for module in (paper_cifar10, selection_cifar10, methods_cifar10, deconfound_cifar10, large_cifar10,
                   confirm_cifar10):
        b = module.get_config().base
        for cls in METHODS.values():
            s = resolve_oe(b, cls)
            assert (s.eta, s.bn_mode, s.calibration_ood_share) == (0.1, "joint", None), module.__name__
        assert b.oe.lambda_jd == (1.0 if module is paper_cifar10 else 0.3), module.__name__
        assert (b.method.cd.finetune, b.method.cd.batch_size, b.method.fskd.fold, b.method.fskd.target) == (
            "ce", 128, "solve", "branch"), module.__name__


@pytest.mark.needs_data
def test_methods_grid_validates():
    from oefsmc_jax.config_validation import validate

    grid = methods_cifar10.get_config()
    cells = expand(grid.groups)
    assert len(cells) == 4 * 2 * 2 * 5 and {c.method for c in cells} == {"mir", "practise", "fskd", "cd"}
    assert cells[0].arms == ("base", "oe", "oe_complement")
    assert [c.id for c in cells[:5]] == [f"{m}-resnet20-n10-exp-s0" for m in ("mir", "practise", "fskd", "cd")] + [
        "mir-resnet20-n10-balanced-s0"]
    assert cells[4].arms == ("base",)
    assert grid.base.method.practise.k == 2 and grid.base.optim.decay_at == (0.4, 0.8)
    for cell in cells[::5]:
        validate(cell_config(grid.base, cell, dict(grid.teacher_for_arch), grid.rho), num_devices=4)


@pytest.mark.parametrize("pool", ["tiny", "tiny_disjoint", "dtd"])
@pytest.mark.needs_data
def test_deconfound_grid_validates(pool):
    from oefsmc_jax.config_validation import validate

    grid = deconfound_cifar10.get_config(f"pool={pool}")
    cells = expand(grid.groups)
    assert len(cells) == 10 + 10 + 9 and grid.base.oe.early_stopping_arms == "all"
    assert cells[0].arms == ("base", "oe", "oe_random_matched", "oe_random_matched_r", "oe_complement",
                             "oe_complement_r", "oe_confidence")
    for cell in cells[::4]:
        validate(cell_config(grid.base, cell, dict(grid.teacher_for_arch), grid.rho), num_devices=4)


def test_deconfound_grid_key_settings_and_bad_arguments():
    grid = deconfound_cifar10.get_config("pool=dtd,arms=base+oe+oe_complement,budgets=10")
    cells = expand(grid.groups)
    assert [c.group for c in cells] == ["factorial"] * 5 + ["no_early_stopping"] * 5 + ["sweep_c1"] * 3 + [
        "sweep_c2.5"] * 3 + ["sweep_c5"] * 3
    assert {c.arms for c in cells[:10]} == {("base", "oe", "oe_complement")}
    assert {c.per_class for c in cells} == {10}
    with pytest.raises(ValueError, match=r"arms='base\+foo': allowed: base\+oe\+"):
        deconfound_cifar10.get_config("arms=base+foo")
    with pytest.raises(ValueError, match="budgets='ten'"):
        deconfound_cifar10.get_config("budgets=ten")


@pytest.mark.needs_data
def test_large_grid_runs_seed_by_seed_and_validates():
    from oefsmc_jax.config_validation import validate

    grid = large_cifar10.get_config("seeds=2")
    cells = expand(grid.groups)
    assert [c.id for c in cells[:5]] == [f"kd-resnet56-n{n}-exp-s0" for n in (10, 20, 50, 100)] + [
        "kd-resnet56-n10-exp-s1"]
    assert len(cells) == 2 * 4 * 2 and {c.group for c in cells} == {"large"}
    assert (grid.base.train.steps, grid.base.train.batch_id, grid.base.train.batch_ood) == (2000, 64, 64)
    for cell in cells:
        validate(cell_config(grid.base, cell, dict(grid.teacher_for_arch), grid.rho), num_devices=4)


def test_class_balanced_probs_and_logit_adjustment():
    y = np.array([0, 0, 0, 1])
    p = class_balanced_probs(y, 2)
    np.testing.assert_allclose(p, [1 / 6, 1 / 6, 1 / 6, 1 / 2], rtol=1e-6)
    logits = jnp.array([[1.0, 0.0]])
    labels = jnp.array([1])
    # counts [3, 1] -> prior [.75, .25]; adjusted logits [1 + log .75, log .25], so the CE of label 1 is
    # -log(.25 / (.75 e + .25)) = log(1 + 3e) (plain CE would be log(1 + e))
    la = math.log(1 + 3 * math.e)
    la_arm = ARMS["logit_adjust"]
    assert float(la_arm.wrap(BP((0.5,)).recipe(), np.array([3, 1])).base_loss({"logits": logits}, None, labels)) == (
        pytest.approx(la, rel=1e-5))
    kd = la_arm.wrap(KD((0.5,), gamma=0.9, tau=4.0).recipe(), np.array([3, 1]))
    t = {"logits": jnp.array([[0.0, 1.0]])}
    # distillation term on the unadjusted logits: 16 * KL(softmax([0, .25]) || softmax([.25, 0]))
    p_t = np.exp([0.0, 0.25]) / np.exp([0.0, 0.25]).sum()
    kl = 16 * float(np.sum(p_t * np.log(p_t / p_t[::-1])))
    assert float(kd.base_loss({"logits": logits}, t, labels)) == pytest.approx(0.1 * la + 0.9 * kl, rel=1e-5)
    plain = BP((0.5,)).recipe()
    assert ARMS["base"].wrap(plain, np.array([3, 1])) is plain  # other arms leave the recipe as it is
    assert float(plain.base_loss({"logits": logits}, None, labels)) == pytest.approx(math.log(1 + math.e), rel=1e-5)


def test_validation_split_is_balanced_and_disjoint_from_the_few_samples(tmp_path):
    c = demo.get_config("per_class=5,oe=0")
    c.eval.split = "val"
    c.eval.val_per_class = 20
    data = prepare_data(c, tmp_path, data_needs(c))
    assert np.bincount(data.test.y, minlength=10).tolist() == [20] * 10
    assert data.test.name.endswith("[val]")
    train_ids = {bytes(x) for x in data.train.x}
    assert not any(bytes(x) in train_ids for x in data.test.x)


@pytest.fixture(scope="module")
def tiny_grid_config(tmp_path_factory):
    """The tiny grid and its saved random teacher, not yet run."""
    root = tmp_path_factory.mktemp("grid")
    spec = tiny_spec()
    save_model(root / "teacher", spec, init_variables(spec, 8, 0))
    base = demo.get_config()
    for k in ("id", "test", "ood"):
        base.data[k].image_size = 8
    base.data.image_size = 8
    base.data.ood.num_images = 300
    base.data.pad = 1
    base.train.steps = 3
    base.train.batch_id = 8
    base.train.batch_ood = 8
    base.oe.heldout = 16
    base.oe.eval_every = 3
    base.eval.latency = False
    grid = ml_collections.ConfigDict({
        "title": "tiny", "rho": 4.0, "base": base, "teacher_for_arch": {"resnet8": str(root / "teacher")},
        "groups": [{"name": "g", "method": ["kd"], "arch": ["resnet8"], "per_class": [3], "mode": ["exp"],
                    "seed": [0, 1], "arms": "base,oe,logit_adjust"},
                   {"name": "h", "method": ["bp"], "arch": ["resnet8"], "per_class": [3], "mode": ["exp"],
                    "seed": [0], "arms": "oe_complement,oe_confidence,oe_random_matched,oe_complement_r"}]})
    return root, grid


@pytest.fixture(scope="module")
def tiny_grid(tiny_grid_config):
    root, grid = tiny_grid_config
    records = run_grid(grid, root / "w")
    return root, grid, records


@pytest.mark.slow
def test_grid_records_every_arm_and_never_reruns(tiny_grid, capfd):
    root, grid, records = tiny_grid
    assert sorted((r["cell"], r["arm"]) for r in records) == sorted(
        [(f"kd-resnet8-n3-exp-s{s}", a) for s in (0, 1) for a in ("base", "oe", "logit_adjust")]
        + [("bp-resnet8-n3-exp-s0", a) for a in ("oe_complement", "oe_confidence", "oe_random_matched",
                                                  "oe_complement_r")])
    h = {r["arm"]: r for r in records if r["cell"] == "bp-resnet8-n3-exp-s0"}
    # the deconfounding arms: random images at the teacher complement's count with R off; the complement with R on
    assert h["oe_random_matched"]["ood_images"] == h["oe_complement"]["ood_images"] > 0
    bp_eta = BP.oe_defaults.eta  # R on at BP's own weight
    assert (h["oe_complement"]["eta"], h["oe_random_matched"]["eta"], h["oe_complement_r"]["eta"]) == (0.0, 0.0,
                                                                                                       bp_eta)
    assert h["oe_random_matched"]["ood_selection"] == "random"
    assert h["oe_random_matched"]["metrics"] != h["oe_complement"]["metrics"]
    for arm, rule in (("oe", "random"), ("oe_complement", "teacher_complement"),
                      ("oe_confidence", "teacher_confidence")):  # every base method takes every selection rule
        cell = "kd-resnet8-n3-exp-s0" if arm == "oe" else "bp-resnet8-n3-exp-s0"
        res = json.loads((root / "w" / "cells" / cell / arm / "result.json").read_text())
        assert res["ood_selection"] == rule and res["ood_images"] > 0
    r = records[0]
    assert {"metrics", "config", "wall_s", "version", "teacher", "params", "flops", "seed", "device", "git_commit",
            "git_dirty", "versions", "ood_images", "stopped_early", "method_hparams"} <= set(r)
    assert r["versions"]["jax"] and r["method_hparams"].startswith("kd(prune_ratio=")
    assert r["config"]["oe"]["cache_dir"] == "<workdir>/cache"  # paths under the workdir or data root are portable
    assert re.fullmatch(r"\d+ x cpu \(.+\)", r["device"]), r["device"]
    assert r["config"]["subset"]["rho"] == 4.0
    again = run_grid(grid, root / "w")
    assert len(again) == len(records)
    assert "3 cells, 3 finished earlier, 0 to run" in capfd.readouterr().err
    run_grid(grid, root / "w", cell_id="bp-resnet8-n3-exp-s0, kd-resnet8-n3-exp-s1")  # a list of cells
    assert "2 cells, 2 finished earlier, 0 to run" in capfd.readouterr().err
    assert ARMS["oe_complement_r"].fixed_labels and not ARMS["oe_complement"].fixed_labels


@pytest.mark.slow
def test_summary_reports_paired_differences(tiny_grid):
    root, grid, records = tiny_grid
    path = summarize(root / "w" / "results.jsonl", root / "summary", None, "tiny")
    text = path.read_text()
    by = {(r["seed"], r["arm"]): r["metrics"]["top1"] for r in records}
    d = paired_difference([by[(0, "oe")], by[(1, "oe")]], [by[(0, "base")], by[(1, "base")]])
    assert f"{d['mean']:+.2f}" in text and f"[{d['ci_low']:+.1f}, {d['ci_high']:+.1f}]" in text
    assert (root / "summary" / "per_class.png").stat().st_size > 1000
    assert "+ logit adj." in text
    assert f"Run on: {records[0]['device']}." in text
    assert "What imbalance costs" not in text  # no balanced cells in this grid: no empty table
    assert json.loads((root / "w" / "results.jsonl").read_text().splitlines()[0])["cell"].startswith("kd-")


@pytest.mark.slow
def test_torn_record_and_empty_result_json_resume_to_the_same_records(tiny_grid, tmp_path, capfd):
    """A grid killed while appending a cell's records, with one of that cell's result.json files left empty: the
    resumed grid names both, reruns that cell (only the empty arm trains; its checkpoints make it the same student)
    and records exactly the metrics of the uninterrupted grid, below the torn bytes, which stay."""
    root, grid, records = tiny_grid
    w = tmp_path / "w"
    shutil.copytree(root / "w", w, ignore=shutil.ignore_patterns("summary"))
    lines = (w / "results.jsonl").read_text().splitlines(keepends=True)
    assert [json.loads(x)["cell"] for x in lines[6:]] == ["bp-resnet8-n3-exp-s0"] * 4
    kept = "".join(lines[:7]) + lines[7][:40]  # killed inside the second record of the last cell
    (w / "results.jsonl").write_text(kept)
    empty = w / "cells" / "bp-resnet8-n3-exp-s0" / "oe_confidence" / "result.json"
    empty.write_text("")
    capfd.readouterr()
    again = run_grid(grid, w)
    err = capfd.readouterr().err
    assert f"{w / 'results.jsonl'} line 8 is torn or not JSON; skipped (its cell will be rerun)" in err
    assert "3 cells, 2 finished earlier, 1 to run" in err
    assert (f"note: {empty} is empty, torn or not a result; the arm counts as not finished and runs again"
            in err)
    assert (w / "results.jsonl").read_text().startswith(kept + "\n")
    assert len(again) == len(records) == 10
    before = {(r["cell"], r["arm"]): (r["metrics"], r["steps"], r["best_step"]) for r in records}
    assert {(r["cell"], r["arm"]): (r["metrics"], r["steps"], r["best_step"]) for r in again} == before
    assert json.loads(empty.read_text())["metrics"] == before[("bp-resnet8-n3-exp-s0", "oe_confidence")][0]


def test_torn_last_line_is_ignored(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"cell": "a", "arm": "base"}\n{"cell": "b", "ar')
    assert read_results(p) == [{"cell": "a", "arm": "base"}]


def test_paired_table_against_any_reference_arm():
    def rec(seed, arm, top1):
        return {"group": "g", "method": "kd", "arch": "r", "per_class": 10, "mode": "exp", "seed": seed, "arm": arm,
                "metrics": {"top1": top1}}

    records = [rec(0, "base", 50.0), rec(0, "oe", 51.0), rec(0, "oe_complement", 60.0), rec(0, "resample", 40.0),
               rec(1, "base", 48.0), rec(1, "oe", 52.0), rec(1, "oe_complement", 58.0), rec(1, "resample", 47.0),
               rec(2, "oe_complement", 99.0)]  # seed 2 has neither base nor oe: never paired
    vs_paper = paired_table(records, "top1", reference="oe", arms=("oe_complement",))
    # d = (60 - 51, 58 - 52) = (9, 6): mean 7.5, sd 2.121, se 1.5, t(1) = 12.706 -> half width 19.06
    assert "Arm vs OE-FSMC" in vs_paper
    assert "+7.50" in vs_paper and "[-11.6, +26.6]" in vs_paper
    assert "+9.0, +6.0" in vs_paper and "resampling" not in vs_paper and "| 2     |" in vs_paper
    vs_base = paired_table(records, "top1")
    assert "Arm vs base" in vs_base and "+ resampling" in vs_base and "+ OE-FSMC" in vs_base
    assert paired_table(records, "top1", reference="oe_confidence") == ""


def test_imbalance_drop_is_paired_by_seed_with_an_interval():
    from oefsmc_jax.experiments.summarize import imbalance_table

    def rec(seed, mode, top1):
        return {"group": "g", "method": "kd", "arch": "r", "per_class": 10, "mode": mode, "seed": seed,
                "arm": "base", "metrics": {"top1": top1}}

    records = [rec(0, "balanced", 60), rec(1, "balanced", 62), rec(2, "balanced", 61), rec(0, "exp", 50),
               rec(1, "exp", 55), rec(2, "exp", 52), rec(3, "exp", 40)]  # seed 3 has no balanced partner
    row = imbalance_table(records).splitlines()[2]
    # drops 10, 7, 9: mean 8.67, sd 1.528, t(2) = 4.303 -> half width 3.79
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4:] == ["61.0", "49.2", "3", "+8.7", "[+4.9, +12.5]"]


def test_factorial_contrasts_change_one_thing_each():
    from oefsmc_jax.experiments.summarize import factorial_table

    top1 = {"oe": [50, 52], "oe_random_matched": [55, 54], "oe_random_matched_r": [53, 53], "oe_complement": [60, 61],
            "oe_complement_r": [58, 61]}
    records = [{"group": "g", "method": "kd", "arch": "r", "per_class": 10, "mode": "exp", "seed": s, "arm": arm,
                "metrics": {"top1": v[s]}} for arm, v in top1.items() for s in (0, 1)]
    rows = {r.split("|")[5].strip(): [c.strip() for c in r.strip("|").split("|")] for r in
            factorial_table(records).splitlines()[2:]}
    assert rows["choice of images (same count, R off)"][6] == "+6.00"  # (60-55 + 61-54) / 2
    assert rows["R, on teacher-chosen images (labels: the chosen class)"][6] == "-1.00"
    assert rows["R, on random images"][6] == "-1.50"
    assert rows["count: teacher's instead of K*n_max - n (random images, R on)"][6] == "+2.00"
    # d = (10, 9): mean 9.5, sd 0.707, t(1) = 12.706 -> half width 6.35
    assert rows["all together: teacher complement, R off, vs the paper's arm"][6:] == ["+9.50", "[+3.1, +15.9]"]
    assert rows["all together, R on: teacher complement, R on, vs the paper's arm"][6] == "+8.50"  # (8 + 9) / 2


def test_early_stopping_table_pairs_on_and_off_runs_of_the_same_arm_and_seed():
    from oefsmc_jax.experiments.summarize import early_stopping_table

    def rec(group, arm, seed, top1, off, best=200, **extra):
        return {"group": group, "method": "kd", "arch": "r", "per_class": 10, "mode": "exp", "seed": seed,
                "arm": arm, "overrides": ({"oe.early_stopping": False} if off else {}) | extra,
                "metrics": {"top1": top1}, "steps": 200, "best_step": best, "stopped_early": best < 200}

    records = [rec("factorial", "oe", 0, 50.0, False, best=100), rec("factorial", "oe", 1, 52.0, False),
               rec("no_es", "oe", 0, 47.0, True), rec("no_es", "oe", 1, 51.0, True),
               rec("factorial", "base", 0, 40.0, False),  # no partner with it off: left out
               rec("no_es", "oe", 2, 60.0, True),  # no partner with it on: left out
               rec("sweep", "oe", 0, 99.0, False, **{"eval.split": "val"}),  # other settings: never paired
               rec("sweep", "oe", 0, 10.0, True, **{"eval.split": "val"})]
    rows = [[c.strip() for c in r.strip("|").split("|")] for r in early_stopping_table(records).splitlines()[2:]]
    # d = (50 - 47, 52 - 51) = (3, 1): mean 2, sd 1.414, se 1, t(1) = 12.706
    assert rows[0][3:] == ["-", "+ OE-FSMC", "2", "51.0", "49.0", "+2.00", "[-10.7, +14.7]", "1/2"]
    assert rows[1][3:] == ["split=val", "+ OE-FSMC", "1", "99.0", "10.0", "+89.00", "-", "0/1"]
    assert len(rows) == 2
    assert early_stopping_table([r for r in records if r["group"] != "no_es" and r["group"] != "sweep"]) == ""


def test_tracked_best_table_reads_what_early_stopping_would_have_kept():
    from oefsmc_jax.experiments.summarize import tracked_best_table

    def rec(arm, seed, final, kept, step, stop=None, track=True):
        r = {"method": "kd", "arch": "r", "per_class": 10, "mode": "exp", "seed": seed, "arm": arm, "overrides": {},
             "metrics": {"top1": final}, "steps": 2000, "best_step": 2000, "stopped_early": False}
        if track:
            r["tracked_best"] = {"step": step, "stop_step": stop, "heldout_agreement": 80.0,
                                 "metrics": {"top1": kept}}
        return r

    records = [rec("oe", 0, 50.0, 53.0, 300, 800), rec("oe", 1, 52.0, 53.0, 1900), rec("oe", 2, 40.0, 42.0, 700, 1200),
               rec("base", 0, 30.0, 31.0, 100, 600), rec("base", 1, 30.0, 0.0, 100, track=False)]
    rows = [[c.strip() for c in r.strip("|").split("|")] for r in tracked_best_table(records).splitlines()[2:]]
    # oe: d = (3, 1, 2): mean 2, sd 1, se 0.577, t(2) = 4.303 -> half width 2.48
    assert rows == [["KD", "10", "exp", "-", "base", "1", "30.0", "31.0", "+1.00", "-", "100 (100-100)", "1/1"],
                    ["KD", "10", "exp", "-", "+ OE-FSMC", "3", "47.3", "49.3", "+2.00", "[-0.5, +4.5]",
                     "700 (300-1900)", "2/3"]]
    assert tracked_best_table([r for r in records if "tracked_best" not in r]) == ""


def test_summarize_joins_results_files_and_the_first_file_wins(tmp_path):
    from oefsmc_jax.experiments.summarize import join_results, summarize

    def rec(group, arm, seed, top1, commit):
        return {"group": group, "cell": f"c-s{seed}", "method": "kd", "arch": "r", "per_class": 10, "mode": "exp",
                "seed": seed, "arm": arm, "metrics": {"top1": top1}, "git_commit": commit, "teacher": {"top1": 80.0}}

    (tmp_path / "new").mkdir()
    (tmp_path / "old").mkdir()
    new = [rec("g", "oe_complement", 0, 51.0, "b" * 40), rec("g", "oe_complement", 1, 53.0, "b" * 40)]
    old = [rec("g", "oe_complement", 0, 99.0, "a" * 40), rec("g", "base", 0, 50.0, "a" * 40),
           rec("g", "base", 1, 50.0, "a" * 40)]
    for name, rs in (("new", new), ("old", old)):
        (tmp_path / name / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    records, sources = join_results(tmp_path / "new" / "results.jsonl", (tmp_path / "old" / "results.jsonl",))
    assert sources == [("new/results.jsonl", 2), ("old/results.jsonl", 2)]
    assert sorted((r["arm"], r["seed"], r["metrics"]["top1"]) for r in records) == [
        ("base", 0, 50.0), ("base", 1, 50.0), ("oe_complement", 0, 51.0), ("oe_complement", 1, 53.0)]
    text = summarize(tmp_path / "new" / "results.jsonl", tmp_path / "out",
                     also=(tmp_path / "old" / "results.jsonl",)).read_text()
    assert "4 arm results 2 from `new/results.jsonl`, 2 from `old/results.jsonl`" in text
    assert "`aaaaaaa` (2 records), `bbbbbbb` (2 records)" in text
    assert "+2.00" in text  # (51 - 50 + 53 - 50) / 2: the arm paired with the joined base, never the dropped 99.0


def test_pools_compare_the_same_contrasts_per_pool_and_plot_them(tmp_path):
    from oefsmc_jax.experiments.pools import main

    def recs(offset, arms):
        base = {"base": [40, 42, 41], "oe": [45, 44, 46], "oe_random_matched": [47, 46, 45], "oe_complement": [50, 52,
                                                                                                              51]}
        return [{"group": "factorial", "cell": f"kd-s{s}", "method": "kd", "arch": "r", "per_class": 10,
                 "mode": "exp", "seed": s, "arm": a,
                 "metrics": {"top1": base[a][s] + (offset if a == "oe_complement" else 0)}}
                for a in arms for s in range(3)] + [
            {"group": "sweep", "cell": "kd-sweep-s0", "method": "kd", "arch": "r", "per_class": 10, "mode": "exp",
             "seed": 0, "arm": "oe", "metrics": {"top1": 0.0}}]  # another group: left out by --group

    for name, offset, arms in [("tiny", 0, ("base", "oe", "oe_random_matched", "oe_complement")),
                               ("dtd", -6, ("base", "oe", "oe_complement"))]:
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs(offset, arms)))
    out = tmp_path / "out"
    assert main(["--results", f"tiny={tmp_path / 'tiny.jsonl'}", "--results", f"dtd={tmp_path / 'dtd.jsonl'}",
                 "--group", "factorial", "--out", str(out)]) == 0
    rows = [[c.strip() for c in r.strip("|").split("|")] for r in (out / "pools.md").read_text().splitlines()[2:]
            if r.startswith("| ")]
    got = {(r[0], r[2]): r[4:] for r in rows}
    # tiny: complement - base = 10, 10, 10 -> +10.00 with zero spread; complement - random, same count: 3, 6, 6
    assert got[("tiny", "teacher complement − base")] == ["+10.00", "[+10.0, +10.0]"]
    assert got[("tiny", "teacher complement − random images, same count, R off (the choice of images)")][0] == "+5.00"
    assert got[("dtd", "teacher complement − OE-FSMC (paper)")][0] == "+0.00"  # 44-45, 46-44, 45-46
    assert ("dtd", "teacher complement − random images, same count, R off (the choice of images)") not in got
    assert (out / "pools.png").read_bytes()[:4] == b"\x89PNG"
    # the same contrasts across grids that differ in something else (e.g. the step budget), under other names
    assert main(["--results", f"200={tmp_path / 'tiny.jsonl'}", "--results", f"2000={tmp_path / 'dtd.jsonl'}",
                 "--group", "factorial", "--out", str(out), "--stem", "budgets", "--label", "steps",
                 "--title", "The same arms at two budgets"]) == 0
    text = (out / "budgets.md").read_text().splitlines()
    assert text[0] == "# The same arms at two budgets" and text[2].split("|")[1].strip() == "steps"
    assert any(r.startswith("| 2000 ") and "teacher complement − base" in r and "+4.00" in r for r in text)
    assert (out / "budgets.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit):
        main(["--results", "no-equals-sign", "--out", str(out)])


@pytest.mark.slow
def test_grouped_grid_equals_one_cell_at_a_time(tiny_grid, tmp_path):
    """The tiny grid ran its two KD seeds together (default group size 8); one at a time gives the same students."""
    root, grid, records = tiny_grid
    one = ml_collections.ConfigDict(grid.to_dict())
    one.groups = [grid.groups[0]]
    one.group_size = 1
    alone = run_grid(one, tmp_path / "w")
    grouped = {(r["cell"], r["arm"]): r for r in records}
    assert len(alone) == 6
    for r in alone:
        g = grouped[(r["cell"], r["arm"])]
        assert (r["group_size"], g["group_size"]) == (1, 8)
        assert r["steps"] == g["steps"] and r["best_step"] == g["best_step"]
        _, a, _ = load_model(tmp_path / "w" / "cells" / r["cell"] / r["arm"] / "student")
        _, b, _ = load_model(root / "w" / "cells" / r["cell"] / r["arm"] / "student")
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("field,value,message", [
    ("group_size", 0, r"^config.group_size: 0 is not allowed; 1 \(one run at a time\) or more"),
    ("group_impl", "pmap", r"^config.group_impl: 'pmap' is not allowed; choose one of auto, vmap, map, unroll$")])
def test_bad_group_settings_are_named(tiny_grid_config, tmp_path, field, value, message):
    _, grid = tiny_grid_config
    bad = ml_collections.ConfigDict(grid.to_dict())
    bad[field] = value
    with pytest.raises(ConfigError, match=message):
        run_grid(bad, tmp_path / "w")
    assert not (tmp_path / "w").exists()  # refused before anything is written


def test_settings_table_pairs_each_setting_with_the_same_arm_at_the_defaults():
    from oefsmc_jax.experiments.summarize import settings_table

    def rec(group, arm, seed, top1, **ov):
        return {"group": group, "method": "cd", "arch": "r", "per_class": 10, "mode": "exp", "seed": seed,
                "arm": arm, "overrides": ov, "metrics": {"top1": top1}}

    records = [rec("default", "oe", 0, 60.0), rec("default", "oe", 1, 62.0), rec("default", "base", 0, 50.0),
               rec("eta", "oe", 0, 63.0, **{"oe.eta": 0.0}), rec("eta", "oe", 1, 63.0, **{"oe.eta": 0.0}),
               rec("eta", "oe", 2, 70.0, **{"oe.eta": 0.0}),  # seed 2 has no default partner: left out
               rec("bn", "oe", 0, 58.0, **{"oe.bn_mode": "separate"}),
               rec("es", "oe", 0, 1.0, **{"oe.early_stopping": False})]  # early stopping has its own table
    rows = [[c.strip() for c in r.strip("|").split("|")] for r in settings_table(records).splitlines()[2:]]
    # eta=0: d = (63 - 60, 63 - 62) = (3, 1): mean 2, sd 1.414, se 1, t(1) = 12.706 -> [-10.7, +14.7]
    assert rows == [["CD", "10", "exp", "bn_mode=separate", "+ OE-FSMC", "1", "58.0", "60.0", "-2.00", "-", "-2.0"],
                    ["CD", "10", "exp", "eta=0.0", "+ OE-FSMC", "2", "63.0", "61.0", "+2.00", "[-10.7, +14.7]",
                     "+3.0, +1.0"]]
    assert settings_table([r for r in records if r["group"] == "default"]) == ""
