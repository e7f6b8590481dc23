"""The cloud's checks: malformed requests are refused with a reason, the rest served."""

import numpy as np

from strategies.validate import check_part, check_rows


def requests(n=4, L=3, H=2, W=0):
    return {"device": np.arange(n, dtype=np.int64), "time": np.zeros(n), "ready_time": np.zeros(n),
            "beta": np.zeros((n, L, 2), np.float32), "h": np.zeros((n, H), np.float32),
            "user": np.zeros((n, 4), np.float32), "max_flops": np.full(n, 1e9), "max_params": np.full(n, 1e6),
            "first": np.zeros(n, bool), "holds": np.zeros((n, L), bool), "items": np.zeros((n, W), np.int64)}


def test_whole_part_shapes():
    assert check_part(requests(), n_blocks=3, h_dim=2, d=4) is None
    assert check_part(requests(), n_blocks=4, h_dim=2, d=4) == "shape"  # beta for another model
    assert check_part(requests(), n_blocks=3, h_dim=5, d=4) == "shape"
    assert check_part(requests(), n_blocks=3, h_dim=2, d=8) == "shape"  # a user vector of another size
    bad = requests()
    del bad["max_params"]
    assert check_part(bad, 3, 2, 4) == "shape"
    bad = requests()
    bad["time"] = np.zeros(3)
    assert check_part(bad, 3, 2, 4) == "shape"


def test_rows_refused_by_reason():
    req = requests(6)
    req["device"] = np.array([0, 1, 1, 99, 4, 5])
    req["beta"][4, 0, 0] = np.nan
    req["max_flops"][5] = -1.0
    reason = check_rows(req, n_devices=10)
    assert reason.tolist() == ["", "", "duplicate", "unknown_device", "not_finite", "negative_budget"]
    req["max_params"][0] = np.inf  # no cap is a valid budget
    assert check_rows(req, n_devices=10)[0] == ""


def test_revealed_items_checked():
    assert check_part(requests(W=5), 3, 2, 4, window=5) is None
    assert check_part(requests(W=5), 3, 2, 4) == "shape"  # items where the method reveals none
    assert check_part(requests(), 3, 2, 4, window=5) == "shape"
    req = requests(3, W=2)
    req["items"][:] = [[0, 7], [3, 11], [-1, 2]]  # model ids 1..10; 0 pads
    assert check_rows(req, n_devices=10, n_items=10).tolist() == ["", "unknown_item", "unknown_item"]


def test_empty_and_h_free_batches():
    assert check_rows(requests(0), n_devices=10).tolist() == []
    assert check_rows(requests(3, H=0), n_devices=10).tolist() == ["", "", ""]  # methods without h


def test_capacity_is_a_rate_with_a_queue():
    """One server at 1 request/s, 2 may wait: recomputed by hand."""
    from strategies.cloud import Capacity

    cap = Capacity(rate=1.0, limit=2)
    ready = np.array([0.0, 0.2, 0.4, 0.6, 5.0])
    first = np.zeros(5, bool)
    start, refused = cap.schedule(ready, first, np.arange(5))
    # 0 served at once; 1 and 2 wait (start 1, 2); 3 finds two waiting: refused; 4 comes after the queue drained
    assert refused.tolist() == [False, False, False, True, False]
    assert start[[0, 1, 2, 4]].tolist() == [0.0, 1.0, 2.0, 5.0]
    assert cap.queued == 2 and cap.max_queue == 2
    start, refused = cap.schedule(np.array([5.5, 5.5]), np.array([True, False]), np.array([7, 8]))
    assert start.tolist() == [5.5, 6.0] and not refused.any()  # a first model is outside capacity
    unlimited = Capacity(rate=None, limit=0)
    start, refused = unlimited.schedule(ready, first, np.arange(5))
    assert start.tolist() == ready.tolist() and not refused.any()
