"""The fast allocator: the command-line entry points re-execute once with tcmalloc preloaded when it is installed
(oefsmc_jax/allocator.py), and launch/tcmalloc.sh picks the same library."""

import os
import subprocess
import sys

import pytest
from helpers import run_cli

from oefsmc_jax import allocator

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
LIB = allocator.find_tcmalloc("1")
needs_lib = pytest.mark.skipif(not sys.platform.startswith("linux") or LIB is None,
                               reason="tcmalloc is not installed (apt-get install libtcmalloc-minimal4)")
PROBE = """import os, sys
from oefsmc_jax.allocator import loaded, maybe_reexec
maybe_reexec()
print(loaded(), os.environ.get("OEFSMC_TCMALLOC_REEXEC", ""), os.environ.get("LD_PRELOAD", ""), sys.argv[1:])
"""


def _env(**kw):
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.MARK, allocator.ENV)}
    env["PYTHONPATH"] = str(REPO)
    env.update({k: v for k, v in kw.items() if v is not None})
    return env


def _probe(tmp_path, **env):
    """A script named like the console command (an entry point), printing what its final process saw."""
    script = tmp_path / "oefsmc"
    script.write_text(PROBE)
    return subprocess.run([sys.executable, str(script), "a b", "--x=1"], capture_output=True, text=True,
                          timeout=60, env=_env(**env))


@needs_lib
def test_reexecs_once_with_tcmalloc_loaded(tmp_path):
    out = _probe(tmp_path, OEFSMC_TCMALLOC="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"True 1 {LIB} ['a b', '--x=1']"
    assert out.stderr.count("oefsmc: preloading") == 1 and "OEFSMC_TCMALLOC=0 turns it off" in out.stderr
    # by default (no variable) too, and behind another preloaded library
    assert _probe(tmp_path).stdout.startswith("True 1 ")
    other = _probe(tmp_path, LD_PRELOAD="libm.so.6")
    assert other.stdout.strip() == f"True 1 {LIB}:libm.so.6 ['a b', '--x=1']", other.stderr


@needs_lib
def test_no_reexec_when_turned_off_or_already_preloaded(tmp_path):
    off = _probe(tmp_path, OEFSMC_TCMALLOC="0")
    assert off.stdout.strip() == "False   ['a b', '--x=1']" and off.stderr == ""
    pre = _probe(tmp_path, LD_PRELOAD=LIB)  # what launch/tcmalloc.sh does
    assert pre.stdout.strip() == f"True  {LIB} ['a b', '--x=1']" and pre.stderr == ""
    bad = _probe(tmp_path, OEFSMC_TCMALLOC=str(tmp_path / "nope.so"))
    assert bad.returncode == 2 and bad.stderr.strip() == (f"error: OEFSMC_TCMALLOC={tmp_path / 'nope.so'} is not "
                                                          "a file; set it to 0 (off), 1 (find it) or a library path")


@needs_lib
def test_cli_and_experiments_reexec_once(tmp_path):
    """`oefsmc experiments` runs in the same process as `oefsmc`: one re-exec, one line, once the command line
    parses (a usage error exits before any re-exec)."""
    args = ["experiments", "summarize", "--workdir", str(tmp_path)]
    out = run_cli(args, env=_env(OEFSMC_TCMALLOC="1"), timeout=120, cwd=tmp_path)
    assert out.returncode == 2 and "no grid records to summarize" in out.stderr
    assert out.stderr.count(f"oefsmc: preloading {LIB}") == 1, out.stderr
    out = run_cli(args[:-2], env=_env(OEFSMC_TCMALLOC="1"), timeout=120, cwd=tmp_path)
    assert out.returncode == 2 and "preloading" not in out.stderr and "--workdir" in out.stderr


def test_reexec_env_rules(tmp_path, monkeypatch):
    """Without the library installed: the decision alone, on a stand-in file."""
    lib = tmp_path / "libtcmalloc_minimal.so.4"
    lib.write_bytes(b"")
    monkeypatch.setattr(allocator, "loaded", lambda: False)
    env = allocator.reexec_env({allocator.ENV: str(lib), "LD_PRELOAD": "/x/a.so"}, platform="linux")
    assert env["LD_PRELOAD"] == f"{lib}:/x/a.so" and env[allocator.MARK] == "1"
    assert allocator.reexec_env({allocator.ENV: str(lib), allocator.MARK: "1"}, platform="linux") is None
    assert allocator.reexec_env({allocator.ENV: "0"}, platform="linux") is None
    assert allocator.reexec_env({allocator.ENV: str(lib), "LD_PRELOAD": str(lib)}, platform="linux") is None
    assert allocator.reexec_env({allocator.ENV: str(lib)}, platform="darwin") is None
    monkeypatch.setattr(allocator, "loaded", lambda: True)  # linked in, or preloaded under another path
    assert allocator.reexec_env({allocator.ENV: str(lib)}, platform="linux") is None
    assert allocator.find_tcmalloc("1", dirs=[str(tmp_path)]) == str(lib)
    assert allocator.find_tcmalloc("1", dirs=[str(tmp_path / "none")]) is None
    (tmp_path / "libtcmalloc.so.4").write_bytes(b"")
    assert allocator.find_tcmalloc("1", dirs=[str(tmp_path)]) == str(lib)  # the minimal one first
    with pytest.raises(ValueError, match="is not a file"):
        allocator.find_tcmalloc(str(tmp_path / "missing.so"))


def test_launch_script_and_python_pick_the_same_library(tmp_path):
    """launch/tcmalloc.sh runs allocator.py: the same library (or none) as the entry points' re-exec."""
    script = f"source {REPO / 'launch' / 'tcmalloc.sh'}; echo \"LD_PRELOAD=${{LD_PRELOAD:-}}\""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OEFSMC_TCMALLOC": "1"}
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"LD_PRELOAD={LIB or ''}"
