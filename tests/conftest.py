import os
from pathlib import Path

import pytest

from helpers import SHARED


@pytest.fixture(scope="session")
def shared_data() -> Path:
    data = SHARED / "data"
    if not data.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"shared data not found at {data} (set FL_SIM_SHARED)")
        pytest.skip(f"shared data not found at {data}")
    return data


@pytest.fixture(scope="session")
def shared_traces() -> Path:
    traces = SHARED / "traces"
    if not traces.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"shared traces not found at {traces} (set FL_SIM_SHARED)")
        pytest.skip(f"shared traces not found at {traces}")
    return traces


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"
