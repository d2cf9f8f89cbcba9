"""The cells of a grid and the settings they share: a grid config's ``groups`` expanded into :class:`Cell`s (one
point of a group's product of axes, with its arms and overrides), and :func:`setting_key`, the setting of a
record (a cell without its seed), by which the summary and the primary contrasts pair the records of one setting.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Iterable, Mapping
from typing import Any

AXES = ("method", "arch", "per_class", "mode", "seed")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One point of the grid."""

    id: str
    group: str
    method: str
    arch: str
    per_class: int
    mode: str
    seed: int
    arms: tuple[str, ...]
    overrides: tuple[tuple[str, Any], ...]

    def settings(self) -> dict:
        """The cell's grid coordinates and overrides, for records and tables."""
        return {"group": self.group, "method": self.method, "arch": self.arch, "per_class": self.per_class,
                "mode": self.mode, "seed": self.seed, "overrides": dict(self.overrides)}


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def expand(groups: Iterable[Mapping[str, Any]]) -> list[Cell]:
    """All cells of all groups, in order (groups in order, then the product of their axes)."""
    cells, seen = [], set()
    for g in groups:
        missing = [a for a in AXES if a not in g]
        if missing:
            raise ValueError(f"grid group {g.get('name', '?')!r} lacks the axes {missing}; each group needs {AXES}")
        overrides = tuple(sorted(dict(g.get("overrides", {})).items()))
        arms = tuple(a.strip() for a in str(g.get("arms", "base,oe")).split(",") if a.strip())
        for method, arch, per_class, mode, seed in itertools.product(*(list(g[a]) for a in AXES)):
            tag = "".join(f"-{k.split('.')[-1]}{_fmt(v)}" for k, v in overrides)
            cid = f"{method}-{arch}-n{per_class}-{mode}{tag}-s{seed}"
            if cid in seen:
                continue
            seen.add(cid)
            cells.append(Cell(cid, str(g.get("name", "grid")), method, arch, int(per_class), mode, int(seed), arms,
                              overrides))
    return cells


def setting_key(record: Mapping[str, Any]) -> tuple:
    """The setting of a results record: group, method, arch, per_class, mode and its overrides (as sorted JSON);
    the records of one setting differ only in their seed and arm."""
    ov = json.dumps(record.get("overrides", {}), sort_keys=True)
    return (record["group"], record["method"], record["arch"], record["per_class"], record["mode"], ov)
