"""Injected faults: downloads that drop or arrive damaged, a cloud at capacity, shards that
fail; each detected, handled and counted, with every event and request accounted for."""

import zlib

import numpy as np
import pytest

from clients.download import download
from fl_sim import faults as F
from fl_sim.engine import Recorder, Reply, Schedule
from fl_sim.errors import FlSimError
from fl_sim.protocol import Deliveries, Requests
from helpers import RUN_SPECIFIC, SMALL, accounted, run_module, simulate


class Fleet:
    """1 MB/s links; online except in the slots listed."""

    slot_s = 100.0

    def __init__(self, offline_slots=()):
        self.offline = set(offline_slots)

    def online(self, dev, t):
        t = np.broadcast_to(np.asarray(t, dtype=float), np.shape(dev))
        return np.array([int(x // self.slot_s) not in self.offline for x in t])

    def transfer_time(self, dev, t, nbytes, uplink):
        return np.broadcast_to(np.asarray(nbytes, dtype=float) / 1e6, np.shape(dev)).copy()


def run_download(fleet, faults, t, nbytes, intact=lambda i, o, w: o == F.OK):
    return download(fleet, faults, np.array([7]), np.array([t]), np.array([nbytes]), np.array([0]), intact)


def test_clean_download_takes_the_link_time():
    d = run_download(Fleet(), F.Faults(), t=10.0, nbytes=2e6)
    assert d.arrive[0] == pytest.approx(12.0) and d.spent[0] == 2e6
    assert all(c.sum() == 0 for c in d.counts.values())


def test_offline_at_the_answer_waits_for_the_next_online_slot():
    d = run_download(Fleet(offline_slots=[0, 1]), F.Faults(), t=10.0, nbytes=1e6)
    assert d.arrive[0] == pytest.approx(201.0) and d.counts["offline_waits"][0] == 1


def test_offline_mid_transfer_restarts_later_and_wastes_the_bytes_so_far():
    # Starts at 90 s, needs 20 s; slot 1 (100-200 s) offline: cut at 100 s after 10 MB of 20.
    d = run_download(Fleet(offline_slots=[1]), F.Faults(), t=90.0, nbytes=20e6)
    assert d.counts["downloads_dropped"][0] == 1
    assert d.arrive[0] == pytest.approx(220.0)  # again from 200 s
    assert d.spent[0] == pytest.approx(30e6)


def test_damaged_payloads_are_downloaded_again_until_the_attempts_run_out():
    faults = F.Faults(payload_corrupt=1.0, max_download_attempts=3)
    d = run_download(Fleet(), faults, t=0.0, nbytes=1e6)
    assert d.arrive[0] == np.inf and d.counts["downloads_failed"][0] == 1
    assert d.counts["payloads_corrupt"][0] == 3 and d.spent[0] == pytest.approx(3e6)
    # The device's verdict decides, not the injected outcome: a payload that verifies is kept.
    d = run_download(Fleet(), faults, t=0.0, nbytes=1e6, intact=lambda i, o, w: True)
    assert d.arrive[0] == pytest.approx(1.0) and d.counts["payloads_corrupt"][0] == 0


def test_injected_drops_cut_the_transfer_part_way():
    d = run_download(Fleet(), F.Faults(download_drop=1.0, max_download_attempts=2), t=0.0, nbytes=1e6)
    assert d.counts["downloads_dropped"][0] == 2 and d.arrive[0] == np.inf
    assert 0 < d.spent[0] < 2e6


def test_checksum_catches_a_flipped_byte_and_a_cut():
    rng = np.random.default_rng(0)
    blocks, rows = np.array([True, False, True]), [rng.normal(size=50).astype(np.float32) for _ in range(2)]
    good = F.checksum(blocks, rows)
    payload = F.payload(blocks, rows)
    assert zlib.crc32(payload) == good
    for where in (0.0, 0.37, 0.999):
        assert zlib.crc32(F.damage(payload, F.CORRUPTED, where)) != good
        assert zlib.crc32(F.damage(payload, F.TRUNCATED, where)) != good
    assert F.checksum(blocks, [rows[0], rows[1] * 1.0000001]) != good


def test_fault_draws_are_keyed_by_device_and_rates_hold():
    faults = F.Faults(seed=3, download_drop=0.1, payload_corrupt=0.2, payload_truncate=0.05)
    dev = np.arange(20_000)
    outcome, _ = faults.download(dev, np.zeros_like(dev), 0)
    share = np.bincount(outcome, minlength=4) / len(dev)
    assert share[[F.DROPPED, F.CORRUPTED, F.TRUNCATED, F.OK]] == pytest.approx([0.1, 0.2, 0.05, 0.65], abs=0.01)
    again, _ = faults.download(dev[::-1], np.zeros_like(dev), 0)  # a device's draw, whatever its company
    assert (again[::-1] == outcome).all()


class NoCloud:
    """A cloud that answers nothing (the recorder's loop on its own)."""

    counts, refused = {}, {}

    def empty_deliveries(self):
        return Deliveries.empty(2)

    def admit(self, parts):
        return Requests.empty(2, 0, 4)

    def answer(self, req):
        return Deliveries.empty(2)


def reply(shard, table=None, parked=0):
    return Reply(shard=shard, requests=Requests.empty(2, 0, 4), metrics={}, parked=parked, table=table,
                 installs=np.zeros((0, 3)) if table is not None else None)


def test_a_failed_shard_catches_up_with_the_next_exchange_and_its_deliveries_are_resent():
    sched = Schedule(t0=0.0, round_s=10.0, windows=np.array([0, 1]))
    rec = Recorder(NoCloud(), sched, n_shards=2, n_blocks=2, max_shard_failures=3)
    table = {"device": np.array([0])}
    for r in (0, 1):
        assert rec.next_round() == r
        rec.deliveries_for_shards()
        assert not rec.collect(r, 0, [reply(0), reply(1)])  # nobody waits: the round ends
        rec.end_round(r)
    one = Deliveries.empty(2)
    one.device, one.answer_time, one.request_time = np.array([1]), np.array([5.0]), np.array([4.0])
    one.blocks, one.cut, one.first = np.ones((1, 2), bool), np.zeros(1, bool), np.zeros(1, bool)
    one.model_bytes, one.candidate_bytes, one.checksum = np.array([10]), np.array([0]), np.array([1])
    one.candidates = np.zeros((1, 0), np.int64)
    rec.pending = one
    assert rec.next_round() == 2 and rec.window(2)[3]  # the last window
    sent = rec.deliveries_for_shards()
    assert list(sent[1].device) == [1] and len(sent[0]) == 0
    rec.shard_failed(1, "injected", state_lost=False)
    assert rec.collect(2, 0, [reply(0, table)])  # shard 1 failed: another exchange
    assert rec.failed_shards == 1
    again = rec.deliveries_for_shards()
    assert list(again[1].device) == [1] and len(again[0]) == 0  # re-sent
    assert not rec.collect(2, 1, [reply(0, {"device": np.array([99])}), reply(1, {"device": np.array([1])})])
    rec.end_round(2)
    assert rec.rounds[-1]["exchanges"] == 2
    assert rec.next_round() is None  # every shard's table is in: no catch-up round


def test_a_shard_failing_exchange_after_exchange_stops_the_run():
    sched = Schedule(t0=0.0, round_s=10.0, windows=np.arange(10))
    rec = Recorder(NoCloud(), sched, n_shards=2, n_blocks=2, max_shard_failures=3)
    with pytest.raises(FlSimError, match="shard 1 failed 3 exchanges in a row"):
        for k in range(10):
            rec.deliveries_for_shards()
            rec.shard_failed(1, "injected", state_lost=False)
            rec.collect(1, k, [reply(0)])


def test_a_shard_lost_without_checkpoints_stops_the_run_with_the_reason():
    sched = Schedule(t0=0.0, round_s=10.0, windows=np.arange(3))
    rec = Recorder(NoCloud(), sched, n_shards=2, n_blocks=2)
    rec.deliveries_for_shards()
    rec.collect(0, 0, [reply(0)])  # shard 1: no reply, no reason
    with pytest.raises(FlSimError, match="shard 1 lost its devices' state .no reply.; with sim.checkpoint_every"):
        rec.deliveries_for_shards()


def test_a_faulty_fleet_run_loses_nothing_and_counts_every_fault(tmp_path, cache):
    # duet: every request ships every block (the small model's controller may ship none)
    summary, _ = simulate(tmp_path, "flaky", "method=duet", "sim.backend=inprocess", "sim.nodes=2", "faults=flaky",
                          "faults.shard_fail=0.15", "faults.cloud_capacity=0.001", "faults.cloud_queue=2",
                          "faults.payload_corrupt=0.2", "faults.payload_truncate=0.1", "faults.download_drop=0.1",
                          cache=cache)
    f = summary["faults"]
    assert f["shard_rounds_failed"] > 0 and f["requests_queued"] > 0 and f["requests_refused_capacity"] > 0
    assert f["payloads_corrupt"] > 0 and f["payloads_truncated"] > 0 and f["downloads_dropped"] > 0
    assert f["bytes_wasted"] > 0 and summary["budget_violations"] == 0
    assert summary["requests_refused"]["capacity"] == f["requests_refused_capacity"]
    assert accounted(summary)
    clean, _ = simulate(tmp_path, "clean", "method=duet", "sim.backend=inprocess", "sim.nodes=2", cache=cache)
    assert accounted(clean) and clean["events_total"] == summary["events_total"]
    assert all(v == 0 for v in clean["faults"].values())


def test_faulty_runs_repeat_exactly(tmp_path, cache):
    args = ("sim.backend=inprocess", "sim.nodes=2", "faults=flaky", "faults.shard_fail=0.2")
    a, _ = simulate(tmp_path, "a", *args, cache=cache)
    b, _ = simulate(tmp_path, "b", *args, cache=cache)
    for key in ("ndcg10", "hit10", "requests", "bytes_down", "faults", "events_no_model"):
        assert a[key] == b[key], key


VOLATILE = RUN_SPECIFIC | {"faults"}


def test_a_shard_rebuilt_from_its_checkpoint_replays_exactly(tmp_path, cache):
    """A shard failing after running its round (state in doubt) is rebuilt from the last
    checkpoint plus a replay of its rounds since; the run equals one where the same failures
    left the state intact."""
    args = ("sim.backend=inprocess", "sim.nodes=2", "dataset.days=12", "sim.max_rounds=null", "faults.shard_fail=0.1",
            "sim.checkpoint_every=5")
    intact, _ = simulate(tmp_path, "intact", *args, cache=cache)
    rebuilt, _ = simulate(tmp_path, "rebuilt", *args, "faults.shard_fail_partway=true", cache=cache)
    assert intact["faults"]["nodes_lost"] == 0
    assert rebuilt["faults"]["nodes_lost"] == rebuilt["faults"]["shard_rounds_failed"] > 0
    assert rebuilt["faults"]["rounds_replayed"] > 0 and accounted(rebuilt)
    for key in intact.keys() - VOLATILE:
        assert intact[key] == rebuilt[key], key


def test_lost_nodes_on_ray_are_rebuilt_as_in_process(tmp_path, cache):
    args = ("sim.nodes=2", "faults.node_vanish=0.08", "sim.checkpoint_every=5")
    local, _ = simulate(tmp_path, "local", "sim.backend=inprocess", *args, cache=cache)
    ray, _ = simulate(tmp_path, "ray", "sim.backend=ray", *args, cache=cache)
    assert local["faults"]["nodes_lost"] > 0 and ray["faults"] == local["faults"] and accounted(ray)
    for key in local.keys() - VOLATILE:
        assert local[key] == ray[key], key


def test_rebuilding_needs_checkpoints(tmp_path, cache):
    res = run_module("fl_sim.run", *SMALL, "sim.backend=inprocess", "faults.node_vanish=0.1",
                     f"output_dir={tmp_path / 'x'}", env={"FL_SIM_CACHE": str(cache)})
    assert res.returncode == 2 and "sim.checkpoint_every" in res.stderr


def test_a_first_load_finishing_after_a_rebuild_does_not_replace_the_rebuilt_shard(monkeypatch):
    # A Ray actor runs its calls on threads, in any order: a node lost in round 0 is rebuilt
    # while the first load may still be reading the run files. The later load must not put a
    # fresh shard over the rebuilt one (that undid the rebuilt shard's exchanges on clusters).
    import threading

    import clients.shard
    from clients.app import ShardActor

    started, release = threading.Event(), threading.Event()
    made = []

    class SlowFirst:
        def __init__(self, run_dir, index, n_shards):
            made.append(self)
            if len(made) == 1:  # the first load: held until the rebuild is done
                started.set()
                release.wait(10)

    monkeypatch.setattr(clients.shard, "Shard", SlowFirst)
    actor = ShardActor(0, 1)
    load = threading.Thread(target=actor.load, args=("run",))
    load.start()
    assert started.wait(10)
    actor.rebuild("run", None, [])
    rebuilt = actor._loaded(1)
    release.set()
    load.join(10)
    assert len(made) == 2 and rebuilt is made[1] and actor._loaded(1) is rebuilt


def test_a_shard_that_cannot_load_says_why_instead_of_waiting(monkeypatch):
    import clients.shard
    from clients.app import ShardActor

    def broken(run_dir, index, n_shards):
        raise FileNotFoundError(f"{run_dir}/streams.npy")

    monkeypatch.setattr(clients.shard, "Shard", broken)
    actor = ShardActor(0, 1)
    with pytest.raises(FileNotFoundError):
        actor.load("gone")
    with pytest.raises(RuntimeError, match="could not load its run files.*streams.npy"):
        actor._loaded(5)
