"""A device's budget at request time, from its free resources now."""

from __future__ import annotations

import numpy as np

from fl_sim.devices.fleet import Fleet

BYTES_PER_PARAM = 4  # fp32 weights in memory


def budgets(fleet: Fleet, dev: np.ndarray, t, latency_s: float, memory_share: float) -> tuple[np.ndarray, np.ndarray]:
    """(max FLOPs per inference, max on-device parameters) for each device at time t.

    FLOPs: what its free compute does within the latency target. Parameters: the share of its
    free memory an app's model may hold.
    """
    max_flops = latency_s * fleet.compute[dev] * fleet.free_compute(dev, t)
    max_params = memory_share * fleet.memory[dev] * fleet.free_memory(dev, t) / BYTES_PER_PARAM
    return max_flops, max_params
