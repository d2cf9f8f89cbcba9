"""Metric records of a run: ``metrics.jsonl`` (one JSON object per line) and TensorBoard event files."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

import jax

from oefsmc_jax import paths


def _summary_writer_cls() -> type:
    """tensorboardX's SummaryWriter, imported without letting it import PyTorch.

    tensorboardX imports torch whenever it is installed; loading torch beside JAX costs seconds of start-up and
    has aborted processes at exit on this project's machines, so the import is blocked for tensorboardX only.
    """
    blocked = "torch" not in sys.modules
    if blocked:
        sys.modules["torch"] = None  # type: ignore[assignment]  # makes "import torch" raise ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        if blocked:
            del sys.modules["torch"]
    return SummaryWriter


class MetricWriter:
    """Appends metric records to ``metrics.jsonl`` and TensorBoard event files in ``directory``.

    On a remote directory (``gs://...``, which cannot append) the records are kept, and ``metrics.jsonl`` is rewritten
    at most every 30 s and at ``close``; the event files are written to a local folder and copied there at ``close``.
    """

    def __init__(self, directory: str | os.PathLike, resume_step: int = 0):
        self.directory = paths.as_path(directory)
        self.enabled = jax.process_index() == 0  # one writer for a multi-host run
        if not self.enabled:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self._remote = not paths.is_local(self.directory)
        kept = self._keep_until(resume_step)
        if self._remote:
            self._lines = kept
            self._flushed = time.time()
            self._tb_local = tempfile.mkdtemp(prefix="oefsmc_tb_")
            self._tb = _summary_writer_cls()(self._tb_local)
        else:
            self._jsonl = open(os.fspath(self.directory / "metrics.jsonl"), "a")  # noqa: SIM115
            self._tb = _summary_writer_cls()(os.fspath(self.directory / "tensorboard"))

    def _keep_until(self, step: int) -> list[str]:
        """The lines of an existing ``metrics.jsonl`` up to ``step`` (the checkpoint a resumed run starts from).

        Lines past it were written by a run that was stopped before its next checkpoint; the resumed run writes those
        steps again, so they are dropped (the file rewritten whole) and every (split, step) appears once, as in an
        uninterrupted run. A torn last line goes the same way.
        """
        path = self.directory / "metrics.jsonl"
        if not path.exists():
            return []
        lines = path.read_text().splitlines(keepends=True)
        kept = []
        for line in lines:
            try:
                if line.endswith("\n") and int(json.loads(line)["step"]) <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue
        if len(kept) != len(lines):
            paths.write_text_atomic(path, "".join(kept))
        return kept

    def _flush_remote(self) -> None:
        paths.write_text_atomic(self.directory / "metrics.jsonl", "".join(self._lines))
        self._flushed = time.time()

    def write(self, step: int, split: str, values: dict[str, float]) -> None:
        """Record ``values`` at ``step`` under ``split`` (e.g. 'train', 'eval')."""
        if not self.enabled:
            return
        rec = {"step": int(step), "split": split, **{k: float(v) for k, v in values.items()}}
        if self._remote:
            self._lines.append(json.dumps(rec) + "\n")
            if time.time() - self._flushed > 30:
                self._flush_remote()
        else:
            self._jsonl.write(json.dumps(rec) + "\n")
            self._jsonl.flush()
        for k, v in values.items():
            self._tb.add_scalar(f"{split}/{k}", float(v), int(step))

    def close(self) -> None:
        """Flush and close the files."""
        if not self.enabled:
            return
        self._tb.close()
        if not self._remote:
            self._jsonl.close()
            return
        self._flush_remote()
        for f in pathlib.Path(self._tb_local).rglob("*"):
            if f.is_file():
                dst = self.directory / "tensorboard" / f.relative_to(self._tb_local).as_posix()
                dst.parent.mkdir(parents=True, exist_ok=True)
                paths.as_path(f).copy(dst, overwrite=True)
        shutil.rmtree(self._tb_local, ignore_errors=True)
