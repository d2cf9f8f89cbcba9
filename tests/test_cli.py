"""The command line explains itself, and the package declares what it needs."""

import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_main_help_lists_subcommands_flags_and_examples():
    out = _run("oefsmc_jax", "--help")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for word in ("run (default)", "import-teacher", "export", "experiments", "--config.FIELD=VALUE", "--workdir",
                 "--multihost", "examples:", "configs/demo.py"):
        assert word in text, word
    assert _run("oefsmc_jax", "-h").stdout == text


def test_experiments_help_directly_and_as_a_subcommand():
    direct = _run("oefsmc_jax.experiments", "--help")
    sub = _run("oefsmc_jax", "experiments", "--help")
    assert direct.returncode == 0 and sub.returncode == 0, (direct.stderr, sub.stderr)
    assert direct.stdout == sub.stdout
    for word in ("summarize", "--only", "--cell", "results.jsonl", "examples:"):
        assert word in direct.stdout, word


def test_experiments_subcommand_runs_the_grid_cli():
    out = _run("oefsmc_jax", "experiments", "summarize")  # no --workdir: the grid CLI's own one-line error
    assert out.returncode != 0 and "workdir" in out.stderr and "Traceback" not in out.stderr


def test_pyproject_declares_requirements_and_console_command():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [ln.strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")]
    assert meta["dependencies"] == reqs
    assert meta["scripts"]["oefsmc"] == "oefsmc_jax.main:cli"
    from oefsmc_jax.main import cli

    assert callable(cli)
