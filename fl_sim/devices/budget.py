"""A device's budget at request time, from its free resources now."""

from __future__ import annotations

import numpy as np

from fl_sim.devices.fleet import Fleet

BYTES_PER_PARAM = 4  # fp32 weights in memory


def budgets(fleet: Fleet, dev: np.ndarray, t, latency_s: float, memory_share: float,
            compute_share: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(max FLOPs per inference, max on-device parameters) for each device at time t.

    FLOPs: what the recommender's share of the free compute does within the latency target.
    Parameters: the share of its free memory an app's model may hold.
    """
    max_flops = latency_s * compute_share * fleet.compute[dev] * fleet.free_compute(dev, t)
    max_params = memory_share * fleet.memory[dev] * fleet.free_memory(dev, t) / BYTES_PER_PARAM
    return max_flops, max_params


def shares(dcfg) -> tuple[float, float, float]:
    """budgets()' latency target and shares from the fleet's config (conf/devices), read once by
    a caller in a loop: a config lookup costs more than a step's arithmetic."""
    return float(dcfg.latency_s), float(dcfg.memory_share), float(dcfg.compute_share)


def device_budgets(fleet: Fleet, dcfg, dev: np.ndarray, t) -> tuple[np.ndarray, np.ndarray]:
    """budgets() with the shares and the latency target of the fleet's config (conf/devices)."""
    return budgets(fleet, dev, t, *shares(dcfg))
