"""The request-trigger plug-in point.

A trigger decides, for every device of a shard at once, whether the device asks the cloud for
a new model now. It reads only what the device itself knows (`DeviceView`); it is called at
each of the device's events, after the event has been scored, with the view of that moment.

Write your own: subclass `Trigger`, implement `decide(view) -> bool array`, and select it
with `trigger._target_=your_module.YourTrigger` plus its parameters (see README).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


@dataclass
class DeviceView:
    """What each device of the shard knows now; every field is an array over those devices."""

    device: np.ndarray  # global device ids (stable whatever the sharding: key random draws on these)
    index: np.ndarray  # rows in the shard's state arrays (sized by Trigger.reset)
    now: np.ndarray  # simulated time, seconds
    events_since_request: np.ndarray  # events seen since the device's last request
    sessions_since_request: np.ndarray  # sessions started since the last request
    new_session: np.ndarray  # bool: this event opens a session
    interest: np.ndarray  # [n, dim] the device's interest now: moving average of its items' embeddings
    interest_at_request: np.ndarray  # [n, dim] the same at its last request
    entropy: np.ndarray  # mean entropy of its model's recent predictions (nats)
    hit_rate: np.ndarray  # share of its recent events that its model ranked in the top 10
    bytes_spent: np.ndarray  # bytes up and down so far
    link_bps: np.ndarray  # downlink throughput now, bytes/s
    max_flops: np.ndarray  # budget now: FLOPs per inference
    max_params: np.ndarray  # budget now: on-device parameters
    model_age_s: np.ndarray  # seconds since its model arrived
    days: np.ndarray  # simulated days elapsed (for per-day allowances)

    def __len__(self) -> int:
        return len(self.now)


class Trigger(ABC):
    """Decides who requests. Subclasses keep any per-device state they need in arrays sized by
    `reset(n)` and indexed by `view.index`; the simulator calls `requested(mask, view)` with
    the devices whose request was actually sent (online, and no request outstanding: a request
    stays outstanding until its model is installed or the device is told it was not served)."""

    def reset(self, n: int, seed: int) -> None:
        """Called once per shard before its first event, with the shard's device count."""

    @abstractmethod
    def decide(self, view: DeviceView) -> np.ndarray:
        """Boolean array: True where the device requests a new model now."""

    def requested(self, mask: np.ndarray, view: DeviceView) -> None:
        """Called with the devices whose request was sent (after `decide` and any budget)."""
