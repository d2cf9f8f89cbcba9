"""Markdown report and per-class accuracy plot for one experiment (several arms against the teacher)."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from oefsmc_jax import paths
from oefsmc_jax.evaluation.metrics import class_order, shot_groups

Fmt = str | Callable[[Any], str] | None
_MISSING = "-"
# Keys of a classification_metrics dict; any other numeric key of an arm is shown as an extra column.
_METRIC_KEYS = {"top1", "balanced", "per_class", "n", "many", "medium", "few", "groups"}
_EXTRA_FORMATS: dict[str, tuple[str, Fmt]] = {
    "agreement": ("Agree. w/ T", ".1f"),
    "steps": ("Steps", "d"),
    "wall_s": ("Wall (s)", ".1f"),
}


def _missing(x: Any) -> bool:
    """True for None and NaN (of any float type)."""
    if x is None:
        return True
    try:
        return bool(np.isnan(x))
    except (TypeError, ValueError):
        return False


def format_percent(x: float | None) -> str:
    """A percentage with one decimal (``73.4``); None/NaN give ``-``."""
    if _missing(x):
        return _MISSING
    return f"{x:.1f}"


def format_signed(x: float | None) -> str:
    """A signed percentage-point difference with one decimal (``+1.5``, ``-3.0``); None gives ``-``."""
    if _missing(x):
        return _MISSING
    return f"{x:+.1f}"


_UNITS = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def format_count(x: float | None, unit: str | None = None) -> str:
    """A compact count: ``950``, ``12.3K``, ``0.27M``, ``40.8M``, ``1.23G`` (three significant digits).

    Counts from 100K up to 1G are given in millions (so 270K parameters read ``0.27M``). ``unit`` ('K', 'M',
    'G' or 'T') forces the unit, e.g. to print a teacher and a student count alike (``0.07M``).
    """
    if _missing(x):
        return _MISSING
    v = float(x)
    if unit is not None:
        if unit not in _UNITS:
            raise ValueError(f"unit must be one of {sorted(_UNITS)}, got {unit!r}")
        return f"{v / _UNITS[unit]:.3g}{unit}"
    if abs(v) < 999.5:
        return f"{v:.0f}" if v == int(v) else f"{v:.3g}"
    units = ((0.0, "K"), (1e5, "M"), (1e9, "G"), (1e12, "T"))
    i = max(j for j, (lower, _) in enumerate(units) if abs(v) >= lower)
    while True:
        suffix = units[i][1]
        s = f"{v / _UNITS[suffix]:.3g}"
        if abs(float(s)) < 1e3 or i == len(units) - 1:
            return (s if "e" not in s else f"{v / _UNITS[suffix]:.0f}") + suffix
        i += 1


def _count_unit(x: float) -> str | None:
    """The unit :func:`format_count` picks for ``x`` (None below 1K)."""
    text = format_count(x)
    return text[-1] if text[-1] in _UNITS else None


def format_ratio(x: float | None) -> str:
    """A ratio with three significant digits and an ``x`` suffix (``0.243x``)."""
    if _missing(x) or math.isinf(x):
        return _MISSING
    return f"{x:.3g}x"


def _cell(value: Any, fmt: Fmt) -> str:
    if _missing(value):
        return _MISSING
    if callable(fmt):
        text = fmt(value)
    elif fmt:
        try:
            text = format(value, fmt)
        except (TypeError, ValueError):
            text = str(value)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str, Fmt]]) -> str:
    """A padded markdown table; ``columns`` are ``(key, header, fmt)``.

    ``fmt`` is a format spec (``'.1f'``), a callable ``value -> str`` or None (``str``). Missing keys and
    None/NaN values print ``-``. Columns with a fmt are right-aligned, the others left-aligned.
    """
    headers = [h for _, h, _ in columns]
    body = [[_cell(row.get(key), fmt) for key, _, fmt in columns] for row in rows]
    widths = [max([len(h), 3] + [len(r[i]) for r in body]) for i, h in enumerate(headers)]
    right = [fmt is not None for _, _, fmt in columns]

    def line(cells: Sequence[str]) -> str:
        padded = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)]
        return "| " + " | ".join(padded) + " |"

    sep = "| " + " | ".join(("-" * (w - 1) + ":") if r else "-" * w for w, r in zip(widths, right)) + " |"
    return "\n".join([line(headers), sep] + [line(r) for r in body])


def side_by_side(arms: Mapping[str, Mapping[str, Any]], teacher: Mapping[str, Any] | None = None) -> str:
    """Table of top-1, balanced and few-shot accuracy of each arm (and the teacher as a last row)."""
    rows = [{"name": name, **m} for name, m in arms.items()]
    if teacher is not None:
        rows.append({"name": "Teacher", **teacher})
    return format_table(
        rows,
        [("name", "Method", None), ("top1", "Top-1", format_percent),
         ("balanced", "Balanced", format_percent), ("few", "Few-shot", format_percent)],
    )  # fmt: skip


#: pyplot keeps global state: the cells of a grouped grid (threads) draw one figure at a time
PLOT_LOCK = threading.RLock()


def plot_per_class(
    path: str | os.PathLike,
    class_names: Sequence[str],
    train_counts: Sequence[int],
    arms: Mapping[str, Sequence[float | None]],
    teacher: Sequence[float | None] | None = None,
    title: str | None = None,
) -> paths.Path:
    """Grouped bar chart of per-class accuracy, saved as a 900x450 PNG at ``path``.

    One bar colour per arm; the teacher's accuracy is a dashed black segment over each class. Classes are
    ordered by training count (descending), and each tick label shows the class name and its count.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(class_names)
    if len(train_counts) != k:
        raise ValueError(f"{len(train_counts)} train counts for {k} classes")
    for name, vals in arms.items():
        if len(vals) != k:
            raise ValueError(f"arm {name!r} has {len(vals)} per-class values for {k} classes")
    if teacher is not None and len(teacher) != k:
        raise ValueError(f"teacher has {len(teacher)} per-class values for {k} classes")

    chart = _PerClassChart(class_names, train_counts, arms, teacher, title, class_order(train_counts))
    with PLOT_LOCK:
        return _draw_per_class(plt, path, chart)


@dataclasses.dataclass(frozen=True)
class _PerClassChart:
    """What :func:`plot_per_class` draws, checked; ``order``: the classes left to right."""

    class_names: Sequence[str]
    train_counts: Sequence[int]
    arms: Mapping[str, Sequence[float | None]]
    teacher: Sequence[float | None] | None
    title: str | None
    order: Sequence[int]

    def vals(self, seq: Sequence[float | None]) -> np.ndarray:
        """``seq``'s per-class values in the chart's order, None as NaN."""
        return np.array([np.nan if seq[c] is None else float(seq[c]) for c in self.order], dtype=np.float64)


def _draw_per_class(plt: Any, path: Any, chart: _PerClassChart) -> paths.Path:
    class_names, train_counts, arms, teacher = chart.class_names, chart.train_counts, chart.arms, chart.teacher
    title, order, vals = chart.title, chart.order, chart.vals
    k = len(class_names)
    x = np.arange(k, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(9.0, 4.5), dpi=100)
    try:
        n_arms = max(len(arms), 1)
        width = 0.8 / n_arms
        colors = plt.get_cmap("tab10").colors
        for i, (name, per_class) in enumerate(arms.items()):
            offset = (i - (n_arms - 1) / 2) * width
            ax.bar(x + offset, vals(per_class), width=width, label=name, color=colors[i % len(colors)])
        if teacher is not None:
            ax.hlines(vals(teacher), x - 0.45, x + 0.45, colors="black", linestyles="--", linewidth=1.5,
                      label="Teacher")  # fmt: skip
        if k <= 20:
            labels = [f"{class_names[c]}\n({int(train_counts[c])})" for c in order]
            ax.set_xticks(x)
            ax.set_xticklabels(labels, fontsize=8, rotation=0 if k <= 12 else 45)
        else:  # many classes: one-line vertical labels, at most ~50 of them
            step = math.ceil(k / 50)
            labels = [f"{class_names[c]} ({int(train_counts[c])})" for c in order[::step]]
            ax.set_xticks(x[::step])
            ax.set_xticklabels(labels, fontsize=5 if k > 30 else 7, rotation=90)
        ax.set_xlim(-0.6, k - 0.4)
        ax.set_ylim(0, 100 * 1.04)
        ax.set_ylabel("Per-class accuracy (%)")
        ax.set_xlabel("Class (training count), most to fewest training samples")
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        # Dotted separators between the many / medium / few-shot groups.
        groups = shot_groups(train_counts)
        for i in range(1, k):
            if groups[order[i]] != groups[order[i - 1]]:
                ax.axvline(i - 0.5, color="grey", linestyle=":", linewidth=1)
        if title:
            ax.set_title(title, fontsize=10, loc="left")
        if arms or teacher is not None:
            ax.legend(fontsize=8, ncol=min(n_arms + 1, 6), loc="lower right", bbox_to_anchor=(1.0, 1.0),
                      frameon=False, borderaxespad=0.2)  # fmt: skip
        fig.tight_layout()
        out = paths.as_path(path)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        paths.write_bytes_atomic(out, buf.getvalue())
    finally:
        plt.close(fig)
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)


def _summary_table(arms: Mapping[str, Mapping[str, Any]], teacher: Mapping[str, Any] | None) -> str:
    t_top1 = teacher.get("top1") if teacher else None
    rows = []
    for name, m in arms.items():
        gap = None if t_top1 is None or m.get("top1") is None else m["top1"] - t_top1
        rows.append({"name": name, **m, "gap": gap})
    if teacher is not None:
        rows.append({"name": "Teacher", **teacher, "gap": None})
    columns: list[tuple[str, str, Fmt]] = [("name", "Method", None)]
    for key, header in (("top1", "Top-1"), ("balanced", "Balanced"), ("many", "Many"), ("medium", "Medium"),
                        ("few", "Few")):  # fmt: skip
        columns.append((key, header, format_percent))
    if teacher is not None:
        columns.append(("gap", "Gap to T (top-1)", format_signed))
    extras: list[str] = []
    for m in arms.values():
        for key, v in m.items():
            if key not in _METRIC_KEYS and key not in extras and _is_number(v):
                extras.append(key)
    for key in extras:
        header, fmt = _EXTRA_FORMATS.get(key, (key, lambda v: f"{v:.4g}"))
        columns.append((key, header, fmt))
    return format_table(rows, columns)


def _per_class_table(
    class_names: Sequence[str],
    train_counts: Sequence[int],
    arms: Mapping[str, Mapping[str, Any]],
    teacher: Mapping[str, Any] | None,
) -> str:
    groups = shot_groups(train_counts)
    sources = dict(arms)
    if teacher is not None:
        sources["Teacher"] = teacher
    keys = [f"col{i}" for i in range(len(sources))]
    rows = []
    for c in class_order(train_counts):
        row: dict[str, Any] = {"name": class_names[c], "count": int(train_counts[c]), "group": groups[c]}
        for key, m in zip(keys, sources.values()):
            pc = m.get("per_class")
            row[key] = pc[c] if pc is not None else None
        rows.append(row)
    columns: list[tuple[str, str, Fmt]] = [("name", "Class", None), ("count", "Train n", "d"),
                                           ("group", "Group", None)]  # fmt: skip
    columns += [(key, name, format_percent) for key, name in zip(keys, sources)]
    return format_table(rows, columns)


def _model_table(model: Mapping[str, Any]) -> str:
    rows = []
    for label, key in (("Parameters", "params"), ("FLOPs (MACs)", "flops"), ("Latency (ms)", "latency_ms")):
        t, s = model.get(f"teacher_{key}"), model.get(f"student_{key}")
        if t is None and s is None:
            continue
        if key == "latency_ms":
            fmt: Callable[[Any], str] = lambda v: f"{v:.3g}"
        else:  # both counts in the unit of the larger one
            unit = _count_unit(max(abs(float(v)) for v in (t, s) if v is not None))
            fmt = lambda v, unit=unit: format_count(v, unit)
        ratio = s / t if t is not None and s is not None and t != 0 else None
        rows.append({"what": label, "teacher": _cell(t, fmt), "student": _cell(s, fmt)})
        rows[-1]["ratio"] = format_ratio(ratio)
    return format_table(
        rows,
        [("what", "", None), ("teacher", "Teacher", str), ("student", "Student", str),
         ("ratio", "Student / Teacher", str)],
    )  # fmt: skip


def _provenance(prov: Mapping[str, Any]) -> str:
    """The code, devices and package versions a report's figures come from, as a bullet list."""
    commit = prov.get("git_commit") or "unknown (not a git checkout)"
    dirty = {True: " (uncommitted changes)", False: ""}.get(prov.get("git_dirty"), "")
    lines = [f"- Code: commit `{commit}`{dirty}."]
    trained = {arm: c for arm, c in (prov.get("trained_commit") or {}).items() if c}
    if trained and set(trained.values()) != {prov.get("git_commit")}:
        lines.append("- Trained at: " + "; ".join(f"{arm} `{c}`" for arm, c in trained.items()) + ".")
    if prov.get("device"):
        lines.append(f"- Devices: {prov['device']}.")
    vers = prov.get("versions") or {}
    if vers:
        lines.append("- Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items() if v) + ".")
    return "\n".join(lines)


def write_report(workdir: str | os.PathLike, results: Mapping[str, Any]) -> paths.Path:
    """Write ``report.md`` and ``per_class_accuracy.png`` into ``workdir``; return the path of the report.

    ``results`` holds ``title``, ``class_names``, ``train_counts``, ``arms`` (name -> classification_metrics
    dict, plus optional numeric extras such as ``agreement``, ``steps``, ``wall_s``), ``teacher`` (metrics
    dict or None), ``model`` (``teacher_params``, ``student_params``, ``teacher_flops``, ``student_flops``,
    optional ``teacher_latency_ms``, ``student_latency_ms``), ``provenance`` (optional: ``git_commit``,
    ``git_dirty``, ``trained_commit`` per arm, ``device``, ``versions``) and ``config`` (dumped as JSON at the end).
    """
    workdir = paths.as_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    title = results.get("title", "Results")
    class_names = list(results["class_names"])
    train_counts = [int(c) for c in results["train_counts"]]
    arms: Mapping[str, Mapping[str, Any]] = results.get("arms", {})
    teacher = results.get("teacher")
    model = results.get("model") or {}
    config = results.get("config")

    png = plot_per_class(
        workdir / "per_class_accuracy.png",
        class_names,
        train_counts,
        {name: m.get("per_class") or [None] * len(class_names) for name, m in arms.items()},
        teacher.get("per_class") if teacher else None,
        title=title,
    )

    n_test = next((m["n"] for m in [*arms.values(), teacher or {}] if m.get("n") is not None), None)
    lines = [f"# {title}", ""]
    lo, hi = min(train_counts, default=0), max(train_counts, default=0)
    facts = [f"{len(class_names)} classes", f"{sum(train_counts)} training samples ({hi} to {lo} per class)"]
    if n_test is not None:
        facts.append(f"{n_test} test examples")
    lines += [", ".join(facts) + ".", ""]
    lines += ["## Accuracy (%)", "",
              "Many / medium / few: mean per-class accuracy over each third of the classes by training "
              "count. Gap to T: top-1 minus the teacher's top-1 on the same split, in points.", "",
              _summary_table(arms, teacher), ""]  # fmt: skip
    lines += ["## Per-class accuracy (%)", "", f"![per-class accuracy]({png.name})", "",
              _per_class_table(class_names, train_counts, arms, teacher), ""]  # fmt: skip
    if model:
        lines += ["## Model size", "", _model_table(model), ""]
    prov = results.get("provenance")
    if prov:
        lines += ["## Provenance", "", _provenance(prov), ""]
    if config is not None:
        lines += ["## Config", "", "```json", json.dumps(config, indent=2, default=str), "```", ""]
    path = workdir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
