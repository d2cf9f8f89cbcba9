"""Guards of a run's workdir: a finished arm is reused, a workdir made by another config or on another subset is
refused, and each arm records the commit of the code that started training it.

Together with :mod:`oefsmc_jax.workdir_lock` (one process per workdir) they make a rerun of the same command resume
where the last one stopped, and refuse, with one line, a rerun that would mix two experiments in one folder.
"""

from __future__ import annotations

import json
from typing import Any

from oefsmc_jax import paths
from oefsmc_jax.errors import ConfigError
from oefsmc_jax.progress import json_default, log, write_json


def finished_result(path: paths.Path) -> dict | None:
    """The result in an arm's ``result.json``, or None when the arm is not finished: no file, or one that is empty,
    torn or not a JSON object with ``metrics`` (then a one-line note names it; the rerun overwrites it atomically)."""
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError):
        result = None
    if isinstance(result, dict) and "metrics" in result:
        return result
    log(f"note: {path} is empty, torn or not a result; the arm counts as not finished and runs again")
    return None


def trained_commit(path: paths.Path) -> dict:
    """The commit (and dirty flag) of the code that started training an arm, written to ``path`` on the first
    start; a resumed arm keeps the first start's, so a record can tell the training code from the recording code."""
    from oefsmc_jax.provenance import code_version

    if path.exists():
        try:
            return dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError, ValueError):
            pass  # a torn file: the commit is unknown, and the current one would be a guess
        return {"git_commit": None, "git_dirty": None}
    # an arm folder without the file was started by code that did not write it: its commit is unknown
    code = code_version() if not path.parent.exists() else {"git_commit": None, "git_dirty": None}
    write_json(path, code)
    return code


#: Config fields that do not change a run's results (how often to log or checkpoint, where caches live, how many
#: devices share the work: results are the same on 1 or N devices); a workdir may be resumed with other values.
RESUMABLE_FIELDS = ("train.log_every", "train.ckpt_every", "train.max_nonfinite", "eval.batch_size",
                    "oe.cache_dir", "num_devices", "title", "compile_cache", "method.cache_compression")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def check_same_config(path: paths.Path, new: dict) -> None:
    """Refuse a workdir whose ``config.json`` holds another config (fields present in both, except
    :data:`RESUMABLE_FIELDS`): its finished arms would otherwise be reported under the new config."""
    if not path.exists():
        return
    try:
        old = _flat(json.loads(path.read_text()))
    except (OSError, ValueError):
        return  # unreadable: the subset check still guards the data
    cur = _flat(json.loads(json.dumps(new, default=json_default)))
    diff = [k for k in sorted(set(old) & set(cur)) if old[k] != cur[k]
            and not any(k == f or k.startswith(f + ".") for f in RESUMABLE_FIELDS)]
    if diff:
        shown = ", ".join(f"{k} ({old[k]!r} -> {cur[k]!r})" for k in diff[:4]) + (" ..." if len(diff) > 4 else "")
        raise ConfigError(f"workdir {path.parent} holds a run of another config: {shown}; use a new --workdir, "
                          "delete this one, or rerun with the config it was made with")


def check_same_subset(path: paths.Path, subset: dict, ood: bool) -> None:
    """Refuse a workdir whose ``subset.json`` (``path``) holds another few-sample set, or with OOD images (``ood``)
    another OOD subset: its finished pieces were trained on other images."""
    if not path.exists():
        return
    old = paths.read_json(path)  # a damaged file is named in one line
    if any(old.get(k) != subset[k] for k in ("counts", "id_indices", "id_source")) or (
            ood and old.get("ood_indices") and old["ood_indices"] != subset["ood_indices"]):
        raise ConfigError(f"workdir {path.parent} holds a run on a different few-sample or OOD subset (the data, "
                          "subset or seed settings changed); use a new --workdir, or delete this one")
