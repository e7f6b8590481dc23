"""The cloud's checks on incoming requests: a malformed request is refused with a named reason
and counted; the rest of the batch is served.

Reasons: `shape` (a shard's batch with missing keys or wrong array shapes), `unknown_device`,
`duplicate` (a device asking twice in one batch: the first is served), `not_finite` (NaN or
infinite beta, h or budget), `negative_budget`, `unknown_item` (a revealed item id outside the
catalogue). A budget below even the block-free model is
not malformed: the cloud counts it as `unservable` when it assembles.
"""

from __future__ import annotations

import numpy as np

REQUEST_KEYS = ("device", "time", "ready_time", "beta", "h", "user", "max_flops", "max_params", "first", "holds",
                "items")


def check_part(part: dict, n_blocks: int, h_dim: int, d: int, window: int = 0) -> str | None:
    """A whole shard's requests (as arrays, fl_sim.protocol.Requests.arrays): None if well
    formed, else the reason."""
    if not all(k in part for k in REQUEST_KEYS):
        return "shape"
    n = len(part["device"])
    vectors = ("device", "time", "ready_time", "max_flops", "max_params", "first")
    if any(np.ndim(part[k]) != 1 or len(part[k]) != n for k in vectors):
        return "shape"
    if (np.shape(part["beta"]) != (n, n_blocks, 2) or np.shape(part["h"]) != (n, h_dim)
            or np.shape(part["user"]) != (n, d) or np.shape(part["holds"]) != (n, n_blocks)
            or np.shape(part["items"]) != (n, window)):
        return "shape"
    return None


def check_rows(req: dict, n_devices: int, n_items: int | None = None) -> np.ndarray:
    """Per request: '' if it may be served, else the reason it is refused."""
    n = len(req["device"])
    reason = np.full(n, "", dtype=object)

    def mark(mask: np.ndarray, why: str) -> None:
        reason[mask & (reason == "")] = why

    dev = req["device"]
    mark((dev < 0) | (dev >= n_devices), "unknown_device")
    finite = (np.isfinite(req["beta"]).all(axis=(1, 2)) & np.isfinite(req["h"]).all(axis=1)
              & np.isfinite(req["user"]).all(axis=1)
              & ~np.isnan(req["max_flops"]) & ~np.isnan(req["max_params"]) & np.isfinite(req["ready_time"]))
    mark(~finite, "not_finite")
    mark((req["max_flops"] < 0) | (req["max_params"] < 0), "negative_budget")
    if n_items is not None and req["items"].shape[1]:
        mark(((req["items"] < 0) | (req["items"] > n_items)).any(axis=1), "unknown_item")
    seen = np.zeros(n, dtype=bool)
    _, first = np.unique(dev, return_index=True)
    seen[first] = True
    mark(~seen, "duplicate")
    return reason
