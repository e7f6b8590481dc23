"""Faults injected by config (`faults=...`, conf/faults/), and the checks that catch them.

Every draw comes from counter-based random numbers keyed by device (downloads) or by shard
and round (shard failures), so a faulty run is as reproducible as a clean one. Downloads are
keyed by the device and its download ordinal, so their faults do not depend on sharding; a
shard failure hits the devices of that shard, so runs with `faults.shard_fail > 0` depend on
the shard count by nature.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from fl_sim.devices import counter_rng

_SHARD, _DOWNLOAD, _WHERE, _NODE = 200, 201, 202, 203

# Outcome of one download attempt.
OK, DROPPED, CORRUPTED, TRUNCATED = 0, 1, 2, 3


INJECTED = "injected shard fault"  # in a failed shard's error reply: it catches up next round
NODE_LOST = "injected node loss"  # in a lost shard's error reply: it is rebuilt first
CRASHED = "injected crash part-way"  # the same, for a shard that failed after changing state


class ShardFault(RuntimeError):
    """An injected failure of a shard's ClientApp: raised when it receives a round, before it
    touches any device (the shard catches up with its next round), or, `partway`, after it has
    run the round and before it replies, which puts its state in doubt like any other failure:
    it is rebuilt (fl_sim.engine.Recorder) and then catches up."""

    def __init__(self, message: str, partway: bool = False):
        super().__init__(message)
        self.partway = partway


@dataclass(frozen=True)
class Faults:
    seed: int = 0
    shard_fail: float = 0.0          # probability a shard's ClientApp raises on a round
    shard_fail_partway: bool = False  # it raises after running the round (state in doubt: rebuilt)
    max_shard_failures: int = 5      # rounds in a row a shard may fail before the run stops
    node_vanish: float = 0.0         # probability a shard's node vanishes with its state on a round
    download_drop: float = 0.0       # probability the device goes offline during a download
    payload_corrupt: float = 0.0     # probability a download arrives with a flipped byte
    payload_truncate: float = 0.0    # probability a download arrives cut short
    max_download_attempts: int = 4   # attempts per delivery before the device gives up on it
    cloud_capacity: float | None = None  # requests the cloud answers per simulated second (None: no limit)
    cloud_queue: int = 0             # requests that may wait in the cloud's queue; a further one is refused

    @classmethod
    def from_cfg(cls, cfg) -> "Faults":
        f = cfg.get("faults") or {}
        keys = cls.__dataclass_fields__.keys() - {"seed"}
        return cls(seed=int(cfg.seed), **{k: f[k] for k in keys if k in f})

    @property
    def downloads_faulty(self) -> bool:
        return self.download_drop + self.payload_corrupt + self.payload_truncate > 0

    def shard_fails(self, shard: int, round_: int) -> bool:
        if self.shard_fail <= 0:
            return False
        return bool(counter_rng.uniform(self.seed, _SHARD, shard, round_) < self.shard_fail)

    def node_vanishes(self, shard: int, round_: int) -> bool:
        if self.node_vanish <= 0:
            return False
        return bool(counter_rng.uniform(self.seed, _NODE, shard, round_) < self.node_vanish)

    def download(self, device: np.ndarray, ordinal: np.ndarray, attempt: int) -> tuple[np.ndarray, np.ndarray]:
        """(outcome, where) of each device's attempt at its download number `ordinal`;
        `where` in [0, 1) is the share of the payload at which a drop or cut happens, or
        the position of the flipped byte."""
        slot = np.asarray(ordinal, dtype=np.int64) * 64 + attempt
        u = counter_rng.uniform(self.seed, _DOWNLOAD, device, slot)
        where = counter_rng.uniform(self.seed, _WHERE, device, slot)
        edges = np.cumsum([self.download_drop, self.payload_corrupt, self.payload_truncate])
        outcome = (np.searchsorted(edges, u, side="right") + 1) % 4  # past every edge: OK
        return outcome.astype(np.int8), where


def checksum(blocks: np.ndarray, rows: list, candidates=()) -> int:
    """CRC-32 of a delivery: its block mask, each kept block's fp32 weights in block order,
    then the candidate ids (what the cloud sends and the device verifies); equals
    zlib.crc32(payload(blocks, rows, candidates))."""
    crc = zlib.crc32(np.ascontiguousarray(blocks, dtype=np.uint8).tobytes())
    for row in rows:
        crc = zlib.crc32(np.ascontiguousarray(row, dtype=np.float32), crc)
    return zlib.crc32(np.ascontiguousarray(candidates, dtype=np.int64), crc)


def payload(blocks: np.ndarray, rows: list, candidates=()) -> bytes:
    """The bytes of a delivery, in checksum order."""
    parts = [np.ascontiguousarray(blocks, dtype=np.uint8).tobytes()]
    parts += [np.ascontiguousarray(row, dtype=np.float32).tobytes() for row in rows]
    parts.append(np.ascontiguousarray(candidates, dtype=np.int64).tobytes())
    return b"".join(parts)


def damage(payload: bytes, outcome: int, where: float) -> bytes:
    """What arrives after a corrupted or truncated transfer."""
    if outcome == CORRUPTED and payload:
        i = min(int(where * len(payload)), len(payload) - 1)
        return payload[:i] + bytes([payload[i] ^ 0xFF]) + payload[i + 1:]
    if outcome == TRUNCATED:
        return payload[:int(where * len(payload))]
    return payload
