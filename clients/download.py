"""A device downloading its sub-model: waiting to be online, transfer over its link as it
varies, dropping out mid-way, damaged payloads caught by the checksum, retries.

A download starts at the cloud's answer, or at the device's next online time slot if it is
offline then. If the device goes offline before the transfer ends (its availability slot
turns offline, or an injected drop), the bytes moved so far are spent and the download starts
again from the beginning at its next online slot. A payload that arrives damaged (injected
corruption or truncation) fails the checksum the device computes, and is downloaded again at
once. After `faults.max_download_attempts` attempts the device gives up on the delivery (it
may ask again).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from fl_sim import faults as F

COUNTS = ("offline_waits", "downloads_dropped", "payloads_corrupt", "payloads_truncated", "downloads_failed")


@dataclass
class Downloads:
    arrive: np.ndarray  # when each delivery was installed-ready (inf: the device gave up)
    spent: np.ndarray  # bytes moved, failed attempts included
    counts: dict[str, np.ndarray] = field(default_factory=dict)  # per delivery, keys COUNTS


def next_online(fleet, dev: int, t: float, max_slots: int = 10_000) -> float:
    """t if the device is online then, else the start of its next online slot (inf if it
    stays offline for `max_slots` slots)."""
    slot = fleet.slot_s
    for _ in range(max_slots):
        if fleet.online(np.array([dev]), t)[0]:
            return t
        t = (math.floor(t / slot) + 1) * slot
    return math.inf


def _offline_during(fleet, dev: int, start: float, end: float) -> float | None:
    """The first slot boundary in (start, end] at which the device is offline, if any."""
    slot = fleet.slot_s
    b = (math.floor(start / slot) + 1) * slot
    while b <= end:
        if not fleet.online(np.array([dev]), b)[0]:
            return b
        b += slot
    return None


def download(fleet, faults: F.Faults, dev: np.ndarray, t_answer: np.ndarray, nbytes: np.ndarray,
             ordinal: np.ndarray, intact: Callable[[int, int, float], bool]) -> Downloads:
    """Simulate each delivery's download. `intact(i, outcome, where)` is the device's checksum
    verification of delivery i as it arrived after an attempt with that outcome."""
    n = len(dev)
    out = Downloads(arrive=np.full(n, np.inf), spent=np.zeros(n), counts={k: np.zeros(n) for k in COUNTS})
    if n == 0:
        return out
    nbytes = np.asarray(nbytes, dtype=np.float64)
    online = fleet.online(dev, t_answer)
    dur = fleet.transfer_time(dev, t_answer, nbytes, uplink=False)
    end = t_answer + dur
    outcome, where = faults.download(dev, ordinal, 0) if faults.downloads_faulty else (np.zeros(n, np.int8), None)
    crosses = np.floor(end / fleet.slot_s) > np.floor(t_answer / fleet.slot_s)
    easy = online & (outcome == F.OK) & ~crosses
    for i in np.flatnonzero(easy):  # the common case, checked all the same
        if intact(i, F.OK, 0.0):
            out.arrive[i] = end[i]
        else:
            out.counts["downloads_failed"][i] += 1
    out.spent[easy] = nbytes[easy]
    for i in np.flatnonzero(~easy):
        _one(fleet, faults, i, int(dev[i]), float(t_answer[i]), float(nbytes[i]), int(ordinal[i]), intact, out)
    return out


def _one(fleet, faults, i, d, t, nbytes, ordinal, intact, out: Downloads) -> None:
    dev = np.array([d])
    for attempt in range(faults.max_download_attempts):
        start = next_online(fleet, d, t)
        if start == math.inf:
            break
        out.counts["offline_waits"][i] += start > t
        end = start + float(fleet.transfer_time(dev, start, nbytes, uplink=False)[0])
        outcome, where = F.OK, 0.0
        if faults.downloads_faulty:
            o, w = faults.download(dev, np.array([ordinal]), attempt)
            outcome, where = int(o[0]), float(w[0])
        cut = _offline_during(fleet, d, start, end)
        if outcome == F.DROPPED:
            drop_at = start + where * (end - start)
            cut = drop_at if cut is None else min(cut, drop_at)
        if cut is not None:  # offline before the end: bytes so far are lost, start again later
            out.spent[i] += nbytes * (cut - start) / max(end - start, 1e-12)
            out.counts["downloads_dropped"][i] += 1
            t = cut
            continue
        if outcome == F.TRUNCATED:  # the transfer ends early
            end = start + where * (end - start)
            out.spent[i] += nbytes * where
        else:
            out.spent[i] += nbytes
        if intact(i, outcome, where):
            out.arrive[i] = end
            return
        out.counts["payloads_truncated" if outcome == F.TRUNCATED else "payloads_corrupt"][i] += 1
        t = end  # caught by the checksum: download again at once
    out.counts["downloads_failed"][i] += 1
