"""`flwr run`: the ServerApp and ClientApp declared in pyproject.toml, started by Flower's own
tooling against a SuperLink this test starts on loopback (simulation runtime, no dependency
installation), give the summary `python -m fl_sim.run` gives with the same settings."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT, RUN_SPECIFIC, SMALL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_command(name: str) -> str:
    """Flower's command installed with this Python (its environment need not be on PATH)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"{name} is not installed with {sys.executable} nor on PATH"
    return found


@pytest.fixture
def superlink(tmp_path):
    """(FLWR_HOME naming it as the default connection, environment) of a SuperLink on loopback."""
    port = free_port()
    home = tmp_path / "flwr_home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "test"\n\n[superlink.test]\n'
                                      f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    # RAY_ADDRESS=local: the simulation's Ray is its own, whatever else runs on this machine.
    # Flower's processes start its other commands from PATH: this Python's first.
    env = {**os.environ, "FLWR_HOME": str(home), "RAY_ADDRESS": "local",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen([flower_command("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
                             "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None, "flower-superlink exited"
            time.sleep(0.2)
        yield env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the SuperLink and the simulation it started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_flwr_run_gives_the_same_summary(tmp_path, cache, superlink, baseline):
    local, _ = baseline
    out = tmp_path / "flwr"
    overrides = " ".join(SMALL)
    res = subprocess.run([flower_command("flwr"), "run", str(ROOT), "--stream", "--federation-config",
                          "num-supernodes=2", "--run-config", f'overrides="{overrides}" output-dir="{out}"'],
                         env={**superlink, "FL_SIM_CACHE": str(cache)}, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (out / "summary.json").exists(), res.stdout[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == "flwr run" and summary["nodes"] == 2
    for key in local.keys() - RUN_SPECIFIC:
        assert summary[key] == local[key], key
