"""Test setup: simulate 4 CPU devices before JAX starts, and point at the shared data folder."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# the command-line runs the tests start print exactly what they print without the allocator's re-exec line;
# tests/test_allocator.py sets it where it tests the re-exec
os.environ.setdefault("OEFSMC_TCMALLOC", "0")
# no persistent compilation cache in the tests or the command-line runs they start: no test reads executables that
# another test, session or checkout wrote, and a user's $OEFSMC_COMPILE_CACHE does not reach them
# (tests/test_compile_cache.py names its own folder, and each fault-injection test one of its own)
os.environ["OEFSMC_COMPILE_CACHE"] = "off"

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
