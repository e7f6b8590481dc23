"""What crosses between a device shard and the cloud each round, as plain named numpy arrays.

Cloud -> shard ("window" + "deliveries"): the round's window of simulated time and the
sub-models answering the shard's earlier requests:
  device [m] global ids, answer_time [m] s, blocks [m, L] bool, payload_bytes [m],
  bootstrap [m] (the first model, installed before deployment starts), checksum [m] (CRC-32
  of each sub-model, fl_sim.faults.checksum),
  and per block k: rows_k [m_k] (indices into the m deliveries), flat_k [m_k, P_k] weights;
  refused [k]: devices whose request was refused or could not be served (they may ask again).
Shard -> cloud ("requests" + "metrics"): only (beta, h) and the budget, never item ids:
  device [r], time [r] (when the device asked), ready_time [r] (time + upload), beta [r, L, 2], h [r, H],
  max_flops [r], max_params [r], bootstrap [r].
The Flower apps wrap these dicts in ArrayRecords; the in-process backend passes them as is.
"""

from __future__ import annotations

import numpy as np


def empty_deliveries(n_blocks: int) -> dict[str, np.ndarray]:
    return {"device": np.zeros(0, dtype=np.int64), "answer_time": np.zeros(0), "blocks": np.zeros((0, n_blocks), bool),
            "payload_bytes": np.zeros(0, dtype=np.int64), "bootstrap": np.zeros(0, bool),
            "checksum": np.zeros(0, dtype=np.int64), "refused": np.zeros(0, dtype=np.int64)}


def empty_requests(n_blocks: int, h_dim: int) -> dict[str, np.ndarray]:
    return {"device": np.zeros(0, dtype=np.int64), "time": np.zeros(0), "ready_time": np.zeros(0),
            "beta": np.zeros((0, n_blocks, 2), np.float32), "h": np.zeros((0, h_dim), np.float32),
            "max_flops": np.zeros(0), "max_params": np.zeros(0), "bootstrap": np.zeros(0, bool)}


def select(deliveries: dict[str, np.ndarray], mask: np.ndarray, n_blocks: int) -> dict[str, np.ndarray]:
    """The deliveries where mask is True (e.g. one shard's devices), re-indexing block rows."""
    keep = np.flatnonzero(mask)
    new_index = np.full(len(mask), -1)
    new_index[keep] = np.arange(len(keep))
    out = {k: deliveries[k][keep] for k in ("device", "answer_time", "blocks", "payload_bytes", "bootstrap",
                                             "checksum")}
    for k in range(n_blocks):
        if f"rows_{k}" in deliveries:
            rows = deliveries[f"rows_{k}"]
            sel = mask[rows]
            out[f"rows_{k}"] = new_index[rows[sel]]
            out[f"flat_{k}"] = deliveries[f"flat_{k}"][sel]
    return out


def merge(a: dict[str, np.ndarray], b: dict[str, np.ndarray], n_blocks: int) -> dict[str, np.ndarray]:
    """Two sets of deliveries as one (b's block rows shifted past a's deliveries)."""
    out = {k: np.concatenate([a[k], b[k]]) for k in ("device", "answer_time", "blocks", "payload_bytes",
                                                     "bootstrap", "checksum", "refused")}
    m = len(a["device"])
    for k in range(n_blocks):
        if f"rows_{k}" in a or f"rows_{k}" in b:
            rows = [x[f"rows_{k}"] + shift for x, shift in ((a, 0), (b, m)) if f"rows_{k}" in x]
            flats = [x[f"flat_{k}"] for x in (a, b) if f"flat_{k}" in x]
            out[f"rows_{k}"], out[f"flat_{k}"] = np.concatenate(rows), np.concatenate(flats)
    return out


def take(requests: dict[str, np.ndarray], rows) -> dict[str, np.ndarray]:
    return {k: v[rows] for k, v in requests.items()}


def concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Requests from several shards as one batch (same keys in each part)."""
    keys = parts[0].keys()
    return {k: np.concatenate([p[k] for p in parts]) for k in keys}


def to_record(arrays: dict[str, np.ndarray]):
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_record(record) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}
