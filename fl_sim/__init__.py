"""fl-sim: a simulator for cloud-coordinated on-device recommendation."""

__version__ = "0.1.0"
