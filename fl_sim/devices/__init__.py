"""Devices: resource profiles, time-varying links and availability, budgets, transfer times."""

from fl_sim.devices.fleet import Fleet, build_fleet

__all__ = ["Fleet", "build_fleet"]
