"""Threshold, k-core, remapping, ordering and the processed-data cache."""

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_sim.data import cache, load_dataset
from fl_sim.data.preprocess import kcore_mask, threshold, to_interactions
from fl_sim.errors import DataError
from helpers import make_cfg


def kcore_reference(pairs: list[tuple[int, int]], ku: int, ki: int) -> set[int]:
    """Row indices of the k-core, by plain repeated deletion."""
    alive = set(range(len(pairs)))
    while True:
        users = pd.Series([pairs[r][0] for r in alive]).value_counts()
        items = pd.Series([pairs[r][1] for r in alive]).value_counts()
        drop = {r for r in alive if users.get(pairs[r][0], 0) < ku or items.get(pairs[r][1], 0) < ki}
        if not drop:
            return alive
        alive -= drop


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 8), st.integers(0, 8)), min_size=1, max_size=60),
       st.integers(0, 4), st.integers(0, 4))
def test_kcore_matches_reference(pairs, ku, ki):
    user = np.array([p[0] for p in pairs])
    item = np.array([p[1] for p in pairs])
    mask = kcore_mask(user, item, ku, ki)
    assert set(np.flatnonzero(mask).tolist()) == kcore_reference(pairs, ku, ki)


def test_ties_keep_file_order_and_ids_are_dense():
    frame = pd.DataFrame({"user": [30, 10, 30, 30, 10], "item": [7, 5, 9, 8, 7], "ts": [2, 1, 1, 1, 1]})
    inter = to_interactions(frame)
    assert inter.user_ids.tolist() == [10, 30]
    assert inter.item_ids.tolist() == [5, 7, 8, 9]
    # user 30: ts 1 (item 9, then item 8 in file order), then ts 2 (item 7)
    assert inter.item_ids[inter.sequence(1)].tolist() == [9, 8, 7]
    assert inter.item_ids[inter.sequence(0)].tolist() == [5, 7]


def test_order_only_positions():
    frame = pd.DataFrame({"user": [2, 2, 1, 2], "item": [1, 2, 3, 4]})
    inter = to_interactions(frame)
    assert not inter.has_timestamps
    assert inter.ts.tolist() == [0, 0, 1, 2]
    assert inter.item_ids[inter.sequence(1)].tolist() == [1, 2, 4]


def test_threshold_and_empty_results():
    frame = pd.DataFrame({"user": [1, 1, 2], "item": [1, 2, 1], "rating": [5.0, 2.0, 4.0]})
    assert threshold(frame, 4).item.tolist() == [1, 1]
    assert len(threshold(frame, None)) == 3
    with pytest.raises(DataError, match="min_rating=6"):
        threshold(frame, 6)
    with pytest.raises(DataError, match="k-core.*min_user_interactions=3"):
        to_interactions(frame, 3, 1)
    with pytest.raises(DataError, match="no ratings"):
        threshold(frame.drop(columns="rating"), 4)


def test_filters_on_real_data(shared_data, cache_dir):
    cfg = make_cfg("dataset=ml100k", f"dataset.path={shared_data / 'ml-100k'}", "dataset.min_rating=4",
                   "dataset.min_user_interactions=10", "dataset.min_item_interactions=10")
    inter, info = load_dataset(cfg.dataset, num_clients=10**6, seed=0, cache_dir=cache_dir)
    assert info["raw"]["interactions"] == 100_000
    assert len(inter) < 55_375  # ratings >= 4 in ML-100K
    assert inter.lengths().min() >= 10
    assert np.bincount(inter.item).min() >= 10


def test_cache_hit_miss_and_corruption(shared_data, cache_dir, tmp_path):
    path = tmp_path / "u.data"
    path.write_bytes((shared_data / "ml-100k/u.data").read_bytes())
    cfg = make_cfg("dataset=ml100k", f"dataset.path={path}")
    first, info = load_dataset(cfg.dataset, 10**6, 0, cache_dir)
    assert info["cache"] == "miss"
    again, info = load_dataset(cfg.dataset, 10**6, 0, cache_dir)
    assert info["cache"] == "hit"
    for field in ("user", "item", "ts", "user_ids", "item_ids"):
        np.testing.assert_array_equal(getattr(first, field), getattr(again, field))
    # Other options or other content: a different entry.
    cfg2 = make_cfg("dataset=ml100k", f"dataset.path={path}", "dataset.min_user_interactions=50")
    assert load_dataset(cfg2.dataset, 10**6, 0, cache_dir)[1]["cache"] == "miss"
    path.write_text(path.read_text().replace("\t5\t", "\t1\t", 1))
    assert load_dataset(cfg.dataset, 10**6, 0, cache_dir)[1]["cache"] == "miss"
    # A damaged entry is recomputed, not trusted.
    for entry in (cache_dir / "processed").glob("*.npz"):
        entry.write_bytes(b"garbage")
    inter, info = load_dataset(cfg.dataset, 10**6, 0, cache_dir)
    assert info["cache"] == "miss" and len(inter) == len(first)
    assert cache.load(cache_dir, "no-such-key") is None
