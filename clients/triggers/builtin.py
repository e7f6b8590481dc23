"""The built-in request triggers."""

from __future__ import annotations

import numpy as np

from clients.triggers.base import DeviceView, Trigger
from fl_sim.devices.counter_rng import uniform

RANDOM_TRIGGER_STREAM = 100  # its own stream of the counter-based generator (fl_sim.devices uses 0-9)


class Never(Trigger):
    """Keep the first model for ever (DeviceRec's deployment)."""

    def decide(self, view: DeviceView) -> np.ndarray:
        return np.zeros(len(view), dtype=bool)


class Always(Trigger):
    """Request at every event: the upper bound on freshness and on cost."""

    def decide(self, view: DeviceView) -> np.ndarray:
        return np.ones(len(view), dtype=bool)


class EverySession(Trigger):
    """Request when a session starts (the paper's default deployment)."""

    def decide(self, view: DeviceView) -> np.ndarray:
        return view.new_session.copy()


class Drift(Trigger):
    """Request when the interest vector has moved away from where it was at the last request.

    Distance is 1 - cosine similarity between `interest` and `interest_at_request`; a device
    requests when it exceeds `threshold` and at least `min_events` events have passed.
    """

    def __init__(self, threshold: float = 0.3, min_events: int = 1):
        if not 0 <= threshold <= 2:
            raise ValueError(f"trigger.threshold must be in [0, 2], got {threshold}")
        self.threshold, self.min_events = threshold, min_events

    @staticmethod
    def distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        cos = (a * b).sum(axis=1) / np.maximum(na * nb, 1e-12)
        return 1.0 - cos

    def decide(self, view: DeviceView) -> np.ndarray:
        moved = self.distance(view.interest, view.interest_at_request) > self.threshold
        return moved & (view.events_since_request >= self.min_events)


class Periodic(Trigger):
    """Request when the model is older than `period_h` hours (checked at the device's events)."""

    def __init__(self, period_h: float = 24.0):
        if period_h <= 0:
            raise ValueError(f"trigger.period_h must be > 0, got {period_h}")
        self.period_s = period_h * 3600.0

    def decide(self, view: DeviceView) -> np.ndarray:
        return view.model_age_s >= self.period_s


class Uncertainty(Trigger):
    """Request when a mis-recommendation is likely (after IntellectReq): the model's recent
    predictions are uncertain (entropy above `entropy` nats) or its recent hit rate is below
    `hit_floor`; both are the device's moving averages. At least `min_events` since the last
    request, so one bad stretch costs one request."""

    def __init__(self, entropy: float = 3.6, hit_floor: float = 0.0, min_events: int = 5):
        if entropy <= 0 or not 0 <= hit_floor <= 1 or min_events < 0:
            raise ValueError("trigger: entropy must be > 0, hit_floor in [0, 1], min_events >= 0")
        self.entropy, self.hit_floor, self.min_events = entropy, hit_floor, min_events

    def decide(self, view: DeviceView) -> np.ndarray:
        likely_miss = (view.entropy > self.entropy) | (view.hit_rate < self.hit_floor)
        return likely_miss & (view.events_since_request >= self.min_events)


class RandomRate(Trigger):
    """A control: request at each event with probability `p`, drawn from the device's own
    counter-based stream (so draws do not depend on sharding)."""

    def __init__(self, p: float = 0.05):
        if not 0 <= p <= 1:
            raise ValueError(f"trigger.p must be in [0, 1], got {p}")
        self.p = p

    def reset(self, n: int, seed: int) -> None:
        self.seed = seed

    def decide(self, view: DeviceView) -> np.ndarray:
        return uniform(self.seed, RANDOM_TRIGGER_STREAM, view.device, np.floor(view.now)) < self.p


class Wrapper(Trigger):
    """A policy around another (`inner`, any trigger config with its own `_target_`)."""

    def __init__(self, inner: Trigger):
        if not isinstance(inner, Trigger):
            raise ValueError(f"trigger.inner must be a trigger, got {type(inner).__name__}")
        self.inner = inner

    def reset(self, n: int, seed: int) -> None:
        self.inner.reset(n, seed)

    def requested(self, mask: np.ndarray, view: DeviceView) -> None:
        self.inner.requested(mask, view)


class Budgeted(Wrapper):
    """Lets `inner` request only within an allowance per simulated day: at most
    `requests_per_day` requests and/or `bytes_per_day` bytes (up and down) a day; null: no cap."""

    def __init__(self, inner: Trigger, requests_per_day: float | None = 1, bytes_per_day: float | None = None):
        super().__init__(inner)
        if requests_per_day is None and bytes_per_day is None:
            raise ValueError("trigger: give requests_per_day or bytes_per_day (or both)")
        if (requests_per_day is not None and requests_per_day < 0) or (bytes_per_day is not None and bytes_per_day < 0):
            raise ValueError("trigger: requests_per_day and bytes_per_day must be >= 0")
        self.requests_per_day, self.bytes_per_day = requests_per_day, bytes_per_day

    def reset(self, n: int, seed: int) -> None:
        super().reset(n, seed)
        self.day = np.full(n, -1.0)
        self.count = np.zeros(n)
        self.bytes_at_day_start = np.zeros(n)

    def _roll(self, view: DeviceView) -> None:
        i, today = view.index, np.floor(view.days)
        new = today != self.day[i]
        self.day[i[new]] = today[new]
        self.count[i[new]] = 0
        self.bytes_at_day_start[i[new]] = view.bytes_spent[new]

    def decide(self, view: DeviceView) -> np.ndarray:
        self._roll(view)
        ok = np.ones(len(view), dtype=bool)
        if self.requests_per_day is not None:
            ok &= self.count[view.index] < self.requests_per_day
        if self.bytes_per_day is not None:
            ok &= view.bytes_spent - self.bytes_at_day_start[view.index] < self.bytes_per_day
        return self.inner.decide(view) & ok

    def requested(self, mask: np.ndarray, view: DeviceView) -> None:
        super().requested(mask, view)
        self.count[view.index[mask]] += 1


class BandwidthAware(Wrapper):
    """Defers `inner`'s requests while the downlink is slower than `min_mbps`, for at most
    `max_defer_h` hours (then requests anyway)."""

    def __init__(self, inner: Trigger, min_mbps: float = 2.0, max_defer_h: float = 12.0):
        super().__init__(inner)
        if min_mbps < 0 or max_defer_h < 0:
            raise ValueError("trigger: min_mbps and max_defer_h must be >= 0")
        self.min_bps, self.max_defer_s = min_mbps * 1e6 / 8, max_defer_h * 3600.0

    def reset(self, n: int, seed: int) -> None:
        super().reset(n, seed)
        self.waiting_since = np.full(n, np.inf)

    def decide(self, view: DeviceView) -> np.ndarray:
        want = self.inner.decide(view)
        i = view.index
        self.waiting_since[i] = np.where(want, np.minimum(self.waiting_since[i], view.now), np.inf)
        fast = view.link_bps >= self.min_bps
        waited = view.now - self.waiting_since[i] >= self.max_defer_s
        return want & (fast | waited)

    def requested(self, mask: np.ndarray, view: DeviceView) -> None:
        super().requested(mask, view)
        self.waiting_since[view.index[mask]] = np.inf


class AnyOf(Trigger):
    """Requests when any of its triggers fires (e.g. the paper's protocol: a session starts, or
    interests drift: `trigger=session_drift`). Every inner trigger sees every event."""

    def __init__(self, triggers: list):
        if not triggers:
            raise ValueError("trigger.triggers: give at least one trigger")
        if not all(isinstance(t, Trigger) for t in triggers):
            raise ValueError("trigger.triggers: every entry must be a trigger (a _target_ naming a Trigger class)")
        self.triggers = list(triggers)

    def reset(self, n: int, seed: int) -> None:
        for t in self.triggers:
            t.reset(n, seed)

    def decide(self, view: DeviceView) -> np.ndarray:
        out = np.zeros(len(view), dtype=bool)
        for t in self.triggers:
            out |= np.asarray(t.decide(view), dtype=bool)
        return out

    def requested(self, mask: np.ndarray, view: DeviceView) -> None:
        for t in self.triggers:
            t.requested(mask, view)
