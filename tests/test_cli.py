"""The command line explains itself, every subcommand parses with one argparse tree, every documented command line
still parses, and the package declares what it needs."""

import os
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest
import tomllib
from helpers import config_import, run_cli

from oefsmc_jax.main import SUBCOMMANDS, cli, parse

ROOT = Path(__file__).resolve().parents[1]


def _parse(argv, capsys):
    """``parse(argv)``: (subcommand, args) or (exit code, stdout, stderr) when it exits."""
    try:
        return parse(argv)
    except SystemExit as e:
        out = capsys.readouterr()
        return e.code, out.out, out.err


def test_main_help_lists_every_subcommand_with_one_line_and_examples():
    out = run_cli(["--help"])  # in a fresh interpreter: no JAX import, no re-exec
    assert out.returncode == 0 and out.stderr == "", out.stderr
    text = out.stdout
    for name in SUBCOMMANDS:
        assert re.search(rf"^  {re.escape(name)} +\S", text, re.M), name
    for word in ("(the default)", "--config.FIELD=VALUE", "--workdir", "--multihost", "examples:",
                 "configs/demo.py", "SUBCOMMAND --help"):
        assert word in text, word
    assert run_cli(["-h"]).stdout == text


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_every_subcommand_has_its_own_help(name, capsys):
    code, out, err = _parse([name, "--help"], capsys)
    assert code == 0 and err == ""
    assert out.startswith(f"usage: oefsmc {name} ") and "examples:" in out
    assert _parse(["help", name], capsys) == (code, out, err)
    flags = {"run": ["--config", "--config.FIELD=VALUE", "--workdir", "--multihost", "--coordinator_address",
                     "--num_processes", "--process_id"],
             "experiments": ["summarize", "--config", "--workdir", "--only", "--cell", "--out", "--also"],
             "summarize": ["--config", "--workdir", "--out", "--also"],
             "export": ["--workdir", "--arm", "--out", "--overwrite"],
             "import-teacher": ["SRC", "OUT_DIR", "--depth", "--check-npz", "--overwrite", "--batch-size"],
             "pools": ["--results", "--group", "--out", "--stem", "--label", "--title"],
             "ood-classes": ["--out", "--data", "--arch", "--per-class", "--rho", "--factor"]}[name]
    for flag in flags:
        assert flag in out, flag


@pytest.mark.slow
def test_module_aliases_print_the_same_help():
    for alias, name in (("oefsmc_jax.experiments", "experiments"), ("oefsmc_jax.experiments.pools", "pools"),
                        ("oefsmc_jax.experiments.ood_classes", "ood-classes")):
        direct, sub = run_cli(["--help"], module=alias), run_cli([name, "--help"])
        assert direct.returncode == 0 and sub.returncode == 0, (direct.stderr, sub.stderr)
        assert direct.stdout == sub.stdout and direct.stdout.startswith(f"usage: oefsmc {name} "), alias


@pytest.mark.parametrize("argv,message", [
    (["foo"], "error: unknown subcommand 'foo'; choose from run, experiments, summarize, export, import-teacher, "
              "pools, ood-classes (see oefsmc --help)"),
    ([], "error: no subcommand or flags given (see oefsmc --help)"),
    (["--bogus"], "error: unknown flag --bogus (see oefsmc run --help)"),
    (["--config", "configs/demo.py", "--workdir", "w", "--bogus=1", "-x"],
     "error: unknown flags --bogus=1, -x (see oefsmc run --help)"),
    (["export", "--workdir", "w", "--arm", "oe", "--out", "o", "--ovewrite"],
     "error: unknown flag --ovewrite (see oefsmc export --help)"),
    (["export", "--workdir", "w"], "error: the following arguments are required: --arm, --out (see oefsmc export "
                                   "--help)"),
    (["run", "--config", "configs/demo.py"], "error: the following arguments are required: --workdir (see oefsmc "
                                             "run --help)"),
    (["experiments", "--workdir", "w"], "error: --config is required to run a grid (`summarize` needs only "
                                        "--workdir) (see oefsmc experiments --help)"),
    (["experiments", "summarise", "--workdir", "w"], "error: argument summarize: invalid choice: 'summarise' "
                                                     "(choose from 'summarize') (see oefsmc experiments --help)"),
    (["import-teacher", "a.npz"], "error: the following arguments are required: OUT_DIR (see oefsmc "
                                  "import-teacher --help)"),
    (["pools", "--results", "a.jsonl", "--out", "o"], "error: argument --results: 'a.jsonl': expected NAME=PATH "
                                                      "(see oefsmc pools --help)"),
    (["--workdir", "w", "--config", "configs/demo.py", "--config.train.stepz=3"],
     "error: unknown config field in an override: 'stepz' Did you mean \"steps\" instead of \"stepz\"?"),
    (["--workdir", "w", "--config", "configs/demo.py", "--config.eval.latency", "yes"],
     "error: unexpected argument 'yes' after a --config override; write a boolean field as --config.FIELD=true or "
     "false"),
])
def test_usage_errors_are_one_line_exit_2(argv, message, capsys):
    code, out, err = _parse(argv, capsys)
    assert (code, out, err) == (2, "", message + "\n")


def test_config_overrides_keep_ml_collections_semantics(capsys):
    """``--config FILE:ARG`` and ``--config.FIELD=VALUE`` / ``--config.FIELD VALUE`` / ``--noconfig.FLAG`` as absl
    reads them, before or after the other flags; a run's config is locked, a grid's is not."""
    name, a = parse(["--config.train.steps", "7", "--workdir", "w", "--config=configs/demo.py:per_class=3",
                     "--noconfig.eval.latency", "--config.arch.widths=(4,8,8)"])
    assert name == "run" and a.workdir == "w" and not a.multihost
    assert (a.config.train.steps, a.config.eval.latency, tuple(a.config.arch.widths)) == (7, False, (4, 8, 8))
    assert a.config.subset.per_class == 3
    with pytest.raises(AttributeError):
        a.config.new_field = 1  # locked, as config_flags' lock_config=True
    name, a = parse(["experiments", "--config", "configs/paper_cifar10.py", "summarize", "--workdir", "w",
                     "--also", "x.jsonl", "--also", "y.jsonl", "--config.base.train.log_every=250"])
    assert (name, a.command, a.also, a.config.base.train.log_every) == ("experiments", "summarize",
                                                                       ["x.jsonl", "y.jsonl"], 250)
    name, a = parse(["--config", "configs/demo.py", "--workdir", "w", "--multihost", "--num_processes", "2",
                     "--process_id=1", "--coordinator_address", "h:1"])
    assert (a.multihost, a.num_processes, a.process_id, a.coordinator_address) == (True, 2, 1, "h:1")


GRID = f"""
import ml_collections
{config_import("demo")}


def get_config():
    return ml_collections.ConfigDict({{
        "title": "t", "rho": 4.0, "base": demo.get_config(), "teacher_for_arch": {{}},
        "groups": [{{"name": "g", "method": ["kd"], "arch": ["resnet8"], "per_class": [3], "mode": ["exp"],
                     "seed": [0, 1], "arms": "base,oe"}}]}})
"""


@pytest.fixture
def no_exec(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"os.execv{args}: the grid must run in this process")

    monkeypatch.setattr(os, "execv", refuse)
    monkeypatch.setenv("OEFSMC_TCMALLOC", "0")


def test_experiments_runs_in_this_process(tmp_path, capsys, monkeypatch, no_exec):
    (tmp_path / "grid.py").write_text(GRID)
    argv = ["--config", str(tmp_path / "grid.py"), "--workdir", str(tmp_path / "w"), "--only", "NOPE"]
    line = "error: --only 'NOPE': no such group in this grid config; groups: g\n"
    for call in (lambda: cli(["experiments", *argv]),
                 lambda: (monkeypatch.setattr(sys, "argv", ["oefsmc", "experiments", *argv]), cli()),
                 lambda: (monkeypatch.setattr(sys, "argv", ["oefsmc_jax.experiments", *argv]),
                          runpy.run_module("oefsmc_jax.experiments", run_name="__main__"))):
        with pytest.raises(SystemExit) as e:
            call()
        assert e.value.code == 2 and capsys.readouterr().err == line
    assert not (tmp_path / "w").exists()


def test_grid_stopped_by_a_signal_says_so_once(tmp_path, capsys, monkeypatch, no_exec):
    """Cells trained together that all stop at a signal: one line that the grid stopped and resumes, not one
    'failed' line per cell."""
    from oefsmc_jax.training import preemption, scheduler

    def stopped(self, fns, names):
        return [preemption.Preempted(f"[{n}] preempted: checkpoint written") for n in names]

    monkeypatch.setattr(scheduler.GroupScheduler, "run", stopped)
    (tmp_path / "grid.py").write_text(GRID)
    with pytest.raises(SystemExit) as e:
        cli(["experiments", "--config", str(tmp_path / "grid.py"), "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert e.value.code == preemption.EXIT_PREEMPTED
    assert "failed" not in err and err.count("grid: stopped by a signal") == 1
    assert err.splitlines()[-1] == f"[kd-resnet8-n3-exp-s0] preempted: checkpoint written (exit code " \
                                   f"{preemption.EXIT_PREEMPTED})"


# ----------------------------------------------------------------------------------------------------------
# every command line the documentation shows still parses (parse only: nothing runs)

PROGRAMS = {"oefsmc": [], "python -m oefsmc_jax": [], "python -m oefsmc_jax.experiments": ["experiments"],
            "python -m oefsmc_jax.experiments.pools": ["pools"],
            "python -m oefsmc_jax.experiments.ood_classes": ["ood-classes"],
            "python -m oefsmc_jax.convert.akamaster": ["import-teacher"]}
DOCS = ["README.md", "docs/results/README.md",
        *(str(p.relative_to(ROOT)) for p in sorted((ROOT / "docs" / "results").glob("*/README.md")))]


def documented_command_lines(text: str) -> list[tuple[str, list[str]]]:
    """(command line, oefsmc argv) of every ``oefsmc ...`` / ``python -m oefsmc_jax...`` command in ``text``: the
    lines of its code blocks (continuations joined, ``$VAR`` expanded from the block's ``VAR=...`` lines, comments
    dropped) and its inline code spans; a span that only names a program or ends in ``...`` is no command line."""
    found = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M):
        env: dict[str, str] = {}
        for line in block.replace("\\\n", " ").splitlines():
            if m := re.fullmatch(r'(\w+)="?([^"]*)"?', line.strip()):
                env[m[1]] = m[2]
                continue
            for part in line.split("&&"):
                part = re.sub(r"\$(\w+)", lambda m, env=env: env.get(m[1], m[0]), part.strip())
                found.append((part, shlex.split(part, comments=True)))
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    found += [(span, span.split()) for span in (" ".join(s.split()) for s in re.findall(r"`([^`]+)`", prose))]
    commands = []
    for line, words in found:
        for n in (5, 4, 3, 1):
            prog = " ".join(words[:n])
            if prog in PROGRAMS and (n > 1 or prog == "oefsmc"):
                argv = PROGRAMS[prog] + words[n:]
                if "..." not in argv and not all(w in SUBCOMMANDS for w in argv):
                    commands.append((line, argv))
                break
    return commands


def _documented() -> list[tuple[str, list[str]]]:
    from oefsmc_jax.main import USAGE

    out = [(f"{doc}: {line}", argv) for doc in DOCS
           for line, argv in documented_command_lines((ROOT / doc).read_text())]
    examples = [e for s in SUBCOMMANDS.values() for e in s.examples]
    examples += [ln.strip() for ln in USAGE.splitlines() if ln.startswith("  oefsmc ")]
    return out + [(f"--help: {e}", shlex.split(e)[1:]) for e in examples]


def test_the_documents_show_command_lines_of_every_subcommand():
    shown = {argv[0] if argv[0] in SUBCOMMANDS else "run" for _, argv in _documented()}
    assert shown == set(SUBCOMMANDS) and len(_documented()) > 30


# the class-disjoint pool's config reads the shared overlap list as it loads
@pytest.mark.parametrize("where,argv", [pytest.param(w, a, marks=pytest.mark.needs_data) if "pool=tiny_disjoint" in w
                                        else (w, a) for w, a in _documented()],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_documented_command_line_still_parses(where, argv, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    got = _parse(argv, capsys)
    if "--help" in argv:
        assert got[0] == 0 and got[1].startswith("usage: oefsmc"), got
        return
    assert isinstance(got[0], str), got  # (subcommand, args), no exit
    name, args = got
    if "--config" in " ".join(argv):
        assert args.config is not None and args.config.keys()  # the config file, its argument and overrides load


def test_pyproject_declares_requirements_and_console_command():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [ln.strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")]
    assert meta["dependencies"] == reqs
    assert meta["scripts"]["oefsmc"] == "oefsmc_jax.main:cli"
    assert callable(cli)
