"""Request triggers: when a device asks the cloud for a new model.

base.py holds the plug-in API (`Trigger`, `DeviceView`); builtin.py the shipped policies.
Select one with `trigger=NAME` (conf/trigger/) or your own with `trigger._target_=pkg.Class`.
"""

from clients.triggers.base import DeviceView, Trigger
from clients.triggers.builtin import (Always, AnyOf, BandwidthAware, Budgeted, Drift, EverySession, Never, Periodic,
                                      RandomRate, Uncertainty, Wrapper)

__all__ = ["DeviceView", "Trigger", "Wrapper", "AnyOf", "Never", "Always", "EverySession", "Periodic", "Drift",
           "Uncertainty", "RandomRate", "Budgeted", "BandwidthAware"]
