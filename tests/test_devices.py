"""Device fleet: real and parametric profiles, links that vary in time, budgets, determinism."""

import numpy as np
import pytest

from fl_sim.devices import build_fleet, counter_rng
from fl_sim.devices.budget import budgets
from fl_sim.devices.links import bank_from_arrays, read_trace
from fl_sim.errors import ConfigError, DataError
from helpers import make_cfg


def brute_force_transfer(dur, mbps, start, nbytes, step=2e-4):
    """Integrate a cyclic trace in small steps until nbytes have moved."""
    period = dur.sum()
    edges = np.cumsum(dur)
    t, moved = start, 0.0
    while moved < nbytes:
        k = np.searchsorted(edges, t % period, side="right")
        moved += max(mbps[k] * 125_000, 1000.0) * step
        t += step
    return t - start


def test_transfer_time_integrates_the_trace():
    dur = np.array([2.0, 1.0, 3.0])
    mbps = np.array([1.0, 0.0, 4.0])  # a dead second in the middle
    bank = bank_from_arrays([(dur, mbps), (np.array([5.0]), np.array([8.0]))], ["a", "b"])
    for start, nbytes in [(0.0, 100_000), (1.5, 300_000), (5.9, 2_000_000), (17.2, 50_000)]:
        t0 = np.array([start])
        b0 = bank.bytes_until(np.array([0]), t0)
        took = bank.time_until(np.array([0]), b0 + nbytes) - t0
        assert took[0] == pytest.approx(brute_force_transfer(dur, mbps, start, nbytes), abs=2e-3)
    # Constant 8 Mbit/s = 1 MB/s.
    b0 = bank.bytes_until(np.array([1]), np.array([3.0]))
    assert (bank.time_until(np.array([1]), b0 + 2_500_000) - 3.0)[0] == pytest.approx(2.5)


@pytest.mark.parametrize("devices", ["tiers", "traces"])
def test_fleet_is_independent_of_fleet_size(devices, request):
    over = [f"devices.path={request.getfixturevalue('shared_traces')}"] if devices == "traces" else []
    cfg = make_cfg(f"devices={devices}", *over)
    small, large = build_fleet(cfg.devices, 50, seed=3), build_fleet(cfg.devices, 2000, seed=3)
    dev = np.arange(50)
    for name in ("compute", "memory", "tier", "link_class", "offset", "online_p"):
        np.testing.assert_array_equal(getattr(small, name), getattr(large, name)[:50])
    if devices == "tiers":  # same bank; trace files are read in the same order too
        np.testing.assert_array_equal(small.trace, large.trace[:50])
    t = 12_345.0
    np.testing.assert_array_equal(small.online(dev, t), large.online(dev, t))
    np.testing.assert_allclose(small.transfer_time(dev, t, 1e6, True), large.transfer_time(dev, t, 1e6, True))
    other = build_fleet(cfg.devices, 50, seed=4)
    assert not np.array_equal(other.compute, small.compute)


def test_fleet_heterogeneity_and_availability():
    cfg = make_cfg()
    fleet = build_fleet(cfg.devices, 4000, seed=0)
    dev = np.arange(4000)
    shares = {k: (fleet.tier == k).mean() for k in ("low", "mid", "high")}
    assert shares == pytest.approx({"low": 0.3, "mid": 0.5, "high": 0.2}, abs=0.03)
    times = np.arange(0, 86_400 * 3, 900.0)
    online = np.array([fleet.online(dev, t).mean() for t in times])
    assert online.mean() == pytest.approx(0.7, abs=0.02)
    per_device = np.mean([fleet.online(dev, t) for t in times], axis=0)
    assert np.corrcoef(per_device, fleet.online_p)[0, 1] > 0.8
    # Free compute changes between slots, stays within [free_min, 1].
    a, b = fleet.free_compute(dev, 0.0), fleet.free_compute(dev, 900.0)
    assert not np.array_equal(a, b) and a.min() >= 0.2 and a.max() <= 1
    np.testing.assert_array_equal(a, fleet.free_compute(dev, 899.0))
    # Links: Wi-Fi moves a payload faster than 3G, and rates vary over time.
    tt = fleet.transfer_time(dev, 500.0, 1e6, uplink=False)
    assert np.median(tt[fleet.link_class == "wifi"]) < np.median(tt[fleet.link_class == "3g"]) / 5
    assert len(np.unique(fleet.down_bps(np.zeros(20, dtype=int), np.arange(20) * 60.0))) > 5


def test_budgets_follow_free_resources():
    cfg = make_cfg()
    fleet = build_fleet(cfg.devices, 1000, seed=0)
    dev = np.arange(1000)
    max_flops, max_params = budgets(fleet, dev, 0.0, latency_s=0.05, memory_share=0.05)
    np.testing.assert_allclose(max_flops, 0.05 * fleet.compute * fleet.free_compute(dev, 0.0))
    assert np.median(max_flops[fleet.tier == "low"]) < np.median(max_flops[fleet.tier == "high"]) / 3
    assert (max_params > 0).all()


def test_counter_rng_is_uniform_and_keyed():
    u = counter_rng.uniform(7, 0, np.arange(100_000), 5)
    assert abs(u.mean() - 0.5) < 0.01 and u.min() >= 0 and u.max() < 1
    assert not np.array_equal(u, counter_rng.uniform(7, 0, np.arange(100_000), 6))
    assert not np.array_equal(u, counter_rng.uniform(7, 1, np.arange(100_000), 5))


def test_bad_trace_and_config(tmp_path):
    bad = tmp_path / "trace"
    bad.write_text("0 1.0\n1 2.0\n1 3.0\n")
    with pytest.raises(DataError, match="line 3"):
        read_trace(bad)
    bad.write_text("0 one\n")
    with pytest.raises(DataError, match=str(bad)):
        read_trace(bad)
    with pytest.raises(ConfigError, match="devices.tiers.low.share"):
        build_fleet(make_cfg("devices.tiers.low.share=-1").devices, 10, 0)
    with pytest.raises(ConfigError, match="online_mean"):
        build_fleet(make_cfg("devices.availability.online_mean=0").devices, 10, 0)
    with pytest.raises(DataError, match="phone table"):
        build_fleet(make_cfg("devices=traces", f"devices.path={tmp_path}").devices, 10, 0)
