"""Test setup: simulate 4 CPU devices before JAX starts, and point at the shared data folder."""

import os
import pathlib
import shutil
import tempfile

# the tests compile far more than they run, and XLA's CPU backend compiles faster at optimisation level 0; every
# equality a test asserts compares computations compiled with these same flags (a test that starts processes with
# other device counts keeps the rest: helpers.xla_flags). An XLA_FLAGS of the caller's own replaces both.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# the command-line runs the tests start print exactly what they print without the allocator's re-exec line;
# tests/test_allocator.py sets it where it tests the re-exec
os.environ.setdefault("OEFSMC_TCMALLOC", "0")
# one persistent compilation cache per test session, written fresh and removed at its end: the test processes and
# the command-line runs they start share it, so the same tiny run is not compiled again in every test, while no
# test reads executables that another session or checkout wrote, and a user's $OEFSMC_COMPILE_CACHE does not reach
# them. It stores every executable, the small eager ones included (a short run spends much of its time on those).
# Tests that kill processes mid-write name caches of their own (fault injection, signals, the compile-cache tests).
# The first process of the session (the xdist controller, or the only one) creates it; its workers inherit it.
_SESSION_CACHE_ENV = "OEFSMC_TEST_SESSION_CACHE"
_OWNS_SESSION_CACHE = _SESSION_CACHE_ENV not in os.environ
if _OWNS_SESSION_CACHE:
    os.environ[_SESSION_CACHE_ENV] = tempfile.mkdtemp(prefix="oefsmc-test-xla-")
os.environ["OEFSMC_COMPILE_CACHE"] = os.environ[_SESSION_CACHE_ENV]
os.environ["OEFSMC_COMPILE_CACHE_MIN_S"] = "0"

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("OEFSMC_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """The shared real-data folder (../shared/data or $OEFSMC_DATA)."""
    if not SHARED_DATA.exists():
        pytest.fail(f"shared data folder {SHARED_DATA} is missing; set OEFSMC_DATA")
    return SHARED_DATA


def pytest_collection_modifyitems(items: list) -> None:
    """Mark every test that takes the ``shared_data`` fixture ``needs_data``, so ``-m "not needs_data"`` runs
    without the real-data folder (tests that read it another way carry the marker themselves)."""
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.needs_data)


def pytest_unconfigure(config: pytest.Config) -> None:
    """The process that created the session's compilation cache removes it (nothing else is in that folder)."""
    if _OWNS_SESSION_CACHE:
        shutil.rmtree(os.environ[_SESSION_CACHE_ENV], ignore_errors=True)
