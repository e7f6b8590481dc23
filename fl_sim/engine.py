"""The round loop shared by every backend: windows of simulated time, shards, the cloud.

`drive(recorder, exchange)` is the loop; a backend supplies only `exchange`, which runs every
shard's exchange wherever the backend runs it (in this process, or through Flower on Ray).
The loop, the routing of deliveries to shards and the cloud's answers are the same for every
backend, so a seed gives the same results whichever runs it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from fl_sim.errors import FlSimError

# Wall seconds per round (rounds.parquet): each shard step summed over shards, the slowest
# shard's exchanges, and the cloud's admission and answers.
SHARD_TIMES = ("time_receive", "time_score", "time_replay", "time_request")
TIMES = (*SHARD_TIMES, "time_shard_slowest", "time_cloud")

RESUME_HINT = ". With sim.checkpoint_every > 0, resume=true continues from the last checkpoint once the cause is fixed"


@dataclass
class Schedule:
    """Windows of `round_s` simulated seconds from t0; rounds run only the windows in which
    some device has an event (`windows`, their indices). Skipping an empty window changes no
    result: every time in the simulation (answers, downloads, retries) is simulated time."""

    t0: float
    round_s: float
    windows: np.ndarray

    @property
    def rounds(self) -> int:
        return len(self.windows)

    @property
    def span_s(self) -> float:
        """Simulated time covered by the rounds run."""
        return float(self.windows[-1] + 1) * self.round_s if len(self.windows) else 0.0

    def window(self, r: int) -> tuple[float, float]:
        w = int(self.windows[r])
        return self.t0 + w * self.round_s, self.t0 + (w + 1) * self.round_s

    def truncate(self, rounds: int) -> None:
        self.windows = self.windows[:rounds]


def schedule(ts_stream: np.ndarray, round_s: float) -> Schedule:
    t0 = float(ts_stream.min())
    windows = np.unique(np.floor((ts_stream - t0) / round_s).astype(np.int64))
    return Schedule(t0=t0, round_s=round_s, windows=windows)


@dataclass
class Reply:
    """One shard's answer to an exchange: its requests, metrics, how many of its devices wait
    for an answer, and (in the last round, once none waits) its per-device table and installs."""

    shard: int
    requests: object  # fl_sim.protocol.Requests, or its arrays
    metrics: dict
    parked: int = 0
    table: dict | None = None
    installs: np.ndarray | None = None


def drive(rec: "Recorder", exchange) -> None:
    """The round loop, the same for every backend. Each round is a window of simulated time; its
    exchanges go on while some device waits for the cloud's answer (answers install within the
    window at the moment the network delivers them). `exchange(round, k, window, inboxes)`
    runs every shard's exchange wherever the backend runs it and returns their `Reply`s (a
    failed shard is reported through `rec.shard_failed` and left out). Its wall time is
    `rec.loop_s` (the simulation's time less the backend's start and stop)."""
    start = time.perf_counter()
    while (r := rec.next_round()) is not None:
        window = rec.window(r)
        k = 0
        while True:
            inboxes = rec.deliveries_for_shards()
            if not rec.collect(r, k, exchange(r, k, window, inboxes)):
                break
            k += 1
        rec.end_round(r)
    rec.loop_s = time.perf_counter() - start


class Recorder:
    """The cloud's side of the loop: windows, deliveries per shard, the cloud's answers, results.

    `cloud` is anything with `admit(parts) -> Requests`, `answer(requests) -> Deliveries`,
    `empty_deliveries()`, `state()` and `restore()`.
    """

    def __init__(self, cloud, sched: Schedule, n_shards: int, n_blocks: int, max_shard_failures: int = 5,
                 rebuildable: bool = False, keep_uploads: bool = False):
        self.cloud, self.sched, self.n_shards, self.n_blocks = cloud, sched, n_shards, n_blocks
        self.max_shard_failures = max_shard_failures
        self.pending = cloud.empty_deliveries()
        self.rounds: list[dict] = []
        self.tables: dict[int, dict] = {}
        self.installs: dict[int, np.ndarray] = {}
        self.shard_of_node: dict[int, int] = {}
        self.failed_shards = 0  # shard exchanges that failed (the shard caught up with the next one)
        self.failures_in_row = [0] * n_shards
        self.sent: list = []  # each shard's deliveries of the current exchange
        self.carry: dict[int, object] = {}  # deliveries of a failed shard, re-sent with its next exchange
        # A shard whose state was lost (its node vanished) or is in doubt (it failed part-way) is
        # rebuilt before the next exchange: its last checkpoint, then the exchanges it completed
        # since, replayed from `log` (kept when `rebuildable`, i.e. when the run saves checkpoints).
        self.lost: set[int] = set()
        self.errors: dict[int, str] = {}  # each failed shard's last error
        self._reported: set[int] = set()  # shards whose failure this exchange was reported
        self.log: list | None = [] if rebuildable else None
        self.checkpoint_dir: str | None = None  # the last checkpoint (fl_sim.resume)
        self.rebuild = None  # rebuild(shard, checkpoint_dir, entries), set by the backend
        self.nodes_lost = self.rounds_replayed = 0
        self.request_log: list[tuple[np.ndarray, np.ndarray]] = []  # (device, time) of each exchange's requests
        # (beta, h, user) each of those requests uploaded, when kept (privacy.log_uploads)
        self.upload_log: list[tuple[np.ndarray, ...]] | None = [] if keep_uploads else None
        self.progress = None
        self.loop_s: float | None = None  # wall time of the round loop (drive)
        self.on_round_end = None  # called with each round's index once it is collected (checkpoints)
        self._row: dict | None = None
        self._clock = time.perf_counter()

    def next_round(self) -> int | None:
        """The round to run next: every window in turn, then catch-up rounds while a shard
        whose last exchange failed still owes its final table; None when the run is done."""
        r = len(self.rounds)
        if r <= self.sched.rounds or len(self.tables) < self.n_shards:
            return r
        return None

    def window(self, r: int) -> tuple[str, float, float, bool]:
        """Round 0 bootstraps at t0; round r >= 1 replays window r-1; a catch-up round after
        the last window replays nothing new (t0 = t1 = the end)."""
        if r == 0:
            return "bootstrap", self.sched.t0, self.sched.t0, self.sched.rounds == 0
        if r > self.sched.rounds:
            end = self.sched.t0 + self.sched.span_s
            return "window", end, end, True
        t0, t1 = self.sched.window(r - 1)
        return "window", t0, t1, r == self.sched.rounds

    def shard_failed(self, shard: int, error: str, state_lost: bool) -> None:
        """A shard's exchange failed; `state_lost`: its devices' state is gone or in doubt."""
        self.errors[shard] = error
        self._reported.add(shard)
        if state_lost:
            self.lost.add(shard)

    def _rebuild(self, s: int) -> None:
        if self.log is None or self.rebuild is None:
            raise FlSimError(f"shard {s} lost its devices' state ({self.errors.get(s, 'no reply')}); "
                             "with sim.checkpoint_every > 0 it is rebuilt and the run goes on")
        entries = [(r, k, window, sent[s]) for r, k, window, sent, answered in self.log if s in answered]
        try:
            self.rebuild(s, self.checkpoint_dir, entries)
        except Exception as exc:
            raise FlSimError(f"shard {s} could not be rebuilt after {self.errors.get(s, 'a failure')}: "
                             f"{exc!r}{RESUME_HINT}") from exc
        self.nodes_lost += 1
        self.rounds_replayed += len({e[0] for e in entries})
        self.lost.discard(s)

    def checkpointed(self, folder: str) -> None:
        self.checkpoint_dir = folder
        if self.log is not None:
            self.log.clear()

    def deliveries_for_shards(self) -> list:
        for s in sorted(self.lost):
            self._rebuild(s)
        parts = self.pending.route(self.n_shards)
        self.pending = self.cloud.empty_deliveries()  # routed (copies): free it now
        for s, carried in self.carry.items():
            parts[s] = type(carried).concat([carried, parts[s]])
        self.carry, self.sent = {}, parts
        return parts

    def collect(self, r: int, k: int, replies: list[Reply]) -> bool:
        """The replies of every shard that answered exchange k of round r. A shard missing (its
        ClientApp raised, or its node did not answer) catches up with the next exchange: its
        deliveries are re-sent then. Returns whether the round needs another exchange."""
        replies = sorted(replies, key=lambda p: p.shard)
        answered = {p.shard for p in replies}
        window = self.window(r)
        if self.log is not None:
            self.log.append((r, k, window, self.sent, answered))
        for s in range(self.n_shards):
            if s in answered:
                self.failures_in_row[s] = 0
                continue
            if s not in self._reported:  # no reply and no word why: assume the worst
                self.shard_failed(s, "no reply", state_lost=True)
            self.failed_shards += 1
            self.failures_in_row[s] += 1
            if self.sent:
                self.carry[s] = self.sent[s]
            if self.failures_in_row[s] >= self.max_shard_failures:
                raise FlSimError(f"shard {s} failed {self.failures_in_row[s]} exchanges in a row (round {r}; "
                                 f"faults.max_shard_failures={self.max_shard_failures}); last error: "
                                 f"{self.errors.get(s)}{RESUME_HINT}")
        self._reported = set()
        cloud_start = time.perf_counter()
        requests = self.cloud.admit([p.requests for p in replies])
        asked = ~requests.first
        if asked.any():
            self.request_log.append((requests.device[asked], requests.time[asked]))
            if self.upload_log is not None:
                self.upload_log.append((requests.beta[asked], requests.h[asked], requests.user[asked],
                                        requests.items[asked]))
        self.pending = self.cloud.answer(requests)
        kind, t0, t1, _ = window
        if self._row is None:
            self._row = {"round": r, "kind": kind, "t0": t0, "t1": t1, "exchanges": 0, "requests": 0, "delivered": 0,
                         "events": 0.0, "scored": 0.0, "ndcg_sum": 0.0, "hit_sum": 0.0,
                         **{key: 0.0 for key in TIMES}}
        row = self._row
        row["exchanges"] += 1
        row["requests"] += int(asked.sum())
        row["delivered"] += len(self.pending)
        for key in ("events", "scored", "ndcg_sum", "hit_sum", *SHARD_TIMES):
            row[key] += float(sum(p.metrics.get(key, 0.0) for p in replies))
        # Shards run side by side: the exchange waited for the slowest one.
        row["time_shard_slowest"] += max((sum(p.metrics.get(k, 0.0) for k in SHARD_TIMES) for p in replies),
                                         default=0.0)
        row["time_cloud"] += time.perf_counter() - cloud_start
        for p in replies:
            if p.table is not None:
                self.tables[p.shard] = p.table
                self.installs[p.shard] = p.installs
        failed = len(answered) < self.n_shards
        return failed or any(p.parked for p in replies) or len(self.pending) > 0 or len(self.pending.refused) > 0

    def end_round(self, r: int) -> None:
        row, self._row = self._row, None
        now = time.perf_counter()
        row["wall_s"], self._clock = now - self._clock, now  # since the previous round ended
        self.rounds.append(row)
        if self.progress:
            self.progress(row)
        if self.on_round_end:
            self.on_round_end(r)

    # ---- checkpoints (fl_sim.resume) --------------------------------------------------------
    STATE = ("pending", "rounds", "tables", "installs", "failed_shards", "failures_in_row", "carry", "request_log",
             "upload_log", "nodes_lost", "rounds_replayed")

    def state(self) -> dict:
        return {"recorder": {k: getattr(self, k) for k in self.STATE}, "cloud": self.cloud.state()}

    def restore(self, state: dict) -> None:
        for k in self.STATE:
            setattr(self, k, state["recorder"][k])
        self.cloud.restore(state["cloud"])

    def request_table(self) -> dict[str, np.ndarray]:
        """Every request of the run (bootstrap excluded): device, time."""
        if not self.request_log:
            return {"device": np.zeros(0, np.int64), "time": np.zeros(0)}
        return {"device": np.concatenate([d for d, _ in self.request_log]),
                "time": np.concatenate([t for _, t in self.request_log])}

    def upload_table(self) -> dict[str, np.ndarray] | None:
        """What each request of `request_table()` uploaded (same rows), when kept."""
        if not self.upload_log:
            return None
        return {name: np.concatenate([u[i] for u in self.upload_log])
                for i, name in enumerate(("beta", "h", "user", "items"))}

    def device_table(self) -> dict[str, np.ndarray]:
        tables = [self.tables[s] for s in sorted(self.tables)]
        merged = {k: np.concatenate([t[k] for t in tables]) for k in tables[0]}
        order = np.argsort(merged["device"])
        return {k: v[order] for k, v in merged.items()}

    def install_table(self) -> np.ndarray:
        """(device, request time, install time) of every answer installed after deployment."""
        parts = [self.installs[s] for s in sorted(self.installs) if self.installs[s] is not None]
        return np.concatenate(parts) if parts else np.zeros((0, 3))
