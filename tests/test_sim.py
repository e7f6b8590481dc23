"""The fleet simulation end to end at small scale: contract, accounting, determinism."""

import json

import pandas as pd
import pytest

from helpers import run_module

SMALL = ["num_clients=40", "model.n_blocks=2", "model.d=16", "model.maxlen=30", "model.hidden=16",
         "sim.pretrain.max_epochs=1", "sim.max_rounds=24", "dataset.days=6", "dataset.sessions_per_day=3"]


def simulate(tmp_path, name, *extra, cache):
    out = tmp_path / name
    res = run_module("fl_sim.run", *SMALL, *extra, f"output_dir={out}", env={"FL_SIM_CACHE": str(cache)})
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((out / "summary.json").read_text()), out


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_summary_contract_and_accounting(tmp_path, cache):
    summary, out = simulate(tmp_path, "a", "sim.backend=inprocess", "sim.nodes=2", cache=cache)
    for key in ("num_devices", "rounds", "ndcg10", "hit10", "events_total", "events_evaluated", "requests",
                "bytes_up", "bytes_down", "mean_flops_per_inference", "mean_params_on_device",
                "budget_violations", "sim_time_s", "wall_s", "peak_rss_mb", "backend", "nodes"):
        assert key in summary, key
    assert summary["num_devices"] == 40 and 0 < summary["rounds"] <= 24  # windows without events are skipped
    assert summary["events_total"] == (summary["events_evaluated"] + summary["events_no_context"]
                                       + summary["events_no_model"])
    assert summary["events_evaluated"] > 0 and summary["requests"] > 0
    assert summary["budget_violations"] == 0
    devices = pd.read_parquet(out / "devices.parquet")
    assert len(devices) == 40 and {"tier", "link_class", "ndcg10", "requests"} <= set(devices.columns)
    assert devices["events"].sum() == summary["events_total"]
    rounds = pd.read_parquet(out / "rounds.parquet")
    assert len(rounds) == summary["rounds"] + 1 and rounds["requests"].sum() == summary["requests"]
    assert (out / "rounds.png").exists()


def test_same_results_whatever_the_shard_count(tmp_path, cache):
    one, _ = simulate(tmp_path, "one", "sim.backend=inprocess", "sim.nodes=1", cache=cache)
    three, _ = simulate(tmp_path, "three", "sim.backend=inprocess", "sim.nodes=3", cache=cache)
    for key in ("events_total", "events_evaluated", "requests", "bytes_up", "bytes_down", "budget_violations"):
        assert one[key] == three[key], key
    for key in ("ndcg10", "hit10", "mean_flops_per_inference"):
        assert one[key] == pytest.approx(three[key], rel=1e-6), key


def test_device_rec_ships_once(tmp_path, cache):
    summary, out = simulate(tmp_path, "dr", "method=device_rec", "sim.backend=inprocess", "sim.nodes=2", cache=cache)
    assert summary["requests"] == 0 and summary["bytes_up"] == 0
    devices = pd.read_parquet(out / "devices.parquet")
    assert devices["bytes_down"].nunique() == 1  # the same full model for every device, once


def test_ray_backend_matches_inprocess(tmp_path, cache):
    """Flower on Ray, with the shard count changed too: the same seed, the same results."""
    local, _ = simulate(tmp_path, "local", "sim.backend=inprocess", "sim.nodes=2", cache=cache)
    ray, out = simulate(tmp_path, "ray", "sim.backend=ray", "sim.nodes=3", cache=cache)
    assert ray["backend"] == "ray" and ray["nodes"] == 3 and ray["failed_shards"] == 0
    assert ray["events_no_model"] == 0  # every device got its first model
    for key in ("events_total", "events_evaluated", "events_no_context", "requests", "bytes_up", "bytes_down",
                "download_retries", "offline_deferred"):
        assert ray[key] == local[key], key
    for key in ("ndcg10", "hit10", "mean_flops_per_inference"):
        assert ray[key] == pytest.approx(local[key], rel=1e-6), key
    assert len(pd.read_parquet(out / "devices.parquet")) == 40
