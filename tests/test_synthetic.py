"""The synthetic fleet: deterministic, heterogeneous, sequential, with recorded interest shifts."""

import numpy as np
import pytest

from fl_sim.data import load_dataset
from fl_sim.errors import ConfigError
from helpers import make_cfg


def synth(n=400, seed=0, *overrides, cache_dir="/nonexistent"):
    cfg = make_cfg("dataset=synthetic", *overrides)
    return load_dataset(cfg.dataset, num_clients=n, seed=seed, cache_dir=cache_dir)[0]


@pytest.fixture(scope="module")
def fleet():
    return synth(600, 0, "dataset.shifts_per_week=1.0")


def test_deterministic_by_seed(fleet):
    again = synth(600, 0, "dataset.shifts_per_week=1.0")
    np.testing.assert_array_equal(fleet.item, again.item)
    np.testing.assert_array_equal(fleet.ts, again.ts)
    assert fleet.shifts.equals(again.shifts)
    other = synth(600, 1, "dataset.shifts_per_week=1.0")
    assert len(other) != len(fleet) or not np.array_equal(other.item, fleet.item)


def test_every_device_exists_with_a_clock(fleet):
    assert fleet.n_users == 600 and fleet.has_timestamps
    assert fleet.lengths().min() >= 2
    same = np.diff(fleet.user) == 0
    assert np.all(np.diff(fleet.ts)[same] >= 0)
    assert fleet.ts.max() <= 28 * 86_400 + 86_400


def test_heterogeneous_interests(fleet):
    topic = fleet.item_topic[fleet.item]
    distinct = np.array([len(np.unique(topic[fleet.indptr[u]:fleet.indptr[u + 1]])) for u in range(fleet.n_users)])
    assert (distinct <= 2).any() and (distinct >= 4).any()
    activity = fleet.lengths()
    assert np.percentile(activity, 90) > 2 * np.percentile(activity, 10)


def test_sequential_signal(fleet):
    # How often does the next item repeat a transition seen elsewhere? Far above chance.
    a, b = fleet.item[:-1], fleet.item[1:]
    same = np.diff(fleet.user) == 0
    pairs = a[same].astype(np.int64) * fleet.n_items + b[same]
    _, counts = np.unique(pairs, return_counts=True)
    repeated_share = counts[counts > 1].sum() / counts.sum()
    assert repeated_share > 0.3


def test_shifts_are_recorded_and_visible(fleet):
    shifts = fleet.shifts
    assert len(shifts) > 0.5 * fleet.n_users * 4 * 0.8  # ~1 per week over 4 weeks
    assert (shifts.old_topic != shifts.new_topic).all()
    topic = fleet.item_topic[fleet.item]
    before, after = [], []
    for dev, when, new in shifts[["device", "time", "new_topic"]].itertuples(index=False):
        lo, hi = fleet.indptr[dev], fleet.indptr[dev + 1]
        t, tp = fleet.ts[lo:hi], topic[lo:hi]
        pre = tp[(t < when) & (t >= when - 7 * 86_400)]
        post = tp[(t >= when) & (t < when + 3 * 86_400)]
        if len(pre) >= 5 and len(post) >= 5:
            before.append((pre == new).mean())
            after.append((post == new).mean())
    assert len(after) > 100
    assert np.mean(after) > np.mean(before) + 0.3


def test_bad_parameters_named():
    with pytest.raises(ConfigError, match="dataset.n_topics"):
        synth(10, 0, "dataset.n_topics=1")
    with pytest.raises(ConfigError, match="num_clients"):
        synth(0, 0)
