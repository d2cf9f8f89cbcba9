"""The compression cache: keyed by everything the compression stage reads, never used for uncommitted code, and a
run that hits it equals the run that filled it."""

import dataclasses

import jax
import numpy as np
import pytest
import tiny_demo
from helpers import tiny_spec

from oefsmc_jax import compression_cache
from oefsmc_jax.methods import KD
from oefsmc_jax.models import init_variables
from oefsmc_jax.oe.calibration import calibration_set
from oefsmc_jax.training.checkpoint import load_model

SPEC = tiny_spec()
MODES = {"cpu_fusion": "exact", "cpu_wgrad": "xla"}


@pytest.fixture
def committed(monkeypatch):
    monkeypatch.setattr(compression_cache, "_commit", lambda: "c" * 40)


def _calibration(seed=0):
    rng = np.random.default_rng(seed)
    return calibration_set(rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8), np.arange(20) % 10, 10)


def test_the_key_follows_every_input_the_compression_reads(committed):
    config = tiny_demo.config()
    teacher = (SPEC, init_variables(SPEC, 8, 0))
    cal = _calibration()
    k = compression_cache.key(config, KD(), teacher, cal, MODES)
    assert k == compression_cache.key(config, KD(), teacher, _calibration(), MODES)  # equal inputs, equal key
    other_weights = dataclasses.replace(cal, weights=cal.weights * np.linspace(0.5, 1.5, len(cal)))
    changed = [compression_cache.key(config, KD(prune_ratio=(0.25,)), teacher, cal, MODES),
               compression_cache.key(config, KD(), (SPEC, init_variables(SPEC, 8, 1)), cal, MODES),
               compression_cache.key(config, KD(), teacher, _calibration(1), MODES),
               compression_cache.key(config, KD(), teacher, other_weights, MODES),
               compression_cache.key(config, KD(), teacher, cal, {**MODES, "cpu_fusion": "off"})]
    config.seed = 1
    changed.append(compression_cache.key(config, KD(), teacher, cal, MODES))
    assert len({k, *changed}) == 7


def test_uncommitted_code_is_never_cached(monkeypatch):
    monkeypatch.setattr(compression_cache, "_commit", lambda: None)
    assert compression_cache.key(tiny_demo.config(), KD(), (SPEC, init_variables(SPEC, 8, 0)), _calibration(),
                                 MODES) is None


@pytest.mark.slow
def test_a_run_that_hits_the_cache_equals_the_run_that_filled_it(committed, tmp_path, capfd):
    from oefsmc_jax.run import run

    overrides = {**tiny_demo.OVERRIDES, "method.name": "fskd", "arms": "base,oe", "teacher.steps": 10,
                 "method.cache_compression": True, "oe.cache_dir": str(tmp_path / "cache"),
                 "oe.calibration_ood_share": "count"}  # OOD rows weighted: the two arms compress differently
    first = run(tiny_demo.config(overrides), tmp_path / "one")
    assert "reusing the compressed student of an equal" not in capfd.readouterr().err
    second = run(tiny_demo.config(overrides), tmp_path / "two")
    err = capfd.readouterr().err
    assert err.count("reusing the compressed student of an equal compression stage") == 2  # base and oe
    assert len(list((tmp_path / "cache").glob("compressed_*"))) == 2
    for arm in ("base", "oe"):
        assert second["arms"][arm]["metrics"] == first["arms"][arm]["metrics"]
        assert (tmp_path / "two" / arm / "compression").is_dir() == (tmp_path / "one" / arm / "compression").is_dir()
        _, a, _ = load_model(tmp_path / "one" / arm / "compressed")
        _, b, _ = load_model(tmp_path / "two" / arm / "compressed")
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(x, y)
