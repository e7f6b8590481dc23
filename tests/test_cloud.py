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
