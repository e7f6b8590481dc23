"""Loaders read the owners' formats, plain or gzip, and name the file and line of bad input."""

import gzip

import numpy as np
import pandas as pd
import pytest

from fl_sim.data import formats, load_dataset
from fl_sim.errors import DataError
from helpers import make_cfg

REAL = [  # dataset, path under shared/data, raw users, items, interactions, timestamps
    ("ml100k", "ml-100k", 943, 1682, 100_000, True),
    ("ml1m", "ml-1m/ratings.dat.gz", 2999, 3615, 487_650, True),
    ("ml1m_sas", "ml-1m/ml-1m-sas.txt.gz", 6040, 3416, 996_832, False),
    ("beauty", "beauty/Beauty.txt", 22_363, 12_101, 198_502, False),
]


@pytest.mark.parametrize("name,rel,users,items,rows,has_ts", REAL)
def test_real_files_raw_counts(shared_data, cache_dir, name, rel, users, items, rows, has_ts):
    cfg = make_cfg(f"dataset={name}", f"dataset.path={shared_data / rel}")
    inter, info = load_dataset(cfg.dataset, num_clients=10**9, seed=0, cache_dir=cache_dir)
    assert info["raw"] == {"users": users, "items": items, "interactions": rows}
    assert inter.has_timestamps is has_ts
    assert inter.n_users <= users and inter.n_items <= items
    # Dense ids, grouped by user, chronological within each user.
    assert inter.user.min() == 0 and inter.user.max() == inter.n_users - 1
    assert np.all(np.diff(inter.user) >= 0)
    same_user = np.diff(inter.user) == 0
    assert np.all(np.diff(inter.ts)[same_user] >= 0)


def test_sasrec_order_is_file_order(shared_data):
    frame = formats.read_sasrec_txt(shared_data / "ml-1m/ml-1m-sas.txt.gz")
    first = frame[frame.user == 1].item.to_numpy()[:5]
    assert first.tolist() == [1, 2, 3, 4, 5]


GOOD = {
    "u_data": "{u}\t{i}\t4\t88125094{k}\n",
    "movielens_dat": "{u}::{i}::4::97830076{k}\n",
    "sasrec_txt": "{u} {i}\n",
    "s3rec_txt": "{u} {i} {k}\n",
}
BAD = {
    "u_data": ["1\t2\tx\t4\n", "1\t2\t3\n", "1\t2\t3\t4\t5\n"],
    "movielens_dat": ["1::2::3\n", "1::x::3::4\n", "1::2::3::4::5\n", "1:2:3:4:5:6:7\n"],
    "sasrec_txt": ["1 2 3\n", "1 abc\n", "7\n"],
    "s3rec_txt": ["5\n", "5 1 two 3\n"],
}


def _write(path, lines, gz=False):
    data = "".join(lines)
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(data)
    else:
        path.write_text(data)
    return path


@pytest.mark.parametrize("fmt,bad", [(f, b) for f, bads in BAD.items() for b in bads])
@pytest.mark.parametrize("gz", [False, True])
def test_malformed_line_is_named(tmp_path, fmt, bad, gz):
    good = [GOOD[fmt].format(u=1 + k % 2, i=10 + k, k=k) for k in range(6)]
    path = _write(tmp_path / "f.txt", good + [bad] + good, gz)
    with pytest.raises(DataError, match=r"line 7\b") as err:
        formats.READERS[fmt](path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("fmt", list(GOOD))
def test_gzip_and_plain_read_the_same(tmp_path, fmt):
    lines = [GOOD[fmt].format(u=1 + k % 3, i=10 + k, k=k) for k in range(9)] + ["\n"]
    plain = formats.READERS[fmt](_write(tmp_path / "a.txt", lines))
    packed = formats.READERS[fmt](_write(tmp_path / "a.txt.gz", lines, gz=True))
    pd.testing.assert_frame_equal(plain, packed)
    assert len(plain) == (18 if fmt == "s3rec_txt" else 9)


def test_empty_file_is_refused(tmp_path):
    with pytest.raises(DataError, match="no interactions"):
        formats.read_u_data(_write(tmp_path / "u.data", ["\n"]))


COLUMNS = {"user": "user_id", "item": "item_id", "ts": "timestamp", "rating": None}


def test_csv_table(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,timestamp\nalice,i1,3\nalice,i2,1\n\nbob,i1,2\n")
    frame = formats.read_table(path, COLUMNS)
    assert frame.user.tolist() == ["alice", "alice", "bob"]
    assert frame.ts.tolist() == [3, 1, 2]


def test_csv_iso_timestamps_and_no_ts(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("user_id;item_id;timestamp\n1;5;2024-01-01T00:00:00Z\n1;6;2024-01-01T00:00:10Z\n")
    frame = formats.read_table(path, COLUMNS)
    assert (frame.ts.diff().dropna() == 10).all()
    assert frame.user.dtype == np.int64
    frame = formats.read_table(path, {**COLUMNS, "ts": None})
    assert "ts" not in frame


def test_csv_bad_value_names_line(tmp_path):
    path = tmp_path / "log.csv"
    rows = [f"{k},{k},{k}" for k in range(5)] + ["6,7,yesterday"]
    path.write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"line 7\b"):
        formats.read_table(path, COLUMNS)


def test_table_missing_column(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("user,item\n1,2\n")
    with pytest.raises(DataError, match="missing column"):
        formats.read_table(path, COLUMNS)


def test_parquet_table(tmp_path, cache_dir):
    path = tmp_path / "log.parquet"
    pd.DataFrame({"user_id": [1, 1, 2], "item_id": [7, 8, 7], "timestamp": [5, 6, 7]}).to_parquet(path)
    cfg = make_cfg("dataset=custom", f"dataset.path={path}")
    inter, info = load_dataset(cfg.dataset, num_clients=10, seed=0, cache_dir=cache_dir)
    assert info["raw"] == {"users": 2, "items": 2, "interactions": 3}
    assert inter.sequence(0).tolist() == [0, 1]


def test_custom_with_owner_format(shared_data, cache_dir):
    cfg = make_cfg("dataset=custom", "dataset.format=u_data", f"dataset.path={shared_data / 'ml-100k/u.data'}")
    _, info = load_dataset(cfg.dataset, num_clients=10, seed=0, cache_dir=cache_dir)
    assert info["raw"]["interactions"] == 100_000
