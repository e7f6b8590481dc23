"""A shard of simulated phones, one exchange with the cloud at a time.

An exchange: the cloud's answers come in (clients/inbox.py); every device that is not waiting
for an answer replays its events up to the window's end (scoring.py scores them with the model
and candidates it holds; replay.py walks them in time order, installs what comes due and calls
the trigger); a device that asks stops at that event and waits; the requests go out
(outbox.py). The cloud answers, and the next exchange resumes the devices that waited, now
knowing when their answer installs. A window's exchanges end when no device waits.

Everything a device does here uses only what that device has: its own items, its model and
candidates, its resources (fl_sim.devices).
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
from hydra.utils import instantiate

from clients import inbox, outbox
from clients.replay import replay
from clients.scoring import score
from clients.state import Devices, load_fixed
from fl_sim.memory import steady_heap
from fl_sim.protocol import Deliveries, Requests
from fl_sim.resume import load_state, save_state


STEPS = ("receive", "score", "replay", "request")  # where a shard's exchange spends its time


class Clock:
    """Wall seconds of an exchange's steps (`time_<step>`), summed per step."""

    def __init__(self):
        self.laps = {f"time_{k}": 0.0 for k in STEPS}
        self._t = time.perf_counter()

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        self.laps[f"time_{step}"] += now - self._t
        self._t = now


class Shard:
    def __init__(self, run_dir: str | Path, shard: int, n_shards: int):
        steady_heap()  # the scoring passes reuse heap memory instead of faulting in fresh pages
        self.index = shard
        self.fx = fx = load_fixed(str(run_dir), shard, n_shards)
        self.st = Devices.new(fx)
        self.trigger = instantiate(fx.cfg.trigger)
        self.trigger.reset(len(fx.devices), int(fx.cfg.seed))
        self.booted = False
        # Hidden states a scoring pass computed beyond its window, per device (clients.scoring);
        # derived from the models and streams, so not part of a checkpoint.
        self.contexts: dict | None = {} if fx.cfg.sim.score_cache else None
        bb = fx.model.backbone
        self.empty = Requests.empty(bb.n_blocks, fx.model.upload_h_dim, bb.d,
                                    fx.model.spec.window if fx.model.reveals_items else 0)
        # Every event's time, offset per device so that one sorted search finds each window's end.
        s, dev = fx.s, fx.devices
        self._span = float(s.ts.max() - s.ts.min() + 1.0) if len(s.ts) else 1.0
        self._t_min = float(s.ts.min()) if len(s.ts) else 0.0
        lengths = s.indptr[dev + 1] - s.indptr[dev]
        self._key_start = np.concatenate([[0], np.cumsum(lengths)])[:-1]
        self._start = s.indptr[dev]  # each device's first event (global index)
        self._before: tuple = (None, None)  # (t, _events_before(t) before the devices' ends cut it)
        self._keys = np.concatenate([s.ts[s.indptr[g]:s.indptr[g + 1]] - self._t_min + r * self._span
                                     for r, g in enumerate(dev)]) if len(dev) else np.zeros(0)

    # ---- checkpoints (fl_sim.resume) -------------------------------------------------------
    def state_bytes(self) -> bytes:
        """The shard's state (its devices and trigger), as a checkpoint file holds it."""
        buf = io.BytesIO()
        save_state(self._state(), buf)
        return buf.getvalue()

    def _state(self) -> dict:
        return {"st": self.st, "trigger": self.trigger, "booted": self.booted}

    def restore(self, source) -> None:
        """From a checkpoint file, or its bytes (checkpoints of shards on other nodes)."""
        state = load_state(io.BytesIO(source) if isinstance(source, bytes) else source)
        self.st, self.trigger, self.booted = state["st"], state["trigger"], state["booted"]
        if self.contexts is not None:
            self.contexts.clear()

    def save(self, path: str) -> None:
        save_state(self._state(), path)

    # ---- one exchange --------------------------------------------------------------------
    def exchange(self, kind: str, t0: float, t1: float, deliveries: Deliveries) -> tuple[Requests, dict, int]:
        """(requests, this exchange's metrics, devices now waiting for an answer)."""
        fx, st = self.fx, self.st
        before = {k: float(st.acc[k].sum()) for k in ("events", "scored", "ndcg", "hit")}
        clock = Clock()
        inbox.receive(fx, st, deliveries)
        clock.lap("receive")
        if not self.booted:  # the first model of every device (a shard that failed round 0: now)
            self.booted = True
            rows = np.arange(len(fx.devices))
            req = outbox.build(fx, st, rows, fx.s.split[fx.devices], np.full(len(rows), t0),
                               outbox.first_user_vectors(fx, rows), first=True)
            clock.lap("request")
            return req, clock.laps, int(st.parked.sum())
        req = self.empty
        if kind == "window":
            st.hi = np.maximum(st.pos, self._events_before(t1))
            active = np.flatnonzero(~st.parked & (st.pos < st.hi))
            if len(active):
                lo = st.pos.copy()
                clock.lap("replay")
                sc = score(fx, st, active, lo, st.hi, self.contexts, rank=False)
                clock.lap("score")
                rows, events = replay(fx, st, self.trigger, active, lo, st.hi, sc)
                clock.lap("replay")
                if len(rows):
                    at = np.searchsorted(active, rows)
                    user = sc.user[sc.offset[at] + events - lo[rows]]
                    req = outbox.build(fx, st, rows, events + 1, fx.s.ts[events], user)
                    clock.lap("request")
        after = {k: float(st.acc[k].sum()) for k in before}
        metrics = {"events": after["events"] - before["events"], "scored": after["scored"] - before["scored"],
                   "ndcg_sum": after["ndcg"] - before["ndcg"], "hit_sum": after["hit"] - before["hit"]}
        clock.lap("replay")
        return req, {**metrics, **clock.laps}, int(st.parked.sum())

    def _events_before(self, t: float) -> np.ndarray:
        """Per device, one past its last event before t (global index). A window's exchanges
        share its end, so the search runs once per window."""
        if self._before[0] != t:
            rows = np.arange(len(self.fx.devices))
            x = min(max(t - self._t_min, 0.0), self._span - 0.5)  # inside each device's stretch of keys
            at = np.searchsorted(self._keys, x + rows * self._span, side="left")
            self._before = (t, np.maximum(self._start + at - self._key_start, self._start))
        return np.minimum(self._before[1], self.st.end)

    def device_table(self) -> dict:
        """Per-device totals, for the run's tables."""
        st = self.st
        out = {"device": self.fx.devices.astype(np.int64)}
        out.update({k: v.copy() for k, v in st.acc.items()})
        out.update({f"block_{k}": st.block_events[:, k].copy() for k in range(st.block_events.shape[1])})
        return out

    def install_log(self) -> np.ndarray:
        """(device, request time, install time) of every answer received after deployment."""
        return np.concatenate(self.st.installs) if self.st.installs else np.zeros((0, 3))
