import os
from pathlib import Path

import pytest

from helpers import SHARED, simulate


def _shared(part: str) -> Path:
    """A folder of ../shared (or $FL_SIM_SHARED): skipped where absent, a failure under CI."""
    path = SHARED / part
    if not path.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"shared {part} not found at {path} (set FL_SIM_SHARED)")
        pytest.skip(f"shared {part} not found at {path}")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return _shared("data")


@pytest.fixture(scope="session")
def shared_traces() -> Path:
    return _shared("traces")


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    """One cache for the fleet runs of a session (the pre-trained model is reused)."""
    return tmp_path_factory.mktemp("sim_cache")


@pytest.fixture(scope="session")
def baseline(tmp_path_factory, cache):
    """(summary, output folder) of the SMALL fleet in-process on two shards: the run that the
    contract test reads and other backends are compared with (run once a session)."""
    return simulate(tmp_path_factory.mktemp("baseline"), "baseline", "sim.backend=inprocess", "sim.nodes=2",
                    cache=cache)
