"""Device timelines: the history the cloud holds, the real-time stream each device replays,
sessions, and the leave-last-out split used by offline evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from omegaconf import DictConfig

from fl_sim.data.interactions import Interactions
from fl_sim.errors import ConfigError

DAY = 86_400.0


@dataclass
class DeviceStreams:
    """`inter.ts` is in seconds (synthesised for order-only data). Device u's events are
    `inter.indptr[u]:inter.indptr[u+1]`; those before `split[u]` are the cloud's history, the
    rest is the device's real-time stream. `session[i]` numbers sessions globally."""

    inter: Interactions
    split: np.ndarray
    session: np.ndarray
    cut: str
    t0: Optional[float]
    synthesized_ts: bool

    @property
    def stream_mask(self) -> np.ndarray:
        pos = np.arange(len(self.inter))
        return pos >= np.repeat(self.split, self.inter.lengths())

    def summary(self) -> dict:
        stream = self.stream_mask
        stream_len = self.inter.indptr[1:] - self.split
        return {
            "devices": self.inter.n_users,
            "devices_with_stream": int((stream_len > 0).sum()),
            "history_events": int((~stream).sum()),
            "stream_events": int(stream.sum()),
            "sessions": int(len(np.unique(self.session))),
            "stream_sessions": int(len(np.unique(self.session[stream]))),
            "stream_cut": self.cut,
            "t0": self.t0,
            "synthesized_timestamps": self.synthesized_ts,
        }


def _check(scfg: DictConfig, key: str, low: float, high: float) -> float:
    value = scfg.get(key)
    if value is None or not (low <= float(value) <= high):
        raise ConfigError(f"streams.{key} must be in [{low}, {high}], got {value!r}")
    return float(value)


def synthesize_timestamps(inter: Interactions, scfg: DictConfig, rng: np.random.Generator) -> np.ndarray:
    """Order-only data: sessions of `session_length` events, event gaps ~ Exp(event_gap_s),
    session gaps from a per-device event rate (lognormal around `events_per_day`)."""
    length = int(_check(scfg, "session_length", 1, 1e9))
    per_day = _check(scfg, "events_per_day", 1e-6, 1e9)
    gap = _check(scfg, "event_gap_s", 0, 1e9)
    lengths = inter.lengths()
    starts = np.repeat(inter.indptr[:-1], lengths)
    pos = np.arange(len(inter)) - starts
    rate = per_day * rng.lognormal(-0.5, 1.0, inter.n_users)  # mean per_day
    session_gap = DAY * length / rate  # mean time between session starts
    gaps = np.where(pos % length == 0, rng.exponential(1.0, len(inter)) * np.repeat(session_gap, lengths),
                    rng.exponential(gap, len(inter)))
    gaps[pos == 0] = rng.random(inter.n_users)[inter.user[pos == 0]] * DAY  # first event: any time on day 0
    total = np.cumsum(gaps)
    return total - np.repeat(total[inter.indptr[:-1]] - gaps[inter.indptr[:-1]], lengths)


def build_streams(inter: Interactions, scfg: DictConfig, seed: int) -> DeviceStreams:
    rng = np.random.default_rng([seed, 1])
    synthesized = not inter.has_timestamps
    ts = synthesize_timestamps(inter, scfg, rng) if synthesized else inter.ts
    inter = Interactions(user=inter.user, item=inter.item, ts=ts, has_timestamps=inter.has_timestamps,
                         user_ids=inter.user_ids, item_ids=inter.item_ids, item_topic=inter.item_topic,
                         shifts=inter.shifts)
    cut = scfg.get("cut", "auto")
    if cut == "auto":
        cut = "fraction" if synthesized else "time"
    lengths = inter.lengths()
    if cut == "time":
        q = _check(scfg, "time_quantile", 0.0, 1.0)
        t0 = float(np.quantile(ts, q))
        split = inter.indptr[:-1] + np.bincount(inter.user[ts < t0], minlength=inter.n_users)
    elif cut == "fraction":
        frac = _check(scfg, "history_fraction", 0.0, 1.0)
        t0 = None
        split = inter.indptr[:-1] + np.floor(lengths * frac).astype(np.int64)
    else:
        raise ConfigError(f"streams.cut must be auto, time or fraction, got {cut!r}")
    pos = np.arange(len(inter)) - np.repeat(inter.indptr[:-1], lengths)
    if synthesized:
        new = pos % int(scfg.session_length) == 0
    else:
        gap_s = _check(scfg, "session_gap_s", 0, 1e12)
        new = (pos == 0) | (np.diff(ts, prepend=ts[0]) > gap_s)
    session = np.cumsum(new) - 1
    return DeviceStreams(inter=inter, split=split.astype(np.int64), session=session, cut=cut, t0=t0,
                         synthesized_ts=synthesized)


def select_devices(inter: Interactions, n: int, seed: int) -> Interactions:
    """Keep `n` users drawn at random (all if there are no more than n); the catalogue is unchanged."""
    if n >= inter.n_users:
        return inter
    rng = np.random.default_rng([seed, 2])
    chosen = np.sort(rng.choice(inter.n_users, size=n, replace=False))
    new_id = np.full(inter.n_users, -1)
    new_id[chosen] = np.arange(n)
    keep = new_id[inter.user] >= 0
    shifts = None
    if inter.shifts is not None:
        shifts = inter.shifts[new_id[inter.shifts["device"].to_numpy()] >= 0].copy()
        shifts["device"] = new_id[shifts["device"].to_numpy()]
        shifts = shifts.reset_index(drop=True)
    return Interactions(user=new_id[inter.user[keep]].astype(np.int32), item=inter.item[keep], ts=inter.ts[keep],
                        has_timestamps=inter.has_timestamps, user_ids=inter.user_ids[chosen],
                        item_ids=inter.item_ids, item_topic=inter.item_topic, shifts=shifts)


@dataclass
class LeaveLastOut:
    """Per evaluated user: training events `indptr[u]:train_end[u]`, validation event `valid[u]`,
    test event `test[u]` (global indices). Users with fewer than 3 events are not evaluated."""

    users: np.ndarray
    train_end: np.ndarray
    valid: np.ndarray
    test: np.ndarray


def leave_last_out(inter: Interactions) -> LeaveLastOut:
    users = np.flatnonzero(inter.lengths() >= 3)
    end = inter.indptr[users + 1]
    return LeaveLastOut(users=users, train_end=end - 2, valid=end - 2, test=end - 1)
