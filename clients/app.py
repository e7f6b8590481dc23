"""The devices as a Flower ClientApp: each SuperNode simulates one shard of the fleet.

The message in carries an exchange of a round's window (and, inline or through Ray's object
store, the shard's deliveries); the reply carries its requests, metrics, how many of its
devices wait for an answer, and, in the last round, its per-device table. Shard state persists
across exchanges in a named Ray actor per shard (Flower hands a node's messages to any worker
of its pool, so the state cannot live in the worker).
"""

from __future__ import annotations

import threading

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_sim import protocol
from fl_sim.engine import Reply
from fl_sim.faults import CRASHED, INJECTED, NODE_LOST, ShardFault
from fl_sim.protocol import Deliveries


def shard_actor_name(tag: str, shard: int) -> str:
    return f"fl_sim-{tag}-shard-{shard}"


_actors: dict = {}  # shard actor handles, looked up once per worker process


def make_client_app(tag: str) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        import ray

        shard = int(context.node_config["partition-id"])
        name = shard_actor_name(tag, shard)
        try:
            actor = _actors.get(name) or _actors.setdefault(name, ray.get_actor(name))
            if "tick" in msg.content:  # the exchange's window and deliveries were posted to the actor
                reply = ray.get(actor.call.remote(int(msg.content["tick"]["n"])))
            else:  # the window and deliveries travel in the message
                window = msg.content["window"]
                deliveries = Deliveries.from_arrays(protocol.from_record(msg.content["deliveries"]))
                reply = ray.get(actor.run.remote(window["kind"], float(window["t0"]), float(window["t1"]),
                                                 bool(window["last"]), int(window["round"]), int(window["exchange"]),
                                                 deliveries))
        except Exception as exc:  # the error reply names the shard (see strategies.app)
            raise RuntimeError(f"shard={shard}: {exc}") from exc
        if reply is None:  # the run is over: nothing was posted for this tick
            return Message(RecordDict({"info": ConfigRecord({"shard": shard, "stop": True})}), reply_to=msg)
        content = {"requests": protocol.to_record(reply.requests.arrays()),
                   "metrics": MetricRecord({**reply.metrics, "shard": shard}),
                   "info": ConfigRecord({"shard": shard, "parked": reply.parked})}
        if reply.table is not None:
            content["devices"] = protocol.to_record(reply.table)
            content["installs"] = protocol.to_record({"installs": reply.installs})
        return Message(RecordDict(content), reply_to=msg)

    return app


def run_shard_exchange(shard, kind: str, t0: float, t1: float, deliveries, last: bool, round_: int,
                       k: int) -> Reply:
    """One exchange of one shard, the same for every backend. An injected fault
    (faults.shard_fail) raises at a round's first exchange, before the shard touches any device
    (or after it, `shard_fail_partway`); the shard catches up with the next exchange."""
    faults = shard.fx.faults
    fails = k == 0 and faults.shard_fails(shard.index, round_)
    if fails and not faults.shard_fail_partway:
        raise ShardFault(f"{INJECTED}: shard {shard.index}, round {round_}")
    requests, metrics, parked = shard.exchange(kind, t0, t1, deliveries)
    if fails:
        raise ShardFault(f"{CRASHED}: shard {shard.index}, round {round_}", partway=True)
    done = last and parked == 0
    return Reply(shard=shard.index, requests=requests, metrics=metrics, parked=parked,
                 table=shard.device_table() if done else None, installs=shard.install_log() if done else None)


def rebuild_shard(run_dir: str, index: int, n_shards: int, checkpoint_dir: str | None, entries: list):
    """A shard as it was after its last completed exchange: its state at the last checkpoint (or
    at the start), then each exchange it completed since, replayed with the deliveries it got
    then (outputs already taken are dropped; every draw is keyed, so the replay is exact)."""
    from clients.shard import Shard

    shard = Shard(run_dir, index, n_shards)
    if checkpoint_dir is not None:
        shard.restore(f"{checkpoint_dir}/shard_{index}.pt")
    for r, k, (kind, t0, t1, _), deliveries in entries:
        run_shard_exchange(shard, kind, t0, t1, deliveries, False, r, k)
    return shard


class ShardActor:
    """Holds one shard between exchanges (wrapped with ray.remote by the Ray backend)."""

    def __init__(self, shard: int, n_shards: int, threads: int = 1):
        import warnings

        import torch

        torch.set_num_threads(threads)
        # Arrays from Ray's object store are read-only; the shard never writes to them.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        self.index, self.n_shards = shard, n_shards
        self.mailbox: dict[tuple, Deliveries] = {}
        self.posted = threading.Condition()
        self.shard = None

    def load(self, run_dir: str) -> None:
        from clients.shard import Shard

        shard = Shard(run_dir, self.index, self.n_shards)
        with self.posted:
            self.shard = shard
            self.posted.notify_all()

    def rebuild(self, run_dir: str, checkpoint_dir: str | None, entries: list) -> None:
        shard = rebuild_shard(run_dir, self.index, self.n_shards, checkpoint_dir, entries)
        with self.posted:
            self.shard = shard
            self.posted.notify_all()

    def _loaded(self, wait_s: float = 600.0):
        with self.posted:
            if not self.posted.wait_for(lambda: self.shard is not None, timeout=wait_s):
                raise RuntimeError(f"shard {self.index}: not loaded within {wait_s:.0f} s")
        return self.shard

    def save(self, path: str) -> None:
        self._loaded().save(path)

    def restore(self, path: str) -> None:
        self._loaded().restore(path)

    def post(self, tick: int, job: dict) -> None:
        """The exchange the ClientApp's message number `tick` runs: {"window", "round",
        "exchange", "deliveries"}, {"lost": True} for an injected node loss (the shard's state is
        wiped; the actor stays, to be rebuilt), or {"stop": True} once the run is over."""
        with self.posted:
            if job.get("lost"):
                self.shard = None
                self.mailbox.clear()
            self.mailbox[tick] = job
            self.posted.notify_all()

    def call(self, tick: int, wait_s: float = 600.0) -> Reply | None:
        """Run the exchange posted for `tick` (posted concurrently: the message may come first)."""
        with self.posted:
            if not self.posted.wait_for(lambda: tick in self.mailbox, timeout=wait_s):
                raise RuntimeError(f"shard {self.index}: nothing posted for exchange {tick} within {wait_s:.0f} s")
            job = self.mailbox.pop(tick)
        if job.get("stop"):
            return None
        if job.get("lost"):
            raise RuntimeError(f"{NODE_LOST}, round {job['round']}")
        kind, t0, t1, last = job["window"]
        return self.run(kind, t0, t1, last, job["round"], job["exchange"], job["deliveries"], wait_s)

    def run(self, kind: str, t0: float, t1: float, last: bool, round_: int, k: int, deliveries: Deliveries,
            wait_s: float = 600.0) -> Reply:
        self._loaded(wait_s)
        return run_shard_exchange(self.shard, kind, t0, t1, deliveries, last, round_, k)
