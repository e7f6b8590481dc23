"""The built-in request triggers."""

from __future__ import annotations

import numpy as np

from clients.triggers.base import DeviceView, Trigger


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
