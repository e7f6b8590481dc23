"""Checkpoints and resume=true: a run killed with SIGKILL, or stopped by a shard's real
failure, continues from its last checkpoint and ends with the metrics of a run never stopped."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT, RUN_SPECIFIC, SMALL, run_module, simulate

# 12 simulated days with every kind of fault.
LONG = ["sim.max_rounds=null", "dataset.days=12", "sim.backend=inprocess", "sim.nodes=2", "faults=flaky",
        "sim.checkpoint_every=10"]
MANY_ROUNDS = ["sim.round_s=600", "sim.checkpoint_every=20"]  # ~450 short rounds: time to kill the run part-way
VOLATILE = RUN_SPECIFIC


def same_metrics(a: dict, b: dict) -> None:
    for key in a.keys() - VOLATILE:
        assert a[key] == b[key], key


def test_killed_run_resumes_to_the_same_metrics(tmp_path, cache):
    clean, _ = simulate(tmp_path, "clean", *LONG, *MANY_ROUNDS, cache=cache)
    out = tmp_path / "killed"
    env = {**os.environ, "FL_SIM_CACHE": str(cache)}
    proc = subprocess.Popen([sys.executable, "-m", "fl_sim.run", *SMALL, *LONG, *MANY_ROUNDS, f"output_dir={out}"], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = out / ".sim" / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if pointer.exists() and json.loads(pointer.read_text())["round"] >= 59:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.001)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "summary.json").exists()
    resumed, _ = simulate(tmp_path, "killed", *LONG, *MANY_ROUNDS, "resume=true", cache=cache)
    assert resumed["resumed"] is True
    same_metrics(clean, resumed)


def test_a_shard_failing_for_real_stops_cleanly_and_resumes(tmp_path, cache):
    args = [*LONG, "trigger=drift", "trigger._target_=boom_trigger.BoomAt"]
    env = {"FL_SIM_CACHE": str(cache), "PYTHONPATH": str(ROOT / "tests")}
    clean, _ = simulate(tmp_path, "clean", *args, cache=cache, env=env)
    out = tmp_path / "boom"
    res = run_module("fl_sim.run", *SMALL, *args, f"output_dir={out}",
                     env={**env, "FL_SIM_TEST_BOOM_AT_CALL": "600"})
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "boom: the shard's process died" in res.stderr and "resume=true" in res.stderr
    assert json.loads((out / ".sim" / "checkpoints" / "latest.json").read_text())["round"] >= 9
    # Resumed on the other backend: the checkpoint does not depend on where shards ran.
    resumed, _ = simulate(tmp_path, "boom", *args, "resume=true", "sim.backend=ray", cache=cache, env=env)
    assert resumed["resumed"] is True and resumed["backend"] == "ray"
    same_metrics(clean, resumed)


def test_a_passing_real_failure_is_rebuilt_and_the_run_goes_on(tmp_path, cache):
    """A shard raising part-way (a real exception, once) is rebuilt from its checkpoint and
    replayed; the run ends as if nothing happened, the failure counted. (No cloud capacity here:
    the failed shard's requests reach the cloud one exchange late, and a binding first-come-
    first-served queue would serve them in another order.)"""
    args = [*LONG, "trigger=drift", "trigger._target_=boom_trigger.BoomOnce", "faults.cloud_capacity=null"]
    env = {"FL_SIM_CACHE": str(cache), "PYTHONPATH": str(ROOT / "tests")}
    clean, _ = simulate(tmp_path, "clean", *args, cache=cache, env=env)
    once, _ = simulate(tmp_path, "once", *args, cache=cache, env={**env, "FL_SIM_TEST_BOOM_AT_CALL": "600"})
    assert once["faults"]["nodes_lost"] == clean["faults"]["nodes_lost"] + 1
    assert once["faults"]["shard_rounds_failed"] == clean["faults"]["shard_rounds_failed"] + 1
    for key in clean.keys() - VOLATILE - {"faults", "failed_shards"}:
        assert clean[key] == once[key], key


@pytest.mark.parametrize("extra, message", [
    ([], "no checkpoint"),
    (["num_clients=41"], "num_clients"),
])
def test_resume_refuses_what_it_cannot_continue(tmp_path, cache, extra, message):
    out = tmp_path / "run"
    args = [*SMALL, *LONG, "trigger=drift", "trigger._target_=boom_trigger.BoomAt", f"output_dir={out}"]
    env = {"FL_SIM_CACHE": str(cache), "PYTHONPATH": str(ROOT / "tests")}
    if extra:  # a run stopped after a checkpoint, resumed with another config
        res = run_module("fl_sim.run", *args, env={**env, "FL_SIM_TEST_BOOM_AT_CALL": "600"})
        assert res.returncode == 2 and (out / ".sim" / "checkpoints" / "latest.json").exists()
    res = run_module("fl_sim.run", *args, *extra, "resume=true", env=env)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr


def test_models_packed_for_checkpoints_come_back_whole():
    """Checkpoints store the devices' models as arrays (clients.state.pack_models)."""
    import numpy as np

    from clients.state import Model, pack_models, unpack_models

    rng = np.random.default_rng(0)
    models = [None,
              Model(blocks=np.array([True, False, True]), weights={0: rng.random((4, 5), dtype=np.float32),
                                                                    2: rng.random((4, 5), dtype=np.float32)},
                    candidates=np.array([7, 3, 9])),
              Model(blocks=np.array([False, True, False]), weights=None, candidates=np.zeros(0, np.int64)),
              Model(blocks=np.array([False, False, True]), weights={2: rng.random((4, 5), dtype=np.float32)},
                    candidates=np.array([1, 2, 3])),
              None]
    back = unpack_models(pack_models(models))
    assert [m is None for m in back] == [m is None for m in models]
    for a, b in zip(models, back):
        if a is None:
            continue
        assert (a.blocks == b.blocks).all() and (a.candidates == b.candidates).all()
        assert (a.weights is None) == (b.weights is None)
        if a.weights is not None:
            assert list(a.weights) == list(b.weights)
            assert all((a.weights[k] == b.weights[k]).all() for k in a.weights)
    assert unpack_models(pack_models([])) == [] and unpack_models(pack_models([None])) == [None]
