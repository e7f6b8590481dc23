"""Synthetic interaction streams with known interest shifts (the built-in default dataset).

Items belong to latent topics and have Zipf-like popularity within their topic, plus two
"successor" items each (series, sequels: the sequential signal a recommender can learn).
Each device has one to a few interests (focused users and explorers) with weights, sessions
at daytime hours at its own activity rate, and interest shifts at random times: a shift
replaces one interest by a new topic that becomes dominant. Every shift is recorded, so
request triggers can be scored against the truth. Generation is vectorised over devices
(one numpy step per event position), deterministic by seed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from fl_sim.data.interactions import Interactions
from fl_sim.errors import ConfigError

DAY = 86_400.0


def _param(dcfg: DictConfig, key: str, low: float, high: float = np.inf, integer: bool = False):
    value = dcfg.get(key)
    if value is None or not (low <= value <= high) or (integer and int(value) != value):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"dataset.{key} must be {kind} in [{low}, {high}], got {value!r}")
    return int(value) if integer else float(value)


class _Items:
    """Topic layout, popularity and successors; samples items of given topics by popularity."""

    def __init__(self, rng: np.random.Generator, n_items: int, n_topics: int, zipf_a: float):
        extra = rng.integers(0, n_topics, n_items - n_topics)
        self.topic = np.sort(np.concatenate([np.arange(n_topics), extra]))
        start = np.searchsorted(self.topic, np.arange(n_topics))
        rank = np.arange(n_items) - start[self.topic]
        weight = (rank + 1.0) ** -zipf_a
        cum = np.cumsum(weight)
        topic_end = np.append(start[1:], n_items) - 1
        before = np.where(start > 0, cum[np.maximum(start - 1, 0)], 0.0)
        total = cum[topic_end] - before
        within = (cum - before[self.topic]) / total[self.topic]
        within[topic_end] = 1.0
        self.key = self.topic + within  # topic k's items have keys in (k, k+1]
        self.topic_mass = total / total.sum()
        succ = self.sample(rng, np.repeat(self.topic, 2)).reshape(n_items, 2)
        self.successor = succ

    def sample(self, rng: np.random.Generator, topics: np.ndarray) -> np.ndarray:
        u = 1.0 - rng.random(len(topics))  # (0, 1]
        return np.searchsorted(self.key, topics + u, side="left")


def generate(dcfg: DictConfig, num_devices: int, seed: int) -> tuple[pd.DataFrame, dict]:
    n_dev = int(num_devices)
    if n_dev < 1:
        raise ConfigError(f"num_clients must be >= 1, got {num_devices}")
    n_items = _param(dcfg, "n_items", 2, integer=True)
    n_topics = _param(dcfg, "n_topics", 2, n_items, integer=True)
    max_int = _param(dcfg, "max_interests", 1, n_topics - 1, integer=True)
    days = _param(dcfg, "days", 1e-3)
    rate = _param(dcfg, "sessions_per_day", 1e-3)
    sigma = _param(dcfg, "activity_sigma", 0.0, 5.0)
    mean_len = _param(dcfg, "session_length", 1.0)
    gap = _param(dcfg, "event_gap_s", 1e-3)
    zipf_a = _param(dcfg, "zipf_a", 0.0, 5.0)
    explorers = _param(dcfg, "explorer_share", 0.0, 1.0)
    sticky = _param(dcfg, "topic_stickiness", 0.0, 1.0)
    follow = _param(dcfg, "follow_prob", 0.0, 1.0)
    shift_rate = _param(dcfg, "shifts_per_week", 0.0)
    max_events = _param(dcfg, "max_events_per_device", 2, integer=True)

    rng = np.random.default_rng(seed)
    items = _Items(rng, n_items, n_topics, zipf_a)
    horizon = days * DAY

    # Sessions: count by activity rate, daytime start (08:00-24:00, evening-heavy), geometric length.
    activity = rate * rng.lognormal(-sigma**2 / 2, sigma, n_dev)
    n_sess = np.maximum(2, rng.poisson(activity * days))
    sess_dev = np.repeat(np.arange(n_dev), n_sess)
    day = rng.integers(0, max(1, int(np.ceil(days))), len(sess_dev))
    sess_start = np.minimum(day * DAY + (8 + 16 * rng.beta(2.0, 1.5, len(sess_dev))) * 3600, horizon)
    order = np.lexsort((sess_start, sess_dev))
    sess_dev, sess_start = sess_dev[order], sess_start[order]
    sess_len = rng.geometric(1.0 / mean_len, len(sess_dev))
    # Cap events per device by trimming its latest sessions.
    first = np.concatenate([[0], np.cumsum(n_sess)[:-1]])
    cum_in_dev = np.cumsum(sess_len) - np.repeat(np.cumsum(sess_len)[first] - sess_len[first], n_sess)
    sess_len = np.clip(sess_len - np.maximum(cum_in_dev - max_events, 0), 0, None)

    ev_sess = np.repeat(np.arange(len(sess_dev)), sess_len)
    pos = np.arange(len(ev_sess)) - np.repeat(np.cumsum(sess_len) - sess_len, sess_len)
    gaps = np.where(pos == 0, 0.0, rng.exponential(gap, len(ev_sess)))
    ev_time = sess_start[ev_sess] + _cumsum_by_group(gaps, pos == 0)
    ev_dev = sess_dev[ev_sess]
    ev_new = pos == 0
    order = np.lexsort((ev_time, ev_dev))
    ev_dev, ev_time, ev_new = ev_dev[order], ev_time[order], ev_new[order]
    lengths = np.bincount(ev_dev, minlength=n_dev)
    offset = np.concatenate([[0], np.cumsum(lengths)[:-1]])

    # Interests: distinct topics drawn by topic popularity (Gumbel top-k), Dirichlet weights.
    n_int = np.where(rng.random(n_dev) < explorers, rng.integers(3, max_int + 1, n_dev) if max_int >= 3
                     else max_int, rng.integers(1, 3, n_dev))
    n_int = np.minimum(n_int, max_int)
    keys = np.log(items.topic_mass) + rng.gumbel(size=(n_dev, n_topics))
    topics = np.argsort(-keys, axis=1)[:, :max_int]
    active_slot = np.arange(max_int) < n_int[:, None]
    weights = rng.gamma(1.0, size=(n_dev, max_int)) * active_slot
    weights /= weights.sum(axis=1, keepdims=True)

    # Interest shifts: Poisson in time, applied when the device's clock passes them.
    n_shift = rng.poisson(shift_rate * days / 7.0, n_dev)
    shift_dev = np.repeat(np.arange(n_dev), n_shift)
    shift_time = rng.random(len(shift_dev)) * horizon
    order = np.lexsort((shift_time, shift_dev))
    shift_time = shift_time[order]
    shift_ptr = np.concatenate([[0], np.cumsum(n_shift)[:-1]])
    shift_end = shift_ptr + n_shift
    log: list[tuple] = []

    ev_item = np.empty(len(ev_dev), dtype=np.int64)
    cur_topic = np.full(n_dev, -1)
    last_item = np.zeros(n_dev, dtype=np.int64)
    for t in range(int(lengths.max())):
        dev = np.flatnonzero(lengths > t)
        e = offset[dev] + t
        now = ev_time[e]
        _apply_shifts(rng, dev, now, shift_time, shift_ptr, shift_end, topics, weights, n_int, items, log)
        keep_topic = ~ev_new[e] & (rng.random(len(dev)) < sticky)
        keep_topic &= (topics[dev] == cur_topic[dev, None]).any(axis=1)
        slot = (np.cumsum(weights[dev], axis=1) < rng.random(len(dev))[:, None]).sum(axis=1)
        slot = np.minimum(slot, n_int[dev] - 1)
        topic = np.where(keep_topic, cur_topic[dev], topics[dev, slot])
        item = items.sample(rng, topic)
        follows = keep_topic & (rng.random(len(dev)) < follow)
        succ = items.successor[last_item[dev], rng.integers(0, 2, len(dev))]
        item = np.where(follows, succ, item)
        ev_item[e] = item
        cur_topic[dev] = topic
        last_item[dev] = item

    frame = pd.DataFrame({"user": ev_dev, "item": ev_item, "ts": ev_time})
    shifts = pd.DataFrame(log, columns=["device", "time", "slot", "old_topic", "new_topic"])
    shifts = shifts.sort_values(["device", "time"], kind="stable").reset_index(drop=True)
    return frame, {"item_topic": items.topic, "shifts": shifts}


def _cumsum_by_group(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    total = np.cumsum(values)
    base = np.maximum.accumulate(np.where(starts, total - values, -np.inf))
    return total - base


def _apply_shifts(rng, dev, now, shift_time, shift_ptr, shift_end, topics, weights, n_int, items, log) -> None:
    n_topics = len(items.topic_mass)
    if len(shift_time) == 0:
        return
    while True:
        ptr = shift_ptr[dev]
        due = (ptr < shift_end[dev]) & (shift_time[np.minimum(ptr, len(shift_time) - 1)] <= now)
        d = dev[due]
        if len(d) == 0:
            return
        when = shift_time[shift_ptr[d]]
        slot = (rng.random(len(d)) * n_int[d]).astype(np.int64)
        old = topics[d, slot].copy()
        new = rng.choice(n_topics, len(d), p=items.topic_mass)
        clash = (topics[d] == new[:, None]).any(axis=1)
        while clash.any():
            new[clash] = rng.integers(0, n_topics, int(clash.sum()))
            clash = (topics[d] == new[:, None]).any(axis=1)
        topics[d, slot] = new
        # The new interest becomes dominant; the others keep their proportions.
        share = 0.5 + 0.5 * rng.random(len(d))
        w = weights[d]
        w[np.arange(len(d)), slot] = 0.0
        rest = w.sum(axis=1, keepdims=True)
        w = np.where(rest > 0, w / np.where(rest > 0, rest, 1.0) * (1 - share[:, None]), 0.0)
        w[np.arange(len(d)), slot] = np.where(rest[:, 0] > 0, share, 1.0)
        weights[d] = w
        log.extend(zip(d.tolist(), when.tolist(), slot.tolist(), old.tolist(), new.tolist()))
        shift_ptr[d] += 1


def attach_ground_truth(inter: Interactions, extras: dict) -> None:
    """Carry item topics and the shift log over to the (possibly filtered) dense ids."""
    inter.item_topic = extras["item_topic"][inter.item_ids.astype(np.int64)]
    shifts = extras["shifts"]
    raw_dev = shifts["device"].to_numpy()
    pos = np.searchsorted(inter.user_ids, raw_dev)
    pos = np.minimum(pos, len(inter.user_ids) - 1)
    known = inter.user_ids[pos] == raw_dev
    shifts = shifts[known].copy()
    shifts["device"] = pos[known]
    inter.shifts = shifts.reset_index(drop=True)
