"""A trigger defined outside the package, as a user would write one (README example)."""

import numpy as np

from clients.triggers import DeviceView, Trigger


class LowHitRate(Trigger):
    """Ask for a new model when the local hit rate drops below a floor."""

    def __init__(self, floor: float = 0.1):
        self.floor = floor

    def decide(self, view: DeviceView) -> np.ndarray:
        return view.hit_rate < self.floor
