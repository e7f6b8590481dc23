"""Triggers: built-in decisions and plug-in by config, including from outside the package."""

import sys

import numpy as np
import pytest
from hydra.utils import instantiate

from clients.triggers import DeviceView, Drift, Trigger
from helpers import ROOT, make_cfg


def view(n=4, **over):
    base = dict(now=np.zeros(n), events_since_request=np.full(n, 5), sessions_since_request=np.ones(n),
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
