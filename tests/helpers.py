"""Shared test helpers: paths, config composition, running a command as a user would."""

import json
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


def run_module(module: str, *args: str, env: dict | None = None, cwd=ROOT) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          env=full_env, timeout=600)


# A fleet run small enough for a test: 40 devices, a two-block model, 24 rounds of an hour.
SMALL = ["num_clients=40", "model.n_blocks=2", "model.d=16", "model.maxlen=30", "model.hidden=16",
         "sim.pretrain.max_epochs=1", "sim.round_s=3600", "sim.max_rounds=24", "dataset.days=6",
         "dataset.sessions_per_day=3"]


# Summary keys that describe how a run ran, not what it measured.
RUN_SPECIFIC = {"wall_s", "sim_wall_s", "peak_rss_mb", "resumed", "pretrain_cached", "backend", "placement",
                "checkpoint_s", "time_s"}


def simulate(tmp_path, name, *extra, cache, env: dict | None = None, cwd=ROOT):
    """`python -m fl_sim.run` on SMALL plus overrides; (summary, output folder)."""
    out = tmp_path / name
    res = run_module("fl_sim.run", *SMALL, *extra, f"output_dir={out}", env={"FL_SIM_CACHE": str(cache), **(env or {})},
                     cwd=cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((out / "summary.json").read_text()), out


def accounted(summary):
    """Every event evaluated or counted under a reason; every request answered, unservable or
    refused (by reason)."""
    events = summary["events_evaluated"] + summary["events_no_context"] + summary["events_no_model"]
    requests = (summary["requests_answered"] + summary["requests_unservable"]
                + sum(summary["requests_refused"].values()))
    return summary["events_total"] == events and summary["requests"] == requests
