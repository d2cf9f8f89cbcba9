"""The results prose against the committed records: every figure checked here is recomputed from the files under
docs/results and must appear, so written, in docs/results/README.md."""

import collections
import json
import pathlib

import numpy as np
import pytest
from helpers import config

from oefsmc_jax.evaluation import paired_difference

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
PROSE = (RESULTS / "README.md").read_text()
TOP = (REPO / "README.md").read_text()


def _records(rel: str) -> list[dict]:
    """The records of ``rel``: a grid folder's ``results.jsonl``, or a ``.jsonl`` file."""
    path = RESULTS / rel if rel.endswith(".jsonl") else RESULTS / rel / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _signed(x: float) -> str:
    return f"{x:+.1f}".replace("-", "−")


def _ci(d: dict) -> str:
    """``+m.m [lo, hi]`` of a :func:`paired_difference`, as the prose writes it."""
    return f"{_signed(d['mean'])} [{_signed(d['ci_low'])}, {_signed(d['ci_high'])}]"


def _contrast(records: list[dict], a: str, b: str, per_class: int, method: str = "kd", metric: str = "top1",
              group: str | None = None) -> str:
    """``+m.m [lo, hi]`` of the paired difference ``a - b`` over the seeds that have both, as the prose writes it."""
    by = collections.defaultdict(dict)
    for r in records:
        if r["per_class"] == per_class and r["method"] == method and group in (None, r["group"]):
            by[r["arm"]][r["seed"]] = r["metrics"][metric]
    seeds = sorted(set(by[a]) & set(by[b]))
    d = paired_difference([by[a][s] for s in seeds], [by[b][s] for s in seeds])
    return _ci(d)


def _steps(records: list[dict], arm: str, per_class: int) -> list[tuple[int, int, bool]]:
    rs = sorted((r for r in records if r["arm"] == arm and r["per_class"] == per_class), key=lambda r: r["seed"])
    return [(r["steps"], r["best_step"], r["stopped_early"]) for r in rs]


def test_2000_step_checkpoints_kept_and_runs_stopped_at_10_per_class():
    recs = _records("deconfound_cifar10/tiny_2000steps")
    rows = {"base": "base (KD)", "oe": "the paper's arm", "oe_random_matched": "random images, same count, R off",
            "oe_complement_r": "teacher complement, R on"}
    stopped_runs = 0
    for arm, name in rows.items():
        runs = _steps(recs, arm, 10)
        assert len(runs) == 5
        kept = [best for _, best, _ in runs if best < 2000]
        stopped = [s for s, (_, _, early) in enumerate(runs) if early]
        ran = [str(s) for s, (steps, _, _) in enumerate(runs) if steps == 2000]
        assert len(kept) == 5  # every run kept an earlier checkpoint
        # the 10-per-class table comes first of the two that list the steps kept
        line = next(x for x in PROSE.splitlines() if x.startswith(f"| {name} | ") and "5 of 5: " in x)
        assert "5 of 5: " + ", ".join(f"{b:,}" for b in kept) + " |" in line, line
        if not ran:
            assert line.endswith(f"| {len(stopped)} of 5 |"), line
        else:
            ran_text = f"seed {ran[0]}" if len(ran) == 1 else f"seeds {', '.join(ran[:-1])} and {ran[-1]}"
            assert line.endswith(f"| {len(stopped)} of 5 ({ran_text} ran to 2,000) |"), line
        if arm != "base":
            stopped_runs += len(stopped)
    base = _steps(recs, "base", 10)
    assert (min(s for s, _, _ in base), max(s for s, _, _ in base)) == (700, 1700)
    assert (min(b for _, b, _ in base), max(b for _, b, _ in base)) == (200, 1200)
    assert all(early for _, _, early in base) and stopped_runs == 10
    assert "(after 700 to 1,700 steps, keeping the checkpoint of step 200 to 1,200;" in PROSE
    assert "and 10 of the 15 OOD runs, and every run" in PROSE
    assert "stopped every base run\nbetween steps 200 and 1,200" not in PROSE


def test_2000_and_200_step_contrasts_recomputed():
    long = _records("deconfound_cifar10/tiny_2000steps")
    short = [r for r in _records("deconfound_cifar10/tiny") if r["group"] == "factorial"]
    random_vs_paper = _contrast(long, "oe_random_matched", "oe", 10)
    assert random_vs_paper == "+3.6 [−0.3, +7.6]"
    assert "| random images, R off − the paper's arm | +3.6 | [−0.3, +7.6] |" in PROSE
    assert f"at both budgets ({random_vs_paper} here" in PROSE
    assert _contrast(short, "oe_random_matched", "oe", 50) == "−1.7 [−7.1, +3.8]"
    assert "| −1.7 [−7.1, +3.8] |" in PROSE
    together = _contrast(long, "oe_complement_r", "oe_random_matched", 50)
    assert together == "+2.3 [+0.8, +3.9]"
    assert f"in every seed ({together}:\nthe choice of images and R together" in PROSE
    assert f"({together}; the\nchoice of images and R together)" in PROSE
    assert ("still beats random\nimages at the same count with R off by +2.3 [+0.8, +3.9] (the choice of images "
            "and R") in PROSE
    assert "the only contrast that holds is the choice of the\nimages over random ones" not in PROSE


def test_50_per_class_factorial_at_200_steps_is_committed_and_read():
    recs = _records("deconfound_cifar10/tiny")
    n50 = [r for r in recs if r["group"] == "factorial" and r["per_class"] == 50]
    assert len(n50) == 35 and len({r["arm"] for r in n50}) == 7
    assert "part 2, 35 records in `tiny/`" in PROSE
    assert _contrast(n50, "oe_complement", "oe_random_matched", 50) == "+6.6 [+2.0, +11.2]"
    by = collections.defaultdict(dict)
    for r in n50:
        by[r["arm"]][r["seed"]] = r["metrics"]["top1"]
    d = paired_difference([by["oe_complement_r"][s] for s in range(5)], [by["oe"][s] for s in range(5)])
    # the prose writes the lower end with two decimals, since one would read +0.0
    assert (f"{d['mean']:+.1f}", f"{d['ci_low']:+.2f}", f"{d['ci_high']:+.1f}") == ("+4.5", "+0.05", "+9.0")
    assert "leads the paper's by +4.5 [+0.05, +9.0], an interval that only just excludes zero" in PROSE.replace(
        "\n", " ")
    assert "50-per-class factorial at 200 steps was not run" not in PROSE
    assert "everything here is KD at 10 per" not in PROSE


def test_few_shot_spread_at_50_per_class():
    recs = [r for r in _records("deconfound_cifar10/tiny") if r["group"] == "factorial" and r["per_class"] == 50]
    few = {arm: [r["metrics"]["few"] for r in recs if r["arm"] == arm] for arm in {r["arm"] for r in recs}}
    spread = {arm: f"{np.mean(v):.1f} ± {np.std(v, ddof=1):.1f}" for arm, v in few.items()}
    assert spread["base"] == "40.9 ± 10.1" and spread["oe"] == "41.9 ± 11.3"
    assert spread["oe_random_matched"] == "37.1 ± 12.3"
    more = {arm for arm, v in few.items() if np.std(v, ddof=1) > np.std(few["base"], ddof=1)}
    assert more == {"oe", "oe_random_matched"}
    assert ("(40.9 ± 10.1), and\ntwo arms vary more: the paper's arm (41.9 ± 11.3) and random images with R off "
            "(37.1 ± 12.3)") in PROSE


def test_early_stopping_on_minus_off_for_the_base_arm():
    on = {r["seed"]: r["metrics"]["top1"] for r in _records("deconfound_cifar10/tiny")
          if r["group"] == "factorial" and r["per_class"] == 10 and r["arm"] == "base"}
    off = {r["seed"]: r["metrics"]["top1"] for r in _records("deconfound_cifar10/tiny_no_early_stopping")
           if r["arm"] == "base"}
    seeds = sorted(off)
    d = paired_difference([on[s] for s in seeds], [off[s] for s in seeds])
    text = _ci(d)
    assert text == "+0.3 [−2.5, +3.2]"
    assert f"| base (KD) | 48.8 | 48.5 | {text} | 2 of 5 |" in PROSE


def test_selection_logit_adjustment_at_50_per_class():
    recs = [r for r in _records("selection_cifar10") if r["group"] == "selection"]
    text = _contrast(recs, "logit_adjust", "base", 50)
    assert text == "−0.4 [−6.3, +5.4]"
    assert f"| {text} |" in PROSE and f"and {text} at 10 and 50 per class" in PROSE


def test_teacher_picks_from_cifar_like_classes():
    d = json.loads((RESULTS / "ood_classes" / "ood_classes.json").read_text())
    group = np.asarray(d["overlap_group"])
    shares = {}
    for n in ("10", "50"):
        picks = np.asarray(d["budgets"][n]["teacher_complement"]).sum(0)
        shares[n] = tuple(round(100 * picks[sel].sum() / picks.sum()) for sel in (group > 0, group == 2, group == 1))
    assert shares == {"10": (39, 29, 10), "50": (26, 21, 5)}
    assert ("at 10 per class 39 % of them from Tiny-ImageNet classes that are CIFAR-10 classes in meaning\n"
            "  or close to one (29 % and 10 %), at 50 per class 26 % (21 % and 5 %)") in PROSE
    # the teacher's argmax share on strict-overlap images is quoted only where its file is read
    # (test_ood_classes_at_c1_on_three_pools)
    assert PROSE.count("59 %") == 1


def test_methods_provenance_names_the_commits_the_records_carry():
    commits = collections.defaultdict(set)
    for r in _records("methods_cifar10"):
        if r["per_class"] == 10 and r["seed"] == 0 and r["method"] in ("mir", "practise", "fskd"):
            commits[(r["method"], r["mode"])].add(r["git_commit"][:7])
    assert commits[("mir", "exp")] == commits[("mir", "balanced")] == {"5fee63f"}
    assert commits[("practise", "exp")] == commits[("fskd", "exp")] == {"a9bae6e"}
    assert ("(MiR long-tailed and balanced, whose records were\n  written at commit `5fee63f`; PRACTISE and FSKD "
            "long-tailed, written at `a9bae6e`)") in PROSE


def test_paper_grid_range_and_gpu_cell_times():
    means = collections.defaultdict(list)
    for r in _records("paper_cifar10"):
        if not r["group"].startswith("sweep"):
            means[(r["method"], r["arch"], r["per_class"], r["mode"], r["arm"])].append(r["metrics"]["top1"])
    lo, hi = min(np.mean(v) for v in means.values()), max(np.mean(v) for v in means.values())
    assert f"{lo:.1f}" == "41.0" and np.mean(means[("bp", "resnet20", 10, "exp", "resample")]) == pytest.approx(lo)
    assert f"mean top-1 {lo:.0f}-{hi:.0f} %" in PROSE and (lo, hi) == pytest.approx((40.96, 60.18), abs=0.01)
    cells = collections.defaultdict(float)
    for r in _records("large_cifar10_gpu"):
        cells[r["cell"]] += r["wall_s"]
    assert f"took {min(cells.values()):.0f}-{max(cells.values()):.0f} s on the H200" in PROSE
    assert (round(min(cells.values())), round(max(cells.values()))) == (94, 108)


def test_claims_without_committed_data_are_gone_and_the_heading_is_narrow():
    for text in (TOP, PROSE):
        assert "Over five seeds (`configs/demo.py" not in text and "+1.0 [−1.2, +3.1]" not in text
        assert "What to use with few, imbalanced samples" not in text
    assert ("What helped in the one setting tested (KD, 10 per class, one ResNet-20 teacher, one class order)"
            in PROSE.replace("\n", " "))
    assert "a pseudo-label, not the\npaper's complementary-label R" in PROSE
    assert "a pseudo-label, not the paper's complementary-label R" in PROSE.replace("\n", " ")


@pytest.mark.parametrize("folder, arg", [
    ("paper_cifar10", ("paper_cifar10", "seeds=5")), ("selection_cifar10", ("selection_cifar10", None)),
    ("methods_cifar10", ("methods_cifar10", None)), ("deconfound_cifar10/tiny", ("deconfound_cifar10", "pool=tiny")),
    ("deconfound_cifar10/tiny_2000steps",
     ("deconfound_cifar10", "pool=tiny,steps=2000,arms=base+oe+oe_random_matched+oe_complement_r")),
    ("deconfound_cifar10/dtd", ("deconfound_cifar10", "pool=dtd,arms=base+oe+oe_random_matched+oe_complement,"
                                                      "budgets=10")),
    # the class-disjoint pool's config reads the shared overlap list as it loads
    pytest.param("deconfound_cifar10/tiny_disjoint", ("deconfound_cifar10", "pool=tiny_disjoint,arms=base+oe+"
                                                                            "oe_random_matched+oe_complement,budgets=10"),
                 marks=pytest.mark.needs_data)])
def test_committed_summaries_open_with_their_primary_contrasts_declared_after_the_results(folder, arg):

    from oefsmc_jax.experiments.primary import primary_contrasts, primary_table

    grid = config(arg[0]).get_config(arg[1])
    assert grid.primary_declared_after_results is True and grid.primary_contrasts
    table = primary_table(_records(folder), grid.primary_contrasts, True)
    rows = primary_contrasts(_records(folder), grid.primary_contrasts)
    assert {r["status"] for r in rows} == {"ok"}
    text = (RESULTS / folder / "summary.md").read_text()
    assert table in text and "**declared after the results were seen**" in text
    assert text.index("## Primary contrasts") < text.index("## Paired differences to the base method")


def test_confirmatory_figures():
    """The confirmatory grid's reading against its records: the four primary contrasts with their Holm-adjusted
    p, and the exploratory confidence/targeting split at both budgets."""
    from oefsmc_jax.experiments.primary import primary_contrasts

    recs = _records("confirm_cifar10")
    assert len(recs) == 120 and {r["seed"] for r in recs} == set(range(5, 15))
    assert len({(r["cell"], r["arm"]) for r in recs}) == 120
    assert {r["config"]["subset"]["class_order"] for r in recs} == {"random"}
    assert {r["trained_commit"][:7] for r in recs} == {"0ede5db", "711c4ba"}
    # no held-out scoring: `best_step` is the last step, and nothing of what early stopping would keep is recorded
    assert {(r["steps"], r["best_step"], r["stopped_early"]) for r in recs} == {(200, 200, False)}
    assert not any("tracked_best" in r for r in recs)
    flat = " ".join(PROSE.split())
    assert "its `best_step` is that same step, since these runs did not score the held-out slice" in flat
    top = " ".join(TOP.split())
    for n, paper, kd in ((10, "+7.5 [+5.9, +9.0]", "+11.3 [+9.6, +13.0]"), (50, "+6.6 [+3.4, +9.8]",
                                                                         "+6.9 [+3.3, +10.5]")):
        assert (_contrast(recs, "oe_complement_r", "oe", n), _contrast(recs, "oe_complement_r", "base", n)) == (
            paper, kd)
        for text in (flat, top):
            assert paper in text and kd in text
    rows = primary_contrasts(recs, config("confirm_cifar10").get_config().primary_contrasts)
    assert [r["status"] for r in rows] == ["ok"] * 4
    assert all(r["p_holm"] < 0.0001 for r in rows[:2]) and [round(r["p_holm"], 4) for r in rows[2:]] == [0.0021] * 2
    assert [f"{r['d']['mean']:+.2f}" for r in rows] == ["+7.46", "+11.29", "+6.60", "+6.92"]
    for n, a, b, metric, want in (
            (10, "oe_complement", "oe_random_matched", "top1", "+6.5 [+4.2, +8.9]"),
            (10, "oe_confidence", "oe_random_matched", "top1", "+6.0 [+3.9, +8.0]"),
            (10, "oe_complement", "oe_confidence", "top1", "+0.6 [−1.0, +2.2]"),
            (10, "oe_complement", "oe_confidence", "few", "+2.7 [−0.1, +5.4]"),
            (10, "oe_complement_r", "oe_complement", "top1", "+1.0 [+0.1, +1.9]"),
            (10, "oe", "base", "top1", "+3.8 [+1.9, +5.8]"),
            (50, "oe_complement", "oe_random_matched", "top1", "+4.6 [+1.7, +7.5]"),
            (50, "oe_confidence", "oe_random_matched", "top1", "+4.7 [+2.6, +6.8]"),
            (50, "oe_complement", "oe_confidence", "top1", "−0.1 [−2.7, +2.5]"),
            (50, "oe_complement", "oe_confidence", "few", "−1.0 [−4.9, +2.8]"),
            (50, "oe_complement_r", "oe_complement", "top1", "+1.5 [+0.3, +2.6]"),
            (50, "oe", "base", "top1", "+0.3 [−3.8, +4.4]")):
        assert _contrast(recs, a, b, n, metric=metric) == want, (n, a, b, metric)
        assert want in flat, want


def test_reproduction_table_recomputed_from_the_records():
    text = (RESULTS / "reproduce" / "README.md").read_text()
    committed = {(r["group"], r["cell"], r["arm"]): r["metrics"]["top1"]
                 for rel in ("paper_cifar10/results.jsonl", "selection_cifar10/results.jsonl",
                             "methods_cifar10/results.jsonl", "cpu_wgrad_check/xla.jsonl") for r in _records(rel)}
    reruns = {}
    for name in ("main_3036df9", "before_68f0b11", "at_c196e28"):
        for r in _records(f"reproduce/{name}.jsonl"):
            assert r["git_commit"].startswith(name.split("_")[-1]) and r["git_dirty"] is False
            reruns.setdefault((r["group"], r["cell"], r["arm"]), {})[name] = r["metrics"]["top1"]
    assert set(reruns) <= set(committed)
    table, cell = {}, None
    for ln in text.splitlines():
        if not ln.startswith("| ") or "---" in ln or ln.startswith("| cell"):
            continue
        cols = [c.strip() for c in ln.strip().strip("|").split("|")]
        cell = cols[0].split("`")[1] if cols[0] else cell  # an empty first column continues the cell above
        table[(cell, cols[1])] = cols[2:]
    assert len(table) == len(reruns)
    for (group, cell, arm), got in reruns.items():
        cols = table[(cell, arm)]
        assert cols[0] == f"{committed[(group, cell, arm)]:.2f}", (cell, arm)
        assert cols[1:] == [f"{got[n]:.2f}" if n in got else "" for n in ("main_3036df9", "before_68f0b11",
                                                                          "at_c196e28")], (cell, arm)
    # the statements: equal before and after the split; the record-making commit differs from its own record here
    assert reruns[("sweep_base", "kd-resnet20-n10-exp-splitval-s1", "base")]["main_3036df9"] == reruns[
        ("sweep_base", "kd-resnet20-n10-exp-splitval-s1", "base")]["before_68f0b11"]
    wg = reruns[("factorial", "kd-resnet20-n10-exp-s0", "base")]
    assert len(set(wg.values())) == 1 and wg["at_c196e28"] != committed[("factorial", "kd-resnet20-n10-exp-s0", "base")]
    assert reruns[("methods", "fskd-resnet20-n10-balanced-s3", "base")]["main_3036df9"] == committed[
        ("methods", "fskd-resnet20-n10-balanced-s3", "base")]


def test_ood_classes_at_c1_on_three_pools():
    import numpy as np

    text = (RESULTS / "README.md").read_text()
    rows = {}
    for pool, label in (("c1_tiny", "Tiny-ImageNet"), ("c1_tiny_disjoint", "Tiny-ImageNet, class-disjoint"),
                        ("c1_dtd", "DTD-10 textures")):
        r = json.loads((RESULTS / "ood_classes" / pool / "ood_classes.json").read_text())
        assert r["factor"] == 1.0 and r["pool_kind"] == pool[3:]
        group, names = np.asarray(r["overlap_group"]), r["pool_class_names"]
        for rule in ("teacher_complement", "teacher_confidence"):
            cols = []
            for n in ("10", "50"):
                m = np.asarray(r["budgets"][n][rule])
                cols += [f"{m.sum():,.0f}", f"{100 * m[:, group > 0].sum() / m.sum():.0f} %"]
            m10 = np.asarray(r["budgets"]["10"][rule]).sum(0)
            top = np.argsort(-m10, kind="stable")[:3]
            assert m10[top[1]] > m10[top[2]]  # the two named are not tied with a third
            cols.append(", ".join(f"{names[j]} ({m10[j]:.0f})" for j in top[:2]))
            rows[(label, rule)] = cols
        if pool == "c1_tiny":
            assert f"{100 * r['strict_overlap_argmax_share']:.0f} % of the\nstrict-overlap images" in text
    table, label = {}, None
    for ln in text.split("### At c = 1")[1].split("Reading:")[0].splitlines():
        if ln.startswith("| ") and "---" not in ln and not ln.startswith("| pool"):
            cols = [c.strip() for c in ln.strip().strip("|").split("|")]
            label = cols[0] or label
            table[(label, cols[1].strip("`"))] = cols[2:]
    assert table == rows


def test_readme_demo_table_is_the_committed_demo_report():
    """The README's demo figures are those of docs/results/demo/report.md, which names the commit it came from."""
    report = (RESULTS / "demo" / "report.md").read_text()

    def rows(text: str, first: str) -> dict[str, list[str]]:
        block = [x for x in text[text.index(f"| {first}"):].split("\n\n", 1)[0].splitlines() if x.startswith("|")]
        head = [c.strip() for c in block[0].strip("|").split("|")]
        out = {}
        for line in block[2:]:
            cells = [c.strip() for c in line.strip("|").split("|")]
            out[cells[0]] = dict(zip(head, cells))
        return out

    got = rows(TOP[TOP.index("## What the demo does"):], "Method")
    want = rows(report, "Method")
    assert set(got) == set(want) == {"KD", "KD + OE-FSMC", "Teacher"}
    for arm in got:
        assert [got[arm]["Top-1"], got[arm]["Balanced"], got[arm]["Few-shot"]] == [
            want[arm]["Top-1"], want[arm]["Balanced"], want[arm]["Few"]], arm
    assert "- Code: commit `" in report and "(uncommitted changes)" not in report


def test_methods_sweep_figures():
    """Every gain the sweep's reading quotes, recomputed with its declared rule from its records."""
    from oefsmc_jax.experiments.tuning import TuningRule, choose

    rule = TuningRule.from_config(config("methods_sweep_cifar10").get_config().tuning_rule)
    choices = {(c.method, c.field): c for c in choose(_records("methods_sweep_cifar10"), rule)}
    section = " ".join(PROSE[PROSE.index("## `methods_sweep_cifar10/`"):PROSE.index("## `methods_cifar10/`")].split())

    def gain(method: str, field: str, value) -> str:
        g = choices[(method, field)].gains[value]
        return f"{_signed(g['mean'])} [{_signed(g['ci_low'])}, {_signed(g['ci_high'])}]"

    moved = [(k, c.chosen) for k, c in choices.items() if c.chosen != c.reference]
    assert len(moved) == 10
    for (method, field), value in moved:
        assert gain(method, field, value) in section, (method, field)
    for method, field, value in (("mir", "oe.eta", 0.1), ("practise", "oe.eta", 0.1), ("bp", "oe.lambda_jd", 3.0),
                                 ("kd", "oe.lambda_jd", 3.0), ("cd", "method.cd.finetune", "kd")):
        assert gain(method, field, value) in section, (method, field)
    by_seed = collections.defaultdict(dict)
    for r in _records("methods_sweep_cifar10"):
        if r["method"] == "kd" and r["arm"] == "oe" and r["overrides"] in ({}, {"oe.eta": 0.0}):
            by_seed[bool(r["overrides"])][r["seed"]] = r["metrics"]["top1"]
    per_seed = [_signed(by_seed[True][s] - by_seed[False][s]) for s in sorted(by_seed[False])]
    assert f"(per seed {per_seed[0]}, {per_seed[1]} and {per_seed[2]})" in section


# (method, per class, metric, arm, against, group of the arm): the exploratory figures the reading quotes; "base"
# against means the long-tailed base arm of the same method and budget
FAIR_QUOTED = [
    *[(m, 10, "few", a, "base", "fair") for m, a in (("bp", "oe"), ("mir", "oe"), ("cd", "oe"), ("kd", "oe"),
                                                      ("practise", "oe"), ("bp", "oe_complement_r"),
                                                      ("kd", "oe_complement"), ("mir", "oe_complement"),
                                                      ("cd", "oe_complement_r"))],
    ("mir", 50, "few", "oe", "base", "fair"), ("mir", 50, "few", "oe_complement", "base", "fair"),
    ("cd", 50, "few", "oe", "base", "fair"), ("cd", 50, "few", "oe_complement_r", "base", "fair"),
    ("practise", 50, "few", "oe", "base", "fair"), ("practise", 50, "few", "oe_complement", "base", "fair"),
    ("cd", 10, "top1", "base", "base", "fair_cd_kd"), ("cd", 50, "top1", "base", "base", "fair_cd_kd"),
    *[(m, n, "top1", "base", "base", "fair_balanced") for m, n in (("bp", 10), ("bp", 50), ("cd", 10), ("cd", 50),
                                                                  ("kd", 10),
                                                                  ("kd", 50), ("mir", 10), ("mir", 50),
                                                                  ("practise", 10), ("practise", 50),
                                                                  ("fskd", 10), ("fskd", 50))],
]


def _fair_setting(records: list[dict], group: str, method: str, per_class: int) -> dict[str, dict[int, dict]]:
    out = collections.defaultdict(dict)
    for r in records:
        if (r["group"], r["method"], r["per_class"]) == (group, method, per_class):
            out[r["arm"]][r["seed"]] = r["metrics"]
    return out


def _fair_pair(a: dict[int, dict], b: dict[int, dict], metric: str = "top1") -> str:
    seeds = sorted(set(a) & set(b))
    assert len(seeds) == 5
    d = paired_difference([a[s][metric] for s in seeds], [b[s][metric] for s in seeds])
    return _ci(d)


def test_fair_methods_grid_figures():
    """The corrected methods grid's reading against its records: every primary contrast that ran, with its
    Holm-adjusted p over the declared 30, in the section's table; the exploratory figures its prose quotes; the
    protocol the records must share (one commit, clean tree, no early stopping, 200 steps for the project's loop)."""
    from oefsmc_jax.experiments.primary import primary_contrasts

    recs = _records("methods_fair_cifar10")
    grid = config("methods_fair_cifar10").get_config()
    assert len({(r["cell"], r["arm"]) for r in recs}) == len(recs)
    assert {r["trained_commit"][:7] for r in recs} == {"70372bb"} and not any(r["git_dirty"] for r in recs)
    assert {r["seed"] for r in recs} == set(range(5)) and not any(r["stopped_early"] for r in recs)
    assert {r["steps"] for r in recs if r["method"] in ("bp", "kd", "mir", "practise")} == {200}
    section = " ".join(PROSE[PROSE.index("## `methods_fair_cifar10/`"):PROSE.index("## `methods_sweep_cifar10/`")]
                       .split())
    rows = primary_contrasts(recs, grid.primary_contrasts)
    assert len(rows) == 30 and not any(r["status"].startswith("ambiguous") for r in rows)
    ran = [r for r in rows if r["status"] == "ok"]
    for r in ran:
        p = "< 0.0001" if r["p_holm"] < 0.0001 else f"{r['p_holm']:.4f}"
        want = f"{_ci(r['d'])}, p {p}"
        assert want in section, (r["label"], want)
    top = " ".join(TOP.split())
    quoted = {(r["entry"]["method"], r["entry"]["per_class"], r["entry"]["a"], r["entry"]["b"]): r["d"] for r in ran}
    for method, a, b in (("bp", "oe", "base"), ("cd", "oe", "base"), ("mir", "oe_complement", "base"),
                         ("practise", "oe_complement", "base"), ("kd", "oe_complement", "oe")):
        assert _ci(quoted[(method, 10, a, b)]) in top, (method, a, b)
    done = {(r["entry"]["method"], r["entry"]["per_class"]) for r in ran}
    for method, n in sorted({(e["method"], e["per_class"]) for e in grid.primary_contrasts} - done):
        name = {"mir": "MiR"}.get(method, method.upper())
        assert f"| {name}, {n} | not run | not run | not run |" in section, (method, n)
    for method, n, metric, a, b, group_a in FAIR_QUOTED:
        s = _fair_setting(recs, group_a, method, n)
        base = _fair_setting(recs, "fair", method, n)["base"]
        assert _fair_pair(s[a], base if b == "base" else s[b], metric) in section, (method, n, metric, a, group_a)
    # FSKD's OOD arms are its base method, per class and on every seed, as its settings give OOD images no role
    means = []
    for n in (10, 50):
        fskd = _fair_setting(recs, "fair", "fskd", n)
        assert sorted(fskd) == ["base", "oe", "oe_complement_r"] and len(fskd["base"]) == 5, n
        for arm in ("oe", "oe_complement_r"):
            assert all(fskd[arm][seed] == fskd["base"][seed] for seed in range(5)), (n, arm)
        means.append(np.mean([m["top1"] for m in fskd["base"].values()]))
    assert f"({means[0]:.1f} mean top-1 for all three arms at 10 per class, {means[1]:.1f} at 50;" in section
    cells = {r["cell"] for r in recs}
    assert len(cells) == 130 and "All 130 cells ran" in section
    assert f"({len(cells)} cells, {len(recs)} records)" in section
    assert "all 130 of its cells ran" in " ".join(config("methods_fair_cifar10").__doc__.split())
    # CD's paper's arm, gain at 10 per class minus gain at 50, seed by seed (exploratory)
    cd10, cd50 = _fair_setting(recs, "fair", "cd", 10), _fair_setting(recs, "fair", "cd", 50)
    gains = [[c["oe"][seed]["top1"] - c["base"][seed]["top1"] for seed in range(5)] for c in (cd10, cd50)]
    assert f"{_ci(paired_difference(*gains))} (the gain at 10 minus the gain at 50" in section


def _tracked(records: list[dict], arm: str, per_class: int) -> dict[int, dict]:
    return {r["seed"]: r for r in records if r["arm"] == arm and r["per_class"] == per_class}


def test_fixed_budget_figures():
    """The fixed 2,000-step grid's reading against its records: the protocol they share (one commit, 2,000 steps,
    early stopping off, what it would have kept recorded), every primary contrast that ran with its Holm p over the
    declared four (the rest marked not run), and the exploratory figures the prose quotes, each recomputed."""
    from oefsmc_jax.experiments.primary import primary_contrasts

    recs = _records("fixed_budget_cifar10")
    grid = config("fixed_budget_cifar10").get_config()
    assert len({(r["cell"], r["arm"]) for r in recs}) == len(recs)
    assert {r["trained_commit"][:7] for r in recs} == {"b9993b3"} and not any(r["git_dirty"] for r in recs)
    assert {(r["steps"], r["best_step"], r["stopped_early"]) for r in recs} == {(2000, 2000, False)}
    assert all(r["tracked_best"]["step"] <= 2000 for r in recs)
    section = " ".join(PROSE[PROSE.index("## `fixed_budget_cifar10/`"):PROSE.index("## `cpu_wgrad_check/`")].split())
    rows = primary_contrasts(recs, grid.primary_contrasts)
    assert len(rows) == 4
    for r in rows:
        if r["status"] == "ok":
            p = "< 0.0001" if r["p_holm"] < 0.0001 else f"{r['p_holm']:.4f}"
            assert f"{_ci(r['d'])}, p {p}" in section, r["label"]
        else:
            assert f"| {r['entry']['per_class']} | not run |" in section, r["label"]
    budgets = sorted({r["per_class"] for r in recs})
    stopped = _records("deconfound_cifar10/tiny_2000steps")  # the same cells, early-stopped
    cells = {r["cell"] for r in recs}
    assert f"{len(cells)} of its 10 cells ran ({len(recs)} records)" in section
    # exploratory: confidence against targeting, the pseudo-label term, the paper's arm over KD
    for n in budgets:
        for a, b, metric in (("oe_confidence", "oe_random_matched", "top1"),
                             ("oe_complement_r", "oe_confidence", "top1"),
                             ("oe_complement_r", "oe_confidence", "few"), ("oe", "base", "top1"),
                             ("oe_random_matched", "oe", "top1")):
            want = _contrast(recs, a, b, n, metric=metric)
            assert want in section, (n, a, b, metric, want)
        # what early stopping would have kept (tracked, exploratory): kept minus final, and the kept steps
        for arm in ("base", "oe", "oe_complement_r"):
            t = _tracked(recs, arm, n)
            seeds = sorted(t)
            d = paired_difference([t[s]["tracked_best"]["metrics"]["top1"] for s in seeds],
                                  [t[s]["metrics"]["top1"] for s in seeds])
            assert _ci(d) in section, (n, arm)
        # the same cells early-stopped: final weights after 2,000 steps minus what the early-stopped run reported
        if n == 50:  # the early-stopped runs' own contrasts, which the reading sets beside the fixed budget's
            for b in ("oe", "base"):
                assert _contrast(stopped, "oe_complement_r", b, n) in section, b
        for arm in ("base", "oe_complement_r"):
            fixed, es = _tracked(recs, arm, n), _tracked(stopped, arm, n)
            seeds = sorted(set(fixed) & set(es))
            assert len(seeds) == 5
            d = paired_difference([fixed[s]["metrics"]["top1"] for s in seeds],
                                  [es[s]["metrics"]["top1"] for s in seeds])
            assert _ci(d) in section, (n, arm)


def test_fixed_budget_tracking_reproduces_the_early_stopped_runs():
    """What the fixed-budget runs record as early stopping's pick is, on every seed and at both budgets, the step and
    the test accuracy of the early-stopped 2,000-step run of the same cell; the means and stop counts the reading
    quotes."""
    recs = _records("fixed_budget_cifar10")
    stopped = _records("deconfound_cifar10/tiny_2000steps")
    section = " ".join(PROSE[PROSE.index("## `fixed_budget_cifar10/`"):PROSE.index("## `cpu_wgrad_check/`")].split())
    for n in (10, 50):
        for arm in ("base", "oe", "oe_random_matched", "oe_complement_r"):
            fixed, es = _tracked(recs, arm, n), _tracked(stopped, arm, n)
            assert sorted(fixed) == sorted(es) == list(range(5)), (n, arm)
            for s in range(5):
                assert fixed[s]["tracked_best"]["step"] == es[s]["best_step"], (n, arm, s)
                assert fixed[s]["tracked_best"]["metrics"]["top1"] == es[s]["metrics"]["top1"], (n, arm, s)
        means = {a: np.mean([r["metrics"]["top1"] for r in _tracked(recs, a, n).values()])
                 for a in ("base", "oe", "oe_complement_r")}
        assert (f"KD {means['base']:.1f}, the paper's arm {means['oe']:.1f}, the teacher arm "
                f"{means['oe_complement_r']:.1f}") in section, n
    arms = ("base", "oe_complement_r", "oe", "oe_random_matched", "oe_confidence")
    stops = {n: [sum(r["tracked_best"]["stop_step"] is not None for r in _tracked(recs, a, n).values()) for a in arms]
             for n in (10, 50)}
    assert stops == {10: [5, 5, 4, 3, 3], 50: [5, 5, 4, 4, 4]}
    assert "stopped every KD and teacher-arm run and 4, 3 and 3 of 5 of the others" in section
    assert "stopped every KD and teacher-arm run and 4 of 5 of each of the others" in section
    top = " ".join(TOP.split())
    short = " ".join(PROSE[:PROSE.index("## Reproducing a committed row")].split())
    for n in (10, 50):
        for b in ("oe", "base"):
            assert _contrast(recs, "oe_complement_r", b, n) in top, (n, b)
    for b in ("oe", "base"):
        assert _contrast(recs, "oe_complement_r", b, 50) in short, b
