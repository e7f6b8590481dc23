"""Triggers: built-in decisions and plug-in by config, including from outside the package."""

import sys

import numpy as np
import pytest
from hydra.utils import instantiate

from clients.triggers import DeviceView, Drift, Trigger
from helpers import ROOT, make_cfg


def view(n=4, **over):
    base = dict(device=np.arange(n), index=np.arange(n), now=np.zeros(n), events_since_request=np.full(n, 5), sessions_since_request=np.ones(n),
                new_session=np.array([True, False] * (n // 2)), interest=np.eye(n, 3),
                interest_at_request=np.eye(n, 3), entropy=np.ones(n), hit_rate=np.full(n, 0.2),
                bytes_spent=np.zeros(n), link_bps=np.full(n, 1e6), max_flops=np.full(n, 1e8),
                max_params=np.full(n, 1e6), model_age_s=np.zeros(n), days=np.zeros(n))
    base.update(over)
    return DeviceView(**base)


@pytest.mark.parametrize("name,expected", [("never", [0, 0, 0, 0]), ("always", [1, 1, 1, 1]),
                                           ("every_session", [1, 0, 1, 0])])
def test_builtin_by_config(name, expected):
    trigger = instantiate(make_cfg(f"trigger={name}").trigger)
    assert isinstance(trigger, Trigger)
    assert trigger.decide(view()).astype(int).tolist() == expected


def test_drift_threshold():
    now = np.array([[1.0, 0, 0], [1.0, 1.0, 0], [0, 1.0, 0], [1.0, 0, 0]])
    then = np.array([[1.0, 0, 0], [1.0, 0, 0], [1.0, 0, 0], [-1.0, 0, 0]])
    trigger = instantiate(make_cfg("trigger=drift", "trigger.threshold=0.25").trigger)
    v = view(interest=now, interest_at_request=then)
    assert trigger.decide(v).tolist() == [False, True, True, True]  # distances 0, 0.29, 1, 2
    v = view(interest=now, interest_at_request=then, events_since_request=np.zeros(4))
    assert not Drift(0.25, min_events=1).decide(v).any()
    with pytest.raises(ValueError, match="threshold"):
        Drift(threshold=3)


def test_trigger_from_outside_the_package(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "plugins"))
    cfg = make_cfg("trigger=never", "trigger._target_=my_triggers.LowHitRate", "+trigger.floor=0.15")
    trigger = instantiate(cfg.trigger)
    assert type(trigger).__module__ == "my_triggers" and "my_triggers" in sys.modules
    assert trigger.decide(view(hit_rate=np.array([0.1, 0.2, 0.0, 0.5]))).tolist() == [True, False, True, False]


def test_periodic_and_uncertainty():
    periodic = instantiate(make_cfg("trigger=periodic", "trigger.period_h=2").trigger)
    assert periodic.decide(view(model_age_s=np.array([0, 7199, 7200, 1e5]))).tolist() == [False, False, True, True]
    unc = instantiate(make_cfg("trigger=uncertainty", "trigger.entropy=4", "trigger.hit_floor=0.1").trigger)
    v = view(entropy=np.array([3.0, 4.5, 3.0, 4.5]), hit_rate=np.array([0.5, 0.5, 0.05, 0.5]),
             events_since_request=np.array([5, 5, 5, 2]))
    assert unc.decide(v).tolist() == [False, True, True, False]  # the last: too soon after a request
    with pytest.raises(Exception, match="period_h"):
        instantiate(make_cfg("trigger=periodic", "trigger.period_h=0").trigger)


def test_random_rate_is_keyed_by_device_not_shard():
    trigger = instantiate(make_cfg("trigger=random", "trigger.p=0.3").trigger)
    trigger.reset(1000, seed=4)
    ids, now = np.arange(1000), np.full(1000, 12345.0)
    full = trigger.decide(view(1000, device=ids, index=ids, now=now))
    assert 0.25 < full.mean() < 0.35
    part = trigger.decide(view(500, device=ids[1::2], index=np.arange(500), now=now[:500]))
    assert (part == full[1::2]).all()  # the same device draws the same, whatever its shard


def test_budgeted_caps_requests_per_day():
    trigger = instantiate(make_cfg("trigger=budgeted", "trigger@trigger.inner=always",
                                   "trigger.requests_per_day=2").trigger)
    trigger.reset(4, seed=0)
    sent = []
    for day in (0.1, 0.2, 0.3, 0.4, 1.1):
        v = view(days=np.full(4, day))
        want = trigger.decide(v)
        trigger.requested(want, v)
        sent.append(int(want[0]))
    assert sent == [1, 1, 0, 0, 1]  # two a day, the allowance renews on day 1
    bytes_cap = instantiate(make_cfg("trigger=budgeted", "trigger@trigger.inner=always",
                                     "trigger.requests_per_day=null", "trigger.bytes_per_day=1000").trigger)
    bytes_cap.reset(4, seed=0)
    spent = np.array([0.0, 500, 1200, 5000])
    assert bytes_cap.decide(view(days=np.zeros(4), bytes_spent=np.zeros(4))).all()  # the day starts here
    assert bytes_cap.decide(view(days=np.zeros(4), bytes_spent=spent)).tolist() == [True, True, False, False]


def test_bandwidth_aware_defers_then_gives_up():
    trigger = instantiate(make_cfg("trigger=bandwidth_aware", "trigger@trigger.inner=always",
                                   "trigger.min_mbps=8", "trigger.max_defer_h=1").trigger)
    trigger.reset(2, seed=0)
    slow, fast = 0.5e6 / 8, 20e6 / 8
    link = np.array([slow, fast])
    assert trigger.decide(view(2, now=np.zeros(2), link_bps=link)).tolist() == [False, True]
    assert trigger.decide(view(2, now=np.full(2, 1800.0), link_bps=link)).tolist() == [False, True]
    assert trigger.decide(view(2, now=np.full(2, 3600.0), link_bps=link)).tolist() == [True, True]


def test_bad_trigger_parameters_are_refused():
    with pytest.raises(Exception, match="requests_per_day"):
        instantiate(make_cfg("trigger=budgeted", "trigger.requests_per_day=-1").trigger)
