"""Evaluation metrics and report: hand-computed values on tiny arrays."""

import json
import sys

import numpy as np
import pytest

from oefsmc_jax.evaluation import (
    agreement,
    class_order,
    classification_metrics,
    confusion_matrix,
    format_count,
    format_table,
    paired_difference,
    plot_per_class,
    shot_groups,
    side_by_side,
    t_critical,
    write_report,
)

# 3 classes; class 0: 3/4 right, class 1: 1/2, class 2: 1/2 -> top-1 5/8, balanced (75+50+50)/3.
Y = np.array([0, 0, 0, 0, 1, 1, 2, 2])
PRED = np.array([0, 0, 0, 1, 1, 0, 2, 0])
# Training counts: class 1 has most (many), then class 0 (medium), then class 2 (few).
COUNTS = [5, 10, 1]


def test_classification_metrics_hand_values():
    m = classification_metrics(PRED, Y, 3, COUNTS)
    assert m["n"] == 8
    assert m["top1"] == pytest.approx(62.5)
    assert m["per_class"] == pytest.approx([75.0, 50.0, 50.0])
    assert m["balanced"] == pytest.approx(175.0 / 3)
    assert m["groups"] == ["medium", "many", "few"]
    assert m["many"] == pytest.approx(50.0)
    assert m["medium"] == pytest.approx(75.0)
    assert m["few"] == pytest.approx(50.0)
    assert set(m) == {"top1", "balanced", "per_class", "n", "many", "medium", "few", "groups"}
    assert all(isinstance(v, float) for v in (m["top1"], m["balanced"], m["many"]))


def test_classification_metrics_without_counts_and_list_input():
    m = classification_metrics(list(PRED), list(Y), 3)
    assert set(m) == {"top1", "balanced", "per_class", "n"}
    assert m["top1"] == pytest.approx(62.5)


def test_absent_classes_are_none_and_left_out_of_means():
    # 4 classes, class 2 never occurs in y (it is only predicted).
    # Groups for counts [10, 5, 3, 1] (sizes 2/1/1): many = {0, 1}, medium = {2}, few = {3}.
    y = np.array([0, 0, 1, 3, 3])
    pred = np.array([0, 2, 1, 3, 0])
    m = classification_metrics(pred, y, 4, train_counts=[10, 5, 3, 1])
    assert m["per_class"][2] is None
    assert m["per_class"][0] == pytest.approx(50.0)
    assert m["per_class"][1] == pytest.approx(100.0)
    assert m["per_class"][3] == pytest.approx(50.0)
    assert m["top1"] == pytest.approx(60.0)
    assert m["balanced"] == pytest.approx(200.0 / 3)
    assert m["many"] == pytest.approx(75.0)
    assert m["medium"] is None
    assert m["few"] == pytest.approx(50.0)
    assert not any(isinstance(v, float) and np.isnan(v) for v in m["per_class"])


def test_group_assignment_with_ties_and_remainders():
    # Ties broken by class index: order 1, 3 (count 5), 0, 2 (count 3), 4; K=5 -> sizes 2/2/1.
    assert class_order([3, 5, 3, 5, 1]) == [1, 3, 0, 2, 4]
    assert shot_groups([3, 5, 3, 5, 1]) == ["medium", "many", "medium", "many", "few"]
    # All equal: K=4 -> sizes 2/1/1 in class-index order.
    assert shot_groups([2, 2, 2, 2]) == ["many", "many", "medium", "few"]
    # K=11 -> 4/4/3, K=10 -> 4/3/3, K=9 -> 3/3/3 (counts descending with the index).
    for k, sizes in ((11, (4, 4, 3)), (10, (4, 3, 3)), (9, (3, 3, 3))):
        g = shot_groups(list(range(k, 0, -1)))
        assert (g.count("many"), g.count("medium"), g.count("few")) == sizes
        assert g == ["many"] * sizes[0] + ["medium"] * sizes[1] + ["few"] * sizes[2]
    # K=2: no 'few' class, so the few-shot mean is None.
    assert shot_groups([1, 7]) == ["medium", "many"]
    m = classification_metrics([0, 1], [0, 1], 2, [1, 7])
    assert m["many"] == 100.0 and m["medium"] == 100.0 and m["few"] is None


def test_input_validation():
    with pytest.raises(ValueError):
        classification_metrics([0, 1], [0], 2)
    with pytest.raises(ValueError):
        classification_metrics([0, 3], [0, 1], 3)
    with pytest.raises(ValueError):
        classification_metrics([], [], 3)
    with pytest.raises(ValueError):
        classification_metrics([0, 1], [0, 1], 3, train_counts=[1, 2])
    with pytest.raises(ValueError):
        agreement([0, 1], [0, 1, 2])


def test_confusion_matrix_and_agreement():
    cm = confusion_matrix(PRED, Y, 3)
    np.testing.assert_array_equal(cm, [[3, 1, 0], [1, 1, 0], [1, 0, 1]])
    assert cm.dtype == np.int64
    assert agreement([1, 2, 3, 4], [1, 2, 0, 4]) == pytest.approx(75.0)
    assert agreement(PRED, PRED) == 100.0


def test_t_critical_table_and_scipy():
    assert t_critical(4, use_scipy=False) == pytest.approx(2.776, abs=1e-3)
    assert t_critical(1, use_scipy=False) == pytest.approx(12.706, abs=1e-3)
    assert t_critical(30, use_scipy=False) == pytest.approx(2.042, abs=1e-3)
    assert t_critical(31, use_scipy=False) == 1.96
    assert t_critical(4) == pytest.approx(2.776, abs=1e-3)
    with pytest.raises(ValueError):
        t_critical(0)
    pytest.importorskip("scipy")
    for df in range(1, 31):
        assert t_critical(df, use_scipy=False) == pytest.approx(t_critical(df), abs=1e-4)


@pytest.mark.parametrize("hide_scipy", [False, True])
def test_paired_difference_hand_values(monkeypatch, hide_scipy):
    if hide_scipy:  # the built-in table must give the same interval
        monkeypatch.setitem(sys.modules, "scipy", None)
    # d = [1, 2, 3, 4, 5]: mean 3, sample std sqrt(2.5), se = sqrt(0.5), half-width 2.7764 * 0.70711 = 1.9632.
    r = paired_difference([11.0, 12.0, 13.0, 14.0, 15.0], [10.0, 10.0, 10.0, 10.0, 10.0])
    assert r["n"] == 5
    assert r["mean"] == pytest.approx(3.0)
    assert r["std"] == pytest.approx(1.5811388, abs=1e-6)
    assert r["se"] == pytest.approx(0.7071068, abs=1e-6)
    assert r["t"] == pytest.approx(2.7764, abs=1e-4)
    assert r["half_width"] == pytest.approx(1.9632, abs=1e-3)
    assert r["ci_low"] == pytest.approx(1.0368, abs=1e-3)
    assert r["ci_high"] == pytest.approx(4.9632, abs=1e-3)


def test_paired_difference_small_and_errors():
    # d = [-1, 1]: mean 0, std sqrt(2), se 1, t(1) = 12.706 -> [-12.706, 12.706].
    r = paired_difference([1.0, 3.0], [2.0, 2.0])
    assert r["mean"] == 0.0 and r["se"] == pytest.approx(1.0)
    assert r["ci_high"] == pytest.approx(12.706, abs=1e-3) and r["ci_low"] == pytest.approx(-12.706, abs=1e-3)
    one = paired_difference([2.5], [1.0])
    assert one["mean"] == 1.5 and one["n"] == 1 and one["std"] is None and one["ci_low"] is None
    with pytest.raises(ValueError):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        paired_difference([], [])


def test_format_table_exact():
    rows = [{"a": "x", "b": 1.234}, {"a": "y|y", "b": None}, {"a": "z"}]
    out = format_table(rows, [("a", "A", None), ("b", "Bee", ".2f")])
    assert out.splitlines() == [
        "| A    |  Bee |",
        "| ---- | ---: |",
        "| x    | 1.23 |",
        "| y\\|y |    - |",
        "| z    |    - |",
    ]
    assert format_table([{"v": 3}], [("v", "V", lambda v: f"<{v}>")]).splitlines()[2] == "| <3> |"


def test_format_count():
    assert format_count(950) == "950"
    assert format_count(12345) == "12.3K"
    assert format_count(270_000) == "0.27M"
    assert format_count(272_474) == "0.272M"
    assert format_count(40_800_000) == "40.8M"
    assert format_count(999_600_000) == "1G"
    assert format_count(1_234_000_000) == "1.23G"
    assert format_count(68_000, unit="M") == "0.068M"
    assert format_count(None) == "-"


def _table(text: str, first_header: str) -> list[list[str]]:
    """Cells of the markdown table whose first header cell is ``first_header`` (header and rule dropped)."""
    lines = text.splitlines()
    start = next(
        i for i, ln in enumerate(lines) if ln.startswith("|") and ln.split("|")[1].strip() == first_header
    )
    rows = []
    for ln in lines[start + 2 :]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip().strip("|").split("|")])
    return rows


def _results():
    teacher = classification_metrics([0, 0, 0, 0, 1, 1, 2, 0], Y, 3, COUNTS)  # 100 / 100 / 50 per class
    arm_a = {**classification_metrics(PRED, Y, 3, COUNTS), "agreement": 75.0, "steps": 100, "wall_s": 1.26}
    arm_b = classification_metrics(Y, Y, 3, COUNTS)
    return {
        "title": "Tiny test",
        "class_names": ["cat", "dog", "frog"],
        "train_counts": COUNTS,
        "arms": {"A": arm_a, "B": arm_b},
        "teacher": teacher,
        "model": {
            "teacher_params": 272_474,
            "student_params": 68_000,
            "teacher_flops": 40_800_000,
            "student_flops": 10_200_000,
        },
        "config": {"seed": 3, "arms": ["A", "B"]},
    }


def test_side_by_side():
    r = _results()
    rows = _table(side_by_side(r["arms"], r["teacher"]), "Method")
    assert rows == [
        ["A", "62.5", "58.3", "50.0"],
        ["B", "100.0", "100.0", "100.0"],
        ["Teacher", "87.5", "83.3", "50.0"],
    ]
    assert len(_table(side_by_side(r["arms"], None), "Method")) == 2


def test_write_report(tmp_path):
    from PIL import Image

    path = write_report(tmp_path / "run", _results())
    assert path == tmp_path / "run" / "report.md"
    text = path.read_text()
    assert text.startswith("# Tiny test")
    # Method | Top-1 | Balanced | Many | Medium | Few | Gap to T | Agreement | Steps | Wall (s)
    assert _table(text, "Method") == [
        ["A", "62.5", "58.3", "50.0", "75.0", "50.0", "-25.0", "75.0", "100", "1.3"],
        ["B", "100.0", "100.0", "100.0", "100.0", "100.0", "+12.5", "-", "-", "-"],
        ["Teacher", "87.5", "83.3", "100.0", "100.0", "50.0", "-", "-", "-", "-"],
    ]
    # Per-class rows in training-count order: dog (10, many), cat (5, medium), frog (1, few).
    assert _table(text, "Class") == [
        ["dog", "10", "many", "50.0", "100.0", "100.0"],
        ["cat", "5", "medium", "75.0", "100.0", "100.0"],
        ["frog", "1", "few", "50.0", "100.0", "50.0"],
    ]
    # Model size: 68000 / 272474 = 0.2496 -> 0.25x; 10.2M / 40.8M = 0.25x; no latency given -> no row.
    assert _table(text, "") == [
        ["Parameters", "0.272M", "0.068M", "0.25x"],
        ["FLOPs (MACs)", "40.8M", "10.2M", "0.25x"],
    ]
    assert "Latency" not in text
    config = text.split("```json\n", 1)[1].split("```", 1)[0]
    assert json.loads(config) == {"seed": 3, "arms": ["A", "B"]}
    assert "](per_class_accuracy.png)" in text

    png = tmp_path / "run" / "per_class_accuracy.png"
    assert png.stat().st_size > 1000
    with Image.open(png) as im:
        assert im.format == "PNG"
        assert im.size == (900, 450)


def test_plot_per_class_handles_missing_and_checks_lengths(tmp_path):
    from PIL import Image

    out = plot_per_class(tmp_path / "p.png", ["a", "b", "c"], [1, 3, 2], {"x": [50.0, None, 10.0]}, None)
    with Image.open(out) as im:
        assert im.size == (900, 450)
    with pytest.raises(ValueError):
        plot_per_class(tmp_path / "q.png", ["a", "b"], [1, 3, 2], {"x": [1.0, 2.0, 3.0]})
    with pytest.raises(ValueError):
        plot_per_class(tmp_path / "q.png", ["a", "b", "c"], [1, 3, 2], {"x": [1.0, 2.0]})


def test_report_names_its_code_devices_and_versions(tmp_path):
    prov = {"git_commit": "abc123", "git_dirty": True, "trained_commit": {"A": "abc123", "B": "0ld"},
            "device": "4 x cpu (Test CPU)", "versions": {"jax": "0.10.2", "torch": None}}
    text = write_report(tmp_path / "run", {**_results(), "provenance": prov}).read_text()
    section = text.split("## Provenance\n\n", 1)[1].split("\n\n", 1)[0]
    assert section.splitlines() == ["- Code: commit `abc123` (uncommitted changes).",
                                    "- Trained at: A `abc123`; B `0ld`.",
                                    "- Devices: 4 x cpu (Test CPU).",
                                    "- Versions: jax 0.10.2."]
    prov = {**prov, "git_dirty": False, "trained_commit": {"A": "abc123", "B": "abc123"}}
    section = write_report(tmp_path / "r2", {**_results(), "provenance": prov}).read_text()
    assert "- Code: commit `abc123`.\n- Devices:" in section  # one commit trained every arm: no second line
    assert "## Provenance" not in write_report(tmp_path / "r3", _results()).read_text()
