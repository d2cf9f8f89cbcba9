"""Compiles paid once: a second process loads the step from the persistent cache instead of compiling it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from oefsmc_jax.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = """
import jax, jax.numpy as jnp
from oefsmc_jax.training.compile_cache import CompileClock, enable
print("dir", enable(None, min_compile_s=0.0))
clock = CompileClock()
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
f(jnp.ones((64, 64))).block_until_ready()
r = clock.read()
print("hits", int(r["hits"]), "misses", int(r["misses"]))
print(clock.describe())
"""


def _run(env):
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _counts(out):
    words = next(ln for ln in out.splitlines() if ln.startswith("hits")).split()
    return int(words[1]), int(words[3])


def test_second_process_hits_the_persistent_cache(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OEFSMC_COMPILE_CACHE": str(tmp_path / "xla")}
    first = _run(env)
    hits, misses = _counts(first)
    assert f"dir {tmp_path / 'xla'}" in first and hits == 0 and misses >= 1 and "compiled in" in first
    assert len(list((tmp_path / "xla").iterdir())) >= misses
    assert _counts(_run(env)) == (misses, 0)  # every executable of the first process is loaded, none compiled
    off = _run({**env, "OEFSMC_COMPILE_CACHE": "off"})
    assert "dir None" in off and "hits 0 misses 0" in off


def test_threshold_env_stores_quick_compiles_or_names_itself(tmp_path):
    """``$OEFSMC_COMPILE_CACHE_MIN_S``: a small executable is stored at 0 and left out at the default (0.5 s)."""
    script = ("import jax, jax.numpy as jnp\n"
              "from oefsmc_jax.training.compile_cache import enable\n"
              "enable(None)\n"
              "jax.jit(lambda x: x + 1)(jnp.ones(3)).block_until_ready()\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    stored = {}
    for name, value in (("zero", "0"), ("default", "")):
        cache = tmp_path / name
        run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                             env={**env, "OEFSMC_COMPILE_CACHE": str(cache), "OEFSMC_COMPILE_CACHE_MIN_S": value})
        assert run.returncode == 0, run.stderr[-2000:]
        stored[name] = [f for f in cache.iterdir() if f.name.endswith("-cache")]
    assert len(stored["zero"]) >= 1 and stored["default"] == []


@pytest.mark.parametrize("value", ["-1", "soon", "nan", "inf"])
def test_bad_threshold_env_is_named(monkeypatch, value):
    from oefsmc_jax.training.compile_cache import min_compile_seconds

    monkeypatch.setenv("OEFSMC_COMPILE_CACHE_MIN_S", value)
    with pytest.raises(ConfigError, match=r"^\$OEFSMC_COMPILE_CACHE_MIN_S: .* is not allowed; a number of seconds"):
        min_compile_seconds()
    monkeypatch.setenv("OEFSMC_COMPILE_CACHE_MIN_S", "0.25")
    assert min_compile_seconds() == 0.25
    monkeypatch.delenv("OEFSMC_COMPILE_CACHE_MIN_S")
    assert min_compile_seconds() == 0.5


def test_default_folder_is_the_env_var_or_the_user_cache(monkeypatch, tmp_path):
    from oefsmc_jax.training.compile_cache import default_dir

    monkeypatch.delenv("OEFSMC_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_dir() == str(tmp_path / "oefsmc_jax" / "xla")
    monkeypatch.setenv("OEFSMC_COMPILE_CACHE", str(tmp_path / "named"))
    assert default_dir() == str(tmp_path / "named")
