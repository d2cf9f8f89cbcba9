"""A resumable grid of compression runs in one process (reusing compiled steps across cells).

A grid config (e.g. ``configs/paper_cifar10.py``) holds ``base`` (a full run config) and ``groups``: each group is a
mapping of grid axes to lists (``method``, ``arch``, ``per_class``, ``mode``, ``seed``) plus ``arms`` and optional
``overrides`` (dotted config fields to fixed values). A *cell* is one point of a group's product; it is one
run on one few-sample subset with all its arms (so the arms are paired), in ``WORKDIR/cells/CELL``.
Every finished cell appends one record per arm to ``WORKDIR/results.jsonl``; a cell whose arms are all recorded is
never run again, and a killed cell resumes from its own checkpoints (its finished arms are reused, not rerun).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import sys
import time
from collections.abc import Mapping
from typing import Any

import ml_collections

from oefsmc_jax import __version__, paths, workdir_lock
from oefsmc_jax.experiments.grid import Cell, expand
from oefsmc_jax.experiments.primary import check_primary_contrasts
from oefsmc_jax.provenance import code_version, device_description, portable, versions
from oefsmc_jax.training import preemption

#: cells run together when the grid config has no ``group_size``: their runs of equal shapes share one program
DEFAULT_GROUP_SIZE = 8


def cell_config(base: ml_collections.ConfigDict, cell: Cell, teacher_for_arch: Mapping[str, str],
                rho: float) -> ml_collections.ConfigDict:
    """The run config of ``cell``: ``base`` with the cell's coordinates and overrides applied."""
    c = ml_collections.ConfigDict(base.to_dict())
    c.method.name = cell.method
    c.arch.name = cell.arch
    if cell.arch in teacher_for_arch:
        c.teacher.checkpoint = teacher_for_arch[cell.arch]
    c.subset.per_class = cell.per_class
    c.subset.mode = cell.mode
    c.subset.rho = rho if cell.mode == "exp" else 1.0
    c.seed = cell.seed
    c.subset.seed = cell.seed
    c.arms = ",".join(cell.arms)
    c.title = f"{cell.id}"
    for key, value in cell.overrides:
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise ValueError(f"grid override {key!r}: no such config field")
        node[leaf] = value
    return c


def _data_root() -> pathlib.Path:
    """The shared data folder the configs read (``$OEFSMC_DATA`` or ``../shared/data``)."""
    default = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data"
    return pathlib.Path(os.environ.get("OEFSMC_DATA", default))


def batch_cells(todo: list[tuple[Cell, Any]], group_size: int) -> list[list[tuple[Cell, Any]]]:
    """Split the cells to run into batches run together: cells that differ only in their seed (same group, method,
    architecture, budget, profile, arms and overrides), at most ``group_size`` per batch, in order of first
    appearance. With ``group_size`` 1 every cell is its own batch, in the grid's order."""
    if group_size <= 1:
        return [[t] for t in todo]
    by_key: dict[tuple, list[tuple[Cell, Any]]] = {}
    for cell, c in todo:
        key = (cell.group, cell.method, cell.arch, cell.per_class, cell.mode, cell.arms, cell.overrides)
        by_key.setdefault(key, []).append((cell, c))
    return [cells[i:i + group_size] for cells in by_key.values() for i in range(0, len(cells), group_size)]


def read_results(path: str | os.PathLike) -> list[dict]:
    """The records of a results file (missing file: none). A line that is torn (the process was killed while
    appending it) or not a JSON record with ``cell`` and ``arm`` is skipped with one line on stderr naming the file
    and line number; the grid then runs that cell's missing arm again."""
    path = paths.as_path(path)
    if not path.exists():
        return []
    out = []
    for n, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            r = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            r = None
        if not isinstance(r, dict) or "cell" not in r or "arm" not in r:
            print(f"{os.fspath(path)} line {n} is torn or not JSON; skipped (its cell will be rerun)",
                  file=sys.stderr, flush=True)
            continue
        out.append(r)
    return out


def _append(path: paths.Path, records: list[dict]) -> None:
    """Append ``records`` as whole lines through :func:`oefsmc_jax.paths.append_text` (fsynced locally; a torn last
    line first gets its newline, so the torn bytes stay on their own line and nothing that was there is removed)."""
    text = "".join(json.dumps(r, default=str) + "\n" for r in records)
    if text:
        paths.append_text(path, text)


@workdir_lock.scope
def run_grid(config: ml_collections.ConfigDict, workdir: str | os.PathLike, only: str | None = None,
             cell_id: str | None = None) -> list[dict]:
    """Run every unfinished cell of ``config`` (optionally only the group ``only``, or only the cells ``cell_id``
    names, comma-separated; cells that differ only in their seed still train together); returns all records."""
    from oefsmc_jax.config_validation import validate
    from oefsmc_jax.errors import ConfigError
    from oefsmc_jax.run import run
    from oefsmc_jax.training.parallel import make_mesh
    from oefsmc_jax.training.step import GROUP_IMPLS

    group_size = int(config.get("group_size", DEFAULT_GROUP_SIZE))
    if group_size < 1:
        raise ConfigError(f"config.group_size: {group_size} is not allowed; 1 (one run at a time) or more (runs "
                          "of equal shapes trained together)")
    group_impl = str(config.get("group_impl", "auto"))
    if group_impl not in GROUP_IMPLS:
        raise ConfigError(f"config.group_impl: {group_impl!r} is not allowed; choose one of {', '.join(GROUP_IMPLS)}")
    paths.check_reachable(workdir, "--workdir")
    workdir = paths.as_path(workdir)
    results = workdir / "results.jsonl"
    groups = [g for g in config.groups if only is None or g["name"] == only]
    if not groups and only is None:
        raise ConfigError("config.groups is empty; a grid config needs at least one group")
    if not groups:
        names = [str(g.get("name", "grid")) for g in config.groups]
        raise ConfigError(f"--only {only!r}: no such group in this grid config; groups: {', '.join(names) or 'none'}")
    cells = expand(groups)
    if cell_id is not None:
        ids = [c.id for c in cells]
        wanted = [w.strip() for w in cell_id.split(",") if w.strip()]
        unknown = [w for w in wanted if w not in ids]
        if unknown or not wanted:
            where = f" of group {only!r}" if only is not None else ""
            shown = ", ".join(ids[:6]) + (f", ... ({len(ids)} in all)" if len(ids) > 6 else "")
            bad = ", ".join(repr(w) for w in unknown) if unknown else repr(cell_id)
            raise ConfigError(f"--cell {bad}: no such cell{where} in this grid config; cells: {shown}")
        cells = [c for c in cells if c.id in wanted]
    teachers = dict(config.teacher_for_arch)
    configs = [cell_config(config.base, cell, teachers, config.rho) for cell in cells]
    for c in configs:  # one cache of teacher pool probabilities for the whole grid
        if not c.oe.cache_dir:
            c.oe.cache_dir = str(workdir / "cache")
    mesh = make_mesh(config.base.num_devices or None)
    n_dev = mesh.shape["data"]
    device = device_description(mesh)
    for cell, c in zip(cells, configs):  # validate the whole grid before running any of it
        try:
            validate(c, num_devices=n_dev)
        except ValueError as e:
            raise type(e)(f"grid cell {cell.id}: {e}") from None
    check_primary_contrasts(config)  # the declared family must name settings this grid runs
    workdir_lock.take(workdir)  # only once the grid, its selection and every cell are valid; one grid process
    code = code_version()
    roots = {"data": _data_root(), "workdir": workdir}
    done = {(r["cell"], r["arm"]) for r in read_results(results)}
    todo = [(cell, c) for cell, c in zip(cells, configs) if not all((cell.id, a) in done for a in cell.arms)]
    print(f"grid: {len(cells)} cells, {len(cells) - len(todo)} finished earlier, {len(todo)} to run; "
          f"results in {results}", file=sys.stderr, flush=True)
    batches = batch_cells(todo, group_size)
    if group_size > 1:
        print(f"grid: {len(batches)} batch(es) of up to {group_size} cells; runs of equal shapes are trained "
              "together", file=sys.stderr, flush=True)
    t0 = time.time()
    finished = 0

    def record(cell: Cell, c: ml_collections.ConfigDict, out: dict) -> list[dict]:
        records = []
        for arm, r in out["arms"].items():
            if (cell.id, arm) in done:
                continue
            records.append({"cell": cell.id, "arm": arm, **cell.settings(), "metrics": r["metrics"],
                            "teacher": out["teacher"], "steps": r["steps"], "best_step": r["best_step"],
                            "stopped_early": r.get("stopped_early"), "ood_selection": r.get("ood_selection"),
                            **({"tracked_best": r["tracked_best"]} if r.get("tracked_best") else {}),
                            "ood_images": r.get("ood_images"), "eta": r.get("eta"),
                            "method_hparams": r.get("method"),
                            "params": r["params"], "flops": r["flops"], "wall_s": r["wall_s"],
                            "version": __version__, **code, "trained_commit": r.get("trained_commit"),
                            "versions": versions(), "device": device,
                            "group_size": group_size, "config": portable(c.to_dict(), roots)})
        return records

    for batch in batches:
        t_batch = time.time()
        if len(batch) == 1 and group_size == 1:
            (cell, c), = batch
            outs: list[Any] = [run(c, workdir / "cells" / cell.id)]
        else:
            from oefsmc_jax.training.scheduler import GroupScheduler

            sched = GroupScheduler(group_size, impl=group_impl)
            outs = sched.run([functools.partial(run, c, workdir / "cells" / cell.id) for cell, c in batch],
                             names=[cell.id for cell, _ in batch])
        failed = None
        for (cell, c), out in zip(batch, outs):
            if isinstance(out, BaseException):
                if not isinstance(out, preemption.Preempted):  # a stop signal: one line below, not one per cell
                    print(f"grid: cell {cell.id} failed: {type(out).__name__}: {out}", file=sys.stderr, flush=True)
                failed = failed or out
                continue
            _append(results, record(cell, c, out))  # finished cells are recorded before any failure is raised
            finished += 1
        if failed is not None:
            if isinstance(failed, preemption.Preempted):
                print("grid: stopped by a signal; rerun the same command to resume (finished cells are kept)",
                      file=sys.stderr, flush=True)
            raise failed
        elapsed = time.time() - t0
        eta = elapsed / finished * (len(todo) - finished)
        ids = ", ".join(cell.id for cell, _ in batch)
        print(f"grid: {finished}/{len(todo)} cells done ({ids} in {time.time() - t_batch:.0f} s); "
              f"elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min", file=sys.stderr, flush=True)
    return read_results(results)
