"""The cloud's checks: malformed requests are refused with a reason, the rest served."""

import numpy as np

from strategies.validate import check_part, check_rows


def requests(n=4, L=3, H=2):
    return {"device": np.arange(n, dtype=np.int64), "time": np.zeros(n), "ready_time": np.zeros(n),
            "beta": np.zeros((n, L, 2), np.float32), "h": np.zeros((n, H), np.float32),
            "max_flops": np.full(n, 1e9), "max_params": np.full(n, 1e6), "bootstrap": np.zeros(n, bool)}


def test_whole_part_shapes():
    assert check_part(requests(), n_blocks=3, h_dim=2) is None
    assert check_part(requests(), n_blocks=4, h_dim=2) == "shape"  # beta for another model
    assert check_part(requests(), n_blocks=3, h_dim=5) == "shape"
    bad = requests()
    del bad["max_params"]
    assert check_part(bad, 3, 2) == "shape"
    bad = requests()
    bad["time"] = np.zeros(3)
    assert check_part(bad, 3, 2) == "shape"


def test_rows_refused_by_reason():
    req = requests(6)
    req["device"] = np.array([0, 1, 1, 99, 4, 5])
    req["beta"][4, 0, 0] = np.nan
    req["max_flops"][5] = -1.0
    reason = check_rows(req, n_devices=10)
    assert reason.tolist() == ["", "", "duplicate", "unknown_device", "not_finite", "negative_budget"]
    req["max_params"][0] = np.inf  # no cap is a valid budget
    assert check_rows(req, n_devices=10)[0] == ""


def test_empty_and_h_free_batches():
    assert check_rows(requests(0), n_devices=10).tolist() == []
    assert check_rows(requests(3, H=0), n_devices=10).tolist() == ["", "", ""]  # methods without h


def test_capacity_serves_the_oldest_first_queues_the_next_and_refuses_the_rest():
    from strategies.cloud import Capacity

    cap = Capacity(capacity=2, queue_limit=2, n_blocks=3, h_dim=2)
    req = requests(5)
    req["ready_time"] = np.array([5.0, 1.0, 4.0, 2.0, 3.0])
    served, refused = cap.take(req)
    assert served["device"].tolist() == [1, 3]  # the first ready
    assert cap.queue["device"].tolist() == [4, 2] and refused.tolist() == [0]
    assert cap.queued == 2 and cap.max_queue == 2
    later = requests(2)
    later["device"] = np.array([7, 8])
    later["bootstrap"] = np.array([True, False])  # a first model: outside capacity
    served, refused = cap.take(later)
    assert served["device"].tolist() == [7, 4, 2]  # the queue before the round's own
    assert cap.queue["device"].tolist() == [8] and refused.tolist() == [] and cap.queued == 3
    unlimited = Capacity(capacity=None, queue_limit=0, n_blocks=3, h_dim=2)
    served, refused = unlimited.take(req)
    assert served is req and len(refused) == 0
