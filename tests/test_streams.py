"""Device timelines: history/stream cut, sessions, synthesised timestamps, leave-last-out."""

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from fl_sim.data import build_streams, leave_last_out, load_dataset, select_devices
from fl_sim.data.preprocess import to_interactions
from fl_sim.errors import ConfigError
from helpers import make_cfg


@pytest.fixture(scope="module")
def ml100k(shared_data, tmp_path_factory):
    cfg = make_cfg("dataset=ml100k", f"dataset.path={shared_data / 'ml-100k'}")
    return load_dataset(cfg.dataset, 10**6, 0, tmp_path_factory.mktemp("cache"))[0], cfg


def test_time_cut(ml100k):
    inter, cfg = ml100k
    streams = build_streams(inter, cfg.streams, seed=0)
    assert streams.cut == "time"
    stream = streams.stream_mask
    assert np.all(inter.ts[~stream] < streams.t0) and np.all(inter.ts[stream] >= streams.t0)
    summary = streams.summary()
    assert summary["history_events"] + summary["stream_events"] == len(inter)
    assert abs(summary["stream_events"] / len(inter) - 0.2) < 0.01


def test_sessions_split_on_gaps(ml100k):
    inter, cfg = ml100k
    streams = build_streams(inter, cfg.streams, seed=0)
    new = np.diff(streams.session) > 0
    same_user = np.diff(inter.user) == 0
    gaps = np.diff(inter.ts)
    assert np.all(new[same_user] == (gaps[same_user] > 1800))
    assert np.all(new[~same_user])


def test_order_only_data_gets_a_clock():
    frame = pd.DataFrame({"user": np.repeat([1, 2, 3], [50, 7, 1]), "item": np.arange(58) % 9})
    inter = to_interactions(frame)
    scfg = make_cfg().streams
    streams = build_streams(inter, scfg, seed=3)
    ts, user = streams.inter.ts, inter.user
    assert streams.synthesized_ts and streams.cut == "fraction"
    assert np.all(np.diff(ts)[np.diff(user) == 0] > 0)
    assert streams.split.tolist() == [40, 55, 57]  # floor(0.8 * n) events of history each
    sizes = np.bincount(streams.session)
    assert sizes.tolist() == [20, 20, 10, 7, 1]
    again = build_streams(inter, scfg, seed=3)
    np.testing.assert_array_equal(ts, again.inter.ts)


def test_bad_stream_settings():
    inter = to_interactions(pd.DataFrame({"user": [1, 1], "item": [1, 2], "ts": [1, 2]}))
    scfg = OmegaConf.merge(make_cfg().streams, {"time_quantile": 1.5})
    with pytest.raises(ConfigError, match="streams.time_quantile"):
        build_streams(inter, scfg, 0)
    with pytest.raises(ConfigError, match="streams.cut"):
        build_streams(inter, OmegaConf.merge(scfg, {"cut": "sometimes"}), 0)


def test_leave_last_out(ml100k):
    inter, _ = ml100k
    split = leave_last_out(inter)
    assert len(split.users) == inter.n_users  # every ML-100K user has >= 20 ratings
    u = 5
    seq_end = inter.indptr[u + 1]
    assert split.test[u] == seq_end - 1 and split.valid[u] == seq_end - 2 and split.train_end[u] == seq_end - 2
    short = to_interactions(pd.DataFrame({"user": [1, 1, 2, 2, 2], "item": [1, 2, 1, 2, 3]}))
    assert leave_last_out(short).users.tolist() == [1]


def test_select_devices(ml100k):
    inter, _ = ml100k
    sub = select_devices(inter, 100, seed=1)
    assert sub.n_users == 100 and sub.n_items == inter.n_items
    assert set(sub.user_ids) <= set(inter.user_ids)
    raw = sub.user_ids[7]
    original = np.flatnonzero(inter.user_ids == raw)[0]
    np.testing.assert_array_equal(sub.sequence(7), inter.sequence(original))
    np.testing.assert_array_equal(select_devices(inter, 100, seed=1).user_ids, sub.user_ids)
    assert select_devices(inter, 10**6, seed=1) is inter
