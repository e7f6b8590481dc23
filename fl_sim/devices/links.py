"""Time-varying links as piecewise-constant throughput traces, repeated cyclically.

All traces live in one bank; each device points at a trace, a start offset into it and a
scale. `transfer_time` integrates the throughput from a start time until the payload is
through, vectorised over devices (one searchsorted over the bank's cumulative bytes).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fl_sim.errors import DataError

MIN_BPS = 1_000.0  # bytes/s (8 kbit/s): the floor, so a trace at zero still finishes a transfer


@dataclass
class TraceBank:
    """Concatenated traces: sample k of trace j lasts dur[k] seconds at rate bps[k] (bytes/s)."""

    start: np.ndarray  # [J+1] offsets of each trace's samples
    dur: np.ndarray
    bps: np.ndarray
    names: list[str]

    def __post_init__(self) -> None:
        n_traces = len(self.start) - 1
        self.trace_of = np.repeat(np.arange(n_traces), np.diff(self.start))
        within_t = np.cumsum(self.dur)
        within_b = np.cumsum(self.dur * self.bps)
        first = self.start[:-1]
        base_t = np.where(first > 0, within_t[np.maximum(first - 1, 0)], 0.0)
        base_b = np.where(first > 0, within_b[np.maximum(first - 1, 0)], 0.0)
        self.t_end = within_t - base_t[self.trace_of]  # end time of each sample within its trace
        self.b_end = within_b - base_b[self.trace_of]  # bytes through at that end
        self.period = self.t_end[self.start[1:] - 1]
        self.bytes_per_period = self.b_end[self.start[1:] - 1]
        # keys monotone over the whole bank: trace j's values offset by j * big
        self._big = float(self.bytes_per_period.max()) * 4 + 1.0
        self._tbig = float(self.period.max()) * 4 + 1.0
        self._key = self.b_end + self.trace_of * self._big
        self._tkey = self.t_end + self.trace_of * self._tbig

    def _segment(self, key: np.ndarray, big: float, trace: np.ndarray, value: np.ndarray):
        """The sample of `trace` in which `value` (a time or a byte count) falls, and the time
        and bytes at that sample's start."""
        k = np.minimum(np.searchsorted(key, value + trace * big, side="right"), self.start[trace + 1] - 1)
        inside = k > self.start[trace]
        return k, np.where(inside, self.t_end[k - 1], 0.0), np.where(inside, self.b_end[k - 1], 0.0)

    def bytes_until(self, trace: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Bytes a transfer started at time 0 of the trace has moved by time t (cyclic)."""
        cycles, rem = np.divmod(t, self.period[trace])
        k, t_prev, b_prev = self._segment(self._tkey, self._tbig, trace, rem)
        return cycles * self.bytes_per_period[trace] + b_prev + (rem - t_prev) * self.bps[k]

    def time_until(self, trace: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Inverse of bytes_until: the time at which b bytes have moved."""
        cycles, rem = np.divmod(b, self.bytes_per_period[trace])
        k, t_prev, b_prev = self._segment(self._key, self._big, trace, rem)
        return cycles * self.period[trace] + t_prev + (rem - b_prev) / self.bps[k]

    def rate_at(self, trace: np.ndarray, t: np.ndarray) -> np.ndarray:
        k, _, _ = self._segment(self._tkey, self._tbig, trace, np.mod(t, self.period[trace]))
        return self.bps[k]


def bank_from_arrays(traces: list[tuple[np.ndarray, np.ndarray]], names: list[str]) -> TraceBank:
    """traces: (durations s, Mbit/s) pairs."""
    lengths = [len(d) for d, _ in traces]
    dur = np.concatenate([d for d, _ in traces]).astype(np.float64)
    mbps = np.concatenate([r for _, r in traces]).astype(np.float64)
    return TraceBank(start=np.concatenate([[0], np.cumsum(lengths)]), dur=dur,
                     bps=np.maximum(mbps * 125_000.0, MIN_BPS), names=names)


def read_trace(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A `seconds \\t Mbps` trace file -> (sample durations, Mbit/s)."""
    try:
        with warnings.catch_warnings():  # an empty file is refused below, with its name
            warnings.simplefilter("ignore", UserWarning)
            data = np.loadtxt(path, ndmin=2)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a 'seconds Mbps' trace ({exc})") from None
    if data.shape[1] < 2 or len(data) < 2:
        raise DataError(f"{path}: a trace needs at least two 'seconds Mbps' lines")
    t, rate = data[:, 0], data[:, 1]
    bad = np.flatnonzero(~np.isfinite(t) | ~np.isfinite(rate))
    if len(bad):
        raise DataError(f"{path}, line {bad[0] + 1}: not a finite number")
    dur = np.diff(t)
    bad = np.flatnonzero(dur <= 0)
    if len(bad):
        raise DataError(f"{path}, line {bad[0] + 2}: time does not increase")
    if (rate < 0).any():
        raise DataError(f"{path}, line {int(np.flatnonzero(rate < 0)[0]) + 1}: negative throughput")
    return dur, rate[:-1]


def synthetic_trace(rng: np.random.Generator, mean_mbps: float, sigma: float, seconds: int = 3600,
                    step_s: float = 5.0, rho: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """Lognormal AR(1) throughput around `mean_mbps` (the mean of the process)."""
    n = int(seconds / step_s)
    z = np.empty(n)
    z[0] = rng.normal()
    eps = rng.normal(size=n) * np.sqrt(1 - rho**2)
    for i in range(1, n):
        z[i] = rho * z[i - 1] + eps[i]
    rate = mean_mbps * np.exp(sigma * z - sigma**2 / 2)
    return np.full(n, step_s), rate
