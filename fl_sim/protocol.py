"""What crosses between a shard of devices and the cloud: one typed message each way.

Device -> cloud, `Requests` (built only by clients/outbox.py): what a device may reveal: the
structure beta and interest h of the adaptive methods, a user vector from its on-device model
for retrieval, its budget now, and which blocks' shared weights it already holds (so that a
delta payload need not send them again). Item ids only for a method that must reveal them
(DIET: the cloud builds its masks from the device's recent items), counted as revealed.

Cloud -> device, `Deliveries` (built only by strategies/cloud.py): per answered request the
sub-model (kept blocks and, for generated weights, the terms the mapper generated for them,
fp32) and the top-N candidate items; plus the devices whose request was refused or could not
be served (they may ask again). Block k's terms are a matrix holding one row per delivery that
keeps block k, in delivery order, so no row index travels with them. The device adds them to
the block's shared weights; `model_bytes` counts what the payload mode ships (`sim.payload`:
`full`, every kept block's whole weights as the paper ships them; `delta`, the terms, plus a
block's shared weights the first time the device keeps it).

The Flower apps carry both as ArrayRecords (`to_record` / `from_record`); the in-process
backend passes the objects as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

import numpy as np


ID_BYTES = 4  # an item id on the wire


def _take(arrays, keep):
    return {f.name: getattr(arrays, f.name)[keep] for f in fields(arrays) if f.metadata.get("row", True)}


@dataclass
class Requests:
    device: np.ndarray  # [r] global ids
    time: np.ndarray  # [r] s, when the device asked
    ready_time: np.ndarray  # [r] s, when the request reached the cloud (time + upload)
    beta: np.ndarray  # [r, L, 2] float32 structure (fixed structures: their gate as log-probabilities)
    h: np.ndarray  # [r, H] float32 interest (H = 0 without a mapper)
    user: np.ndarray  # [r, d] float32 user vector for retrieval
    max_flops: np.ndarray  # [r] budget: FLOPs per inference
    max_params: np.ndarray  # [r] budget: on-device parameters
    first: np.ndarray  # [r] bool: the device's first model (deployment)
    holds: np.ndarray  # [r, L] bool: blocks whose shared weights the device holds
    items: np.ndarray  # [r, W] int64 recent items (model ids, left-padded with 0); W = 0 unless revealed

    @classmethod
    def empty(cls, n_blocks: int, h_dim: int, d: int, window: int = 0) -> "Requests":
        return cls(device=np.zeros(0, np.int64), time=np.zeros(0), ready_time=np.zeros(0),
                   beta=np.zeros((0, n_blocks, 2), np.float32), h=np.zeros((0, h_dim), np.float32),
                   user=np.zeros((0, d), np.float32), max_flops=np.zeros(0), max_params=np.zeros(0),
                   first=np.zeros(0, bool), holds=np.zeros((0, n_blocks), bool), items=np.zeros((0, window), np.int64))

    def __len__(self) -> int:
        return len(self.device)

    def take(self, keep) -> "Requests":
        return Requests(**_take(self, keep))

    @classmethod
    def concat(cls, parts: list["Requests"]) -> "Requests":
        return cls(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)})

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class Deliveries:
    device: np.ndarray  # [m] global ids
    request_time: np.ndarray  # [m] s, when the device asked
    answer_time: np.ndarray  # [m] s, when the cloud's answer leaves (ready + queue + its own time)
    blocks: np.ndarray  # [m, L] bool: the sub-model's blocks
    cut: np.ndarray  # [m] bool: the budget removed blocks the structure selected
    model_bytes: np.ndarray  # [m] bytes of the sub-model's weights (0: the device's model does not change)
    candidate_bytes: np.ndarray  # [m] bytes of the candidates (ids and embeddings)
    candidates: np.ndarray  # [m, N] int64 item ids (dataset ids), best first; [m, 0]: the whole catalogue
    checksum: np.ndarray  # [m] CRC-32 of the sub-model (fl_sim.faults.checksum)
    first: np.ndarray  # [m] bool: the first model, installed before deployment starts
    weights: list = field(metadata={"row": False})  # per block: [m_k, T_k] float32 generated terms (DIET:
    # uint8, its masks packed 8 weights a byte), or None
    # (the shared weights: no mapper)
    refused: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), metadata={"row": False})

    @classmethod
    def empty(cls, n_blocks: int, n_candidates: int = 0) -> "Deliveries":
        return cls(device=np.zeros(0, np.int64), request_time=np.zeros(0), answer_time=np.zeros(0),
                   blocks=np.zeros((0, n_blocks), bool), cut=np.zeros(0, bool), model_bytes=np.zeros(0, np.int64),
                   candidate_bytes=np.zeros(0, np.int64), candidates=np.zeros((0, n_candidates), np.int64),
                   checksum=np.zeros(0, np.int64), first=np.zeros(0, bool), weights=[None] * n_blocks)

    def __len__(self) -> int:
        return len(self.device)

    @property
    def n_blocks(self) -> int:
        return self.blocks.shape[1]

    def take(self, mask: np.ndarray, refused: Optional[np.ndarray] = None) -> "Deliveries":
        """The deliveries where mask holds (e.g. one shard's devices)."""
        weights = [None if w is None else w[mask[self.blocks[:, k]]] for k, w in enumerate(self.weights)]
        return Deliveries(**_take(self, mask), weights=weights,
                          refused=np.zeros(0, np.int64) if refused is None else refused)

    def weight_rows(self) -> list[list[np.ndarray]]:
        """Each delivery's weight vectors, in block order (empty for shared weights)."""
        rows: list[list[np.ndarray]] = [[] for _ in range(len(self))]
        for k, w in enumerate(self.weights):
            if w is not None:
                for r, i in enumerate(np.flatnonzero(self.blocks[:, k])):
                    rows[i].append(w[r])
        return rows

    @classmethod
    def concat(cls, parts: list["Deliveries"]) -> "Deliveries":
        L = parts[0].n_blocks
        weights = []
        for k in range(L):
            ws = [p.weights[k] for p in parts if p.weights[k] is not None]
            weights.append(np.concatenate(ws) if ws else None)
        arrays = {f.name: np.concatenate([getattr(p, f.name) for p in parts])
                  for f in fields(cls) if f.metadata.get("row", True)}
        return cls(**arrays, weights=weights, refused=np.concatenate([p.refused for p in parts]))

    def route(self, n_shards: int) -> list["Deliveries"]:
        """Split by owning shard (device d lives on shard d % n_shards)."""
        owner = self.device % n_shards
        return [self.take(owner == s, self.refused[self.refused % n_shards == s]) for s in range(n_shards)]

    def arrays(self) -> dict[str, np.ndarray]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "weights"}
        out.update({f"weights_{k}": w for k, w in enumerate(self.weights) if w is not None})
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "Deliveries":
        L = arrays["blocks"].shape[1]
        weights = [arrays.get(f"weights_{k}") for k in range(L)]
        return cls(**{f.name: arrays[f.name] for f in fields(cls) if f.name != "weights"}, weights=weights)


def candidate_count(cfg, n_items: int) -> int:
    """Items shipped per answer (0: the device holds the whole catalogue)."""
    return 0 if cfg.sim.candidates == "full" else min(int(cfg.sim.candidates), n_items)


def to_record(arrays: dict[str, np.ndarray]):
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_record(record) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}
