"""Data: loaders for the owners' formats, filtering, device streams, synthetic data."""

from fl_sim.data.interactions import Interactions
from fl_sim.data.load import load_dataset
from fl_sim.data.streams import DeviceStreams, LeaveLastOut, build_streams, leave_last_out, select_devices

__all__ = ["Interactions", "load_dataset", "DeviceStreams", "LeaveLastOut", "build_streams", "leave_last_out",
           "select_devices"]
