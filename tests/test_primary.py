"""Primary contrasts declared in grid configs: exact paired t-test p and Holm correction; the confirmatory grid."""

import json
import pathlib

import numpy as np
import pytest
from helpers import config
from scipy import stats

from oefsmc_jax.errors import ConfigError
from oefsmc_jax.experiments import cell_config, expand
from oefsmc_jax.experiments.primary import check_primary_contrasts, holm, paired_t_pvalue, primary_contrasts

REPO = pathlib.Path(__file__).resolve().parents[1]
confirm_cifar10 = config("confirm_cifar10")
deconfound_cifar10 = config("deconfound_cifar10")
fixed_budget_cifar10 = config("fixed_budget_cifar10")
methods_cifar10 = config("methods_cifar10")
paper_cifar10 = config("paper_cifar10")
selection_cifar10 = config("selection_cifar10")

# a hand-made grid: three arms on four seeds at 10 per class, two arms on three seeds at 50
TOP1 = {10: {"base": [50.0, 48.0, 47.0, 52.0], "oe": [51.0, 50.0, 46.0, 53.5],
             "oe_complement": [58.0, 55.0, 57.5, 60.0]},
        50: {"base": [60.0, 62.0, 61.0], "oe": [60.5, 61.0, 62.5]}}


def _records() -> list[dict]:
    return [{"group": "g", "cell": f"kd-n{n}-s{s}", "method": "kd", "arch": "r", "per_class": n, "mode": "exp",
             "seed": s, "arm": arm, "metrics": {"top1": v}, "teacher": {"top1": 80.0},
             "overrides": {"eval.split": "val"}}  # no per-class plot: these records have no per-class figures
            for n, arms in TOP1.items() for arm, vs in arms.items() for s, v in enumerate(vs)]


ENTRIES = [{"a": "oe_complement", "b": "oe", "per_class": 10},
           {"a": "oe", "b": "base", "per_class": 10},
           {"a": "oe", "b": "base", "per_class": 50},
           {"a": "oe_complement", "b": "base", "per_class": 50, "label": "never run"}]


def test_paired_t_pvalue_and_holm_against_scipy_and_a_hand_computation():
    rows = primary_contrasts(_records(), ENTRIES)
    t = TOP1
    raw = [stats.ttest_rel(t[10]["oe_complement"], t[10]["oe"]).pvalue,
           stats.ttest_rel(t[10]["oe"], t[10]["base"]).pvalue,
           stats.ttest_rel(t[50]["oe"], t[50]["base"]).pvalue]
    # by hand: d = (7, 5, 11.5, 6.5), mean 7.5, sd 2.8284, t = 5.3033 on 3 df
    assert raw[0] == pytest.approx(2 * stats.t.sf(7.5 / (np.std([7, 5, 11.5, 6.5], ddof=1) / 2), 3), rel=1e-12)
    assert [r["p"] for r in rows[:3]] == pytest.approx(raw, rel=1e-12)
    assert rows[3]["p"] is None and rows[3]["status"] == "not run" and rows[3]["label"] == "never run"
    # Holm by hand over m = 4 (the entry that did not run counts as p = 1): sort ascending, multiply by 4, 3, 2, 1,
    # carry the running maximum, cap at 1
    p_sorted = sorted(range(3), key=lambda i: raw[i])
    expected = {}
    running = 0.0
    for rank, i in enumerate(p_sorted):
        running = max(running, min(1.0, (4 - rank) * raw[i]))
        expected[i] = running
    assert [r["p_holm"] for r in rows] == pytest.approx([expected[0], expected[1], expected[2], 1.0], rel=1e-12)
    assert rows[0]["d"]["mean"] == pytest.approx(7.5) and rows[0]["d"]["n"] == 4
    assert rows[2]["d"]["n"] == 3 and rows[0]["setting"][:5] == ("g", "kd", "r", 10, "exp")


def test_holm_is_step_down_monotone_and_capped():
    # ascending 0.01, 0.03, 0.04, 0.5: 0.01 * 4 = 0.04; 0.03 * 3 = 0.09; 0.04 * 2 = 0.08 -> raised to 0.09
    # (monotone); 0.5 * 1 = 0.5
    assert holm([0.04, 0.01, 0.5, 0.03]) == pytest.approx([0.09, 0.04, 0.5, 0.09])
    assert holm([0.6, 0.7]) == [1.0, 1.0]
    assert holm([]) == []
    assert paired_t_pvalue([1.0, 2.0], [1.0, 2.0]) == 1.0 and paired_t_pvalue([2.0, 3.0], [1.0, 2.0]) == 0.0
    assert paired_t_pvalue([1.0], [0.0]) is None
    with pytest.raises(ValueError, match="lie in"):
        holm([1.5])


def test_an_entry_matching_two_settings_is_ambiguous_and_counts_as_p_one():
    rows = primary_contrasts(_records(), [{"a": "oe", "b": "base"}, {"a": "oe", "b": "base", "per_class": 10}])
    assert rows[0]["status"] == "ambiguous: 2 settings" and rows[0]["p"] is None and rows[0]["p_holm"] == 1.0
    assert rows[1]["p_holm"] == pytest.approx(min(1.0, 2 * rows[1]["p"]))


def test_summary_prints_the_primary_table_first_and_labels_the_rest_exploratory(tmp_path):
    from oefsmc_jax.experiments.summarize import summarize

    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records()))
    text = summarize(tmp_path / "results.jsonl", tmp_path / "out", primary=ENTRIES,
                     primary_after_results=True).read_text()
    assert text.index("## Primary contrasts") < text.index("## Paired differences to the base method")
    assert "**declared after the results were seen**" in text and "Holm: step-down over these 4" in text
    assert "## Paired differences to the base method (same seed, same subset, same test split) — exploratory" in text
    rows = primary_contrasts(_records(), ENTRIES)
    line = next(x for x in text.splitlines() if x.startswith("| 1 "))
    assert f"{rows[0]['p']:.4f}" in line and f"{rows[0]['p_holm']:.4f}" in line and "+7.50" in line
    assert "not run" in next(x for x in text.splitlines() if x.startswith("| 4 "))
    plain = summarize(tmp_path / "results.jsonl", tmp_path / "out2").read_text()
    assert "No primary contrasts are declared" in plain and "## Primary contrasts" not in plain


@pytest.mark.parametrize("entries, message", [
    ([{"a": "oe", "b": "nope"}], r"primary_contrasts\[0\]\.b: 'nope' is not an arm"),
    ([{"a": "oe", "b": "oe"}], "both 'oe'"),
    ([{"a": "oe", "b": "base", "seed": 1}], "unknown key"),
    ([{"a": "oe", "b": "base", "per_class": "10"}], "per_class: an integer"),
    ("oe-base", "a list of contrasts"),
    ([{"a": "oe", "b": "base"}], r"primary_contrasts\[0\] .*picks 10 .*add a filter"),
    ([{"a": "oe", "b": "base", "method": "bp", "per_class": 10, "group": "main_exp", "arch": "resnet20"},
      {"a": "oe_complement", "b": "oe", "per_class": 10}], r"primary_contrasts\[1\] .*picks 0"),
])
def test_bad_primary_contrasts_are_named_in_one_line(entries, message):
    grid = paper_cifar10.get_config()
    del grid["primary_contrasts"]  # a fresh field, so that a value of another type is accepted
    grid.primary_contrasts = entries
    with pytest.raises(ConfigError, match=message):
        check_primary_contrasts(grid)
    del grid["primary_contrasts"]
    grid.primary_contrasts = []
    del grid["primary_declared_after_results"]
    grid.primary_declared_after_results = "yes"
    with pytest.raises(ConfigError, match="primary_declared_after_results: True or False"):
        check_primary_contrasts(grid)


@pytest.mark.parametrize("module, arg, n", [
    (paper_cifar10, None, 4), (selection_cifar10, None, 4), (methods_cifar10, None, 8),
    (deconfound_cifar10, "pool=tiny", 4), (deconfound_cifar10, "pool=dtd,arms=base+oe+oe_random_matched+oe_complement"
                                           ",budgets=10", 2),
    (deconfound_cifar10, "arms=base+oe+oe_random_matched+oe_complement_r,budgets=50", 2),
    (paper_cifar10, "runlocal=1", 0), (selection_cifar10, "runlocal=1", 0), (methods_cifar10, "runlocal=1", 0),
    (deconfound_cifar10, "runlocal=1", 0), (confirm_cifar10, "runlocal=1", 0),
    (fixed_budget_cifar10, "runlocal=1", 0)])
def test_old_grids_declare_their_key_contrasts_after_the_fact(module, arg, n):
    grid = module.get_config(arg)
    check_primary_contrasts(grid)
    assert len(grid.primary_contrasts) == n
    if n:  # the set-up checks declare nothing, and then the flag says nothing
        assert grid.primary_declared_after_results is True


def _declares_the_teacher_family(grid):
    """Declared before it ran: the teacher arm minus the paper's arm and minus the base, at 10 and at 50."""
    check_primary_contrasts(grid)
    assert grid.primary_declared_after_results is False
    assert [(e["a"], e["b"], e["per_class"]) for e in grid.primary_contrasts] == [
        ("oe_complement_r", "oe", 10), ("oe_complement_r", "base", 10),
        ("oe_complement_r", "oe", 50), ("oe_complement_r", "base", 50)]


@pytest.mark.needs_data
def test_confirmatory_grid_is_declared_before_it_runs():
    from oefsmc_jax.config_validation import validate
    from oefsmc_jax.data import class_counts, class_order_permutation

    grid = confirm_cifar10.get_config()
    _declares_the_teacher_family(grid)
    cells = expand(grid.groups)
    assert len(cells) == 20 and sorted({c.seed for c in cells}) == list(range(5, 15))
    assert {c.per_class for c in cells} == {10, 50}
    assert {c.arms for c in cells} == {("base", "oe", "oe_random_matched", "oe_confidence", "oe_complement",
                                        "oe_complement_r")}
    b = grid.base
    assert (b.subset.class_order, b.oe.early_stopping, b.oe.selection_factor, b.train.steps) == (
        "random", False, 1.0, 200)
    for cell in cells[::7]:
        c = cell_config(grid.base, cell, dict(grid.teacher_for_arch), grid.rho)
        validate(c, num_devices=4)
        assert c.subset.seed == cell.seed and c.subset.class_order == "random"
    # each seed draws its own permutation, so the three rarest classes differ between seeds
    rare = {s: frozenset(np.argsort(class_counts(10, "exp", 10, 10.0, True, class_order_permutation(10, s)))[:3])
            for s in range(5, 15)}
    assert len(set(rare.values())) >= 5


@pytest.mark.needs_data
def test_fixed_budget_grid_is_declared_before_it_runs_and_pairs_with_the_early_stopped_runs():
    """The fixed 2,000-step grid: four primary contrasts declared before it ran; every arm trains its whole budget
    and tracks what early stopping would have kept; each cell is the cell of the committed early-stopped 2,000-step
    runs (same subset, pool, held-out slice, OE-FSMC settings and budget), early stopping aside."""
    from oefsmc_jax.config_validation import validate

    grid = fixed_budget_cifar10.get_config()
    _declares_the_teacher_family(grid)
    cells = expand(grid.groups)
    assert len(cells) == 10 and sorted({c.seed for c in cells}) == list(range(5))
    assert {c.arms for c in cells} == {("base", "oe", "oe_random_matched", "oe_confidence", "oe_complement_r")}
    path = pathlib.Path(__file__).parents[1] / "docs/results/deconfound_cifar10/tiny_2000steps/results.jsonl"
    stopped = {r["cell"]: r["config"] for r in map(json.loads, path.read_text().splitlines())}
    for cell in cells:
        c = cell_config(grid.base, cell, dict(grid.teacher_for_arch), grid.rho)
        if cell.seed == 0:
            validate(c, num_devices=4)
        assert (c.oe.early_stopping, c.oe.track_best, c.oe.early_stopping_arms) == (False, True, "all")
        old = stopped[cell.id]
        assert c.subset.to_dict() == old["subset"] and c.train.steps == old["train"]["steps"] == 2000
        assert c.data.ood.path.endswith(old["data"]["ood"]["path"].removeprefix("<data>"))
        same = [k for k in old["oe"] if k not in ("early_stopping", "cache_dir")]  # fields added since: pinned
        assert {k: c.oe[k] for k in same} == {k: old["oe"][k] for k in same} and len(same) >= 14
        assert (c.train.batch_id, c.train.batch_ood) == (old["train"]["batch_id"], old["train"]["batch_ood"])
    with pytest.raises(ValueError, match="budgets='ten'"):
        fixed_budget_cifar10.get_config("budgets=ten")


def test_deconfound_labels_the_r_on_teacher_arm_against_random_images_as_two_changes():
    grid = deconfound_cifar10.get_config("arms=base+oe+oe_random_matched+oe_complement_r,budgets=10")
    labels = {(e["a"], e["b"]): e["label"] for e in grid.primary_contrasts}
    assert labels[("oe_complement_r", "oe_random_matched")].endswith("(the choice of images and R together)")
    assert labels[("oe_complement_r", "oe")] == "teacher complement, R on − the paper's arm"
