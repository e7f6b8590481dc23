"""How well request times follow the ground-truth interest shifts (synthetic data).

A trigger can only notice a shift through the device's events after it, so the horizon is
counted in events: a shift is recalled if its device requests at one of its next `horizon`
events; a request is precise if it falls within `horizon` events after a shift of its device.
Recall counts only shifts followed by at least `horizon` events in the stream.
Inputs: requests.parquet and shifts.parquet of a run (`event`: stream events seen by then).
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def _matched(left: pd.DataFrame, right: pd.DataFrame, tolerance: int, direction: str) -> np.ndarray:
    """For each row of `left`: does the same device have a `right` row whose `key` lies within
    `tolerance` of its own (forward: at or after, backward: at or before)?"""
    if len(left) == 0 or len(right) == 0:
        return np.zeros(len(left), dtype=bool)
    a = left[["device", "key"]].assign(row=np.arange(len(left))).sort_values("key", kind="stable")
    b = right[["device", "key"]].assign(hit=True).sort_values("key", kind="stable")
    m = pd.merge_asof(a, b, on="key", by="device", direction=direction, tolerance=tolerance)
    out = np.zeros(len(left), dtype=bool)
    out[m["row"].to_numpy()] = m["hit"].notna().to_numpy()
    return out


def shift_scores(requests: pd.DataFrame, shifts: pd.DataFrame, horizon: int = 10) -> dict:
    """Recall, precision, and the counts behind them."""
    first = shifts.assign(key=shifts["event"].astype(np.int64) + 1)  # the first event after the shift
    inside = first[first["events_after"] >= 1]  # shifts inside the stream
    scored = inside[inside["events_after"] >= horizon]
    req = requests.assign(key=requests["event"].astype(np.int64))
    recalled = _matched(scored, req, horizon - 1, "forward")
    precise = _matched(req, inside, horizon - 1, "backward")
    return {"shifts": len(inside), "shifts_scored": len(scored), "shifts_recalled": int(recalled.sum()),
            "shift_recall": float(recalled.mean()) if len(scored) else float("nan"),
            "requests": len(req), "requests_after_shift": int(precise.sum()),
            "shift_precision": float(precise.mean()) if len(req) else float("nan"),
            "requests_per_shift": len(req) / len(inside) if len(inside) else float("nan")}


def delays(requests: pd.DataFrame, shifts: pd.DataFrame) -> np.ndarray:
    """For each shift followed by a request of its device: events from the shift to that request
    (1 = at the first event after it)."""
    if len(requests) == 0 or len(shifts) == 0:
        return np.zeros(0)
    a = shifts[["device"]].assign(key=shifts["event"].astype(np.int64) + 1).sort_values("key", kind="stable")
    b = requests[["device"]].assign(key=requests["event"].astype(np.int64), req=requests["event"].astype(np.int64))
    m = pd.merge_asof(a, b.sort_values("key", kind="stable"), on="key", by="device", direction="forward")
    d = (m["req"] - m["key"] + 1).dropna().to_numpy()
    return d
