"""Shared test helpers: paths, config composition, running a command as a user would."""

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("FL_SIM_SHARED", ROOT.parent / "shared"))


def make_cfg(*overrides: str):
    """Compose the project's config with overrides, as the commands do."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def run_module(module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          env=full_env, timeout=600)
