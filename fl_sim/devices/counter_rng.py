"""Counter-based random numbers: the value for (seed, stream, device, slot) is a pure function
of those integers, so a device's draws never depend on which shard or backend simulates it."""

from __future__ import annotations

import numpy as np

_M1, _M2, _G = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def uniform(seed: int, stream: int, device, slot) -> np.ndarray:
    """U[0,1) for each (device, slot) pair (broadcast), splitmix64 over the four keys."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed) * _G + np.uint64(stream + 1) * _M1
        z = _mix(z + np.asarray(device, dtype=np.uint64) * _G)
        z = _mix(z + np.asarray(slot, dtype=np.int64).astype(np.uint64) * _M2)
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)
