"""The Ray backend on a real two-node cluster (both nodes on this machine, on loopback): the
shards land on both nodes, the project's code ships with the job, the run files and
checkpoints travel through Ray's object store, and the run equals the in-process one."""

import os
import subprocess
import sys

import pytest

from helpers import ROOT, RUN_SPECIFIC, accounted, simulate

LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # the driver's node address: 127.0.0.1 too


@pytest.fixture
def two_nodes():
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests/ray_cluster.py")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, **LOOPBACK})
    try:
        address = ""
        while not address.startswith("127.0.0.1:"):  # Ray may log a line to stdout first
            line = proc.stdout.readline()
            assert line, f"the cluster did not start (exit code {proc.poll()})"
            address = line.strip()
        yield address
    finally:
        proc.stdin.close()  # both nodes stop
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_two_node_cluster_matches_inprocess(tmp_path, cache, two_nodes):
    # Lost nodes rebuilt from checkpoints: checkpoints leave the nodes and come back as bytes.
    faults = ("sim.nodes=2", "faults.node_vanish=0.08", "sim.checkpoint_every=5")
    local, _ = simulate(tmp_path, "local", "sim.backend=inprocess", *faults, cache=cache)
    # From a folder without the project's code, as on another machine: the workers import what
    # ships with the job.
    cluster, _ = simulate(tmp_path, "cluster", "sim.backend=ray", f"sim.ray.address={two_nodes}", *faults,
                          cache=cache, env=LOOPBACK, cwd=tmp_path)
    where = cluster["placement"]
    assert where["nodes_used"] == 2 and where["shards_per_node"] == [1, 1], where
    assert where["code_shipped"] and where["storage"] == "object store", where
    assert local["faults"]["nodes_lost"] > 0 and cluster["faults"] == local["faults"] and accounted(cluster)
    differ = {key: (cluster[key], local[key]) for key in sorted(local.keys() - RUN_SPECIFIC)
              if cluster[key] != local[key]}
    assert not differ, differ  # (cluster, in-process) of every key that differs
    assert cluster["peak_rss_mb"] > local["peak_rss_mb"]  # the nodes' Ray processes are counted


def test_shards_go_to_nodes_in_proportion_to_their_cpus():
    from fl_sim.backends import place

    assert place({"a": 4, "b": 2}, 3) == ["a", "a", "b"]
    assert sorted(place({"a": 8, "b": 8, "c": 16}, 8)) == ["a", "a", "b", "b", "c", "c", "c", "c"]
    assert place({"a": 1}, 3) == ["a", "a", "a"]
    assert place({"a": 0, "b": 2}, 2) == ["b", "b"]  # a node without CPUs gets none while others have room


def test_flower_messages_reach_the_workers_all_at_once_in_push_order():
    """Flower's runtime moves one message per node every 0.1 s; the pump moves every waiting
    message, ordered by when it was pushed across nodes, so each exchange's ticks are queued
    before any later exchange's (a worker waiting on a later tick would hold up the others)."""
    import queue
    import threading
    from types import SimpleNamespace

    from flwr.server.superlink.fleet.vce import vce_api

    from fl_sim.backends import prompt_messages, pump_messages

    def tick(node, n):  # node 1's ticks were pushed first in each exchange, then node 2's
        return SimpleNamespace(name=f"{node}:{n}", metadata=SimpleNamespace(created_at=10.0 * n + node))

    class State:
        def __init__(self):
            self.waiting = {1: [tick(1, n) for n in range(3)], 2: [tick(2, n) for n in range(3)]}
            self.limits = []

        def get_message_ins(self, node_id, limit):
            self.limits.append(limit)
            out, self.waiting[node_id] = self.waiting[node_id], []
            return out

    class OnePass(threading.Event):
        def wait(self, timeout=None):
            self.set()
            return True

    state, q = State(), queue.Queue()
    pump_messages(state, q, {1: 0, 2: 1}, OnePass())
    assert [q.get_nowait().name for _ in range(q.qsize())] == ["1:0", "2:0", "1:1", "2:1", "1:2", "2:2"]
    assert state.limits == [None, None]

    original = vce_api.add_messages_to_queue
    with prompt_messages():
        assert vce_api.add_messages_to_queue is pump_messages
    assert vce_api.add_messages_to_queue is original
