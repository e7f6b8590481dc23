"""The devices as a Flower ClientApp: each SuperNode simulates one shard of the fleet.

The message in carries the round's window and the shard's deliveries; the reply carries its
requests and metrics (and, in the last round, its per-device table). Shard state persists
across rounds in a named Ray actor per shard (Flower hands a node's messages to any worker of
its pool, so the state cannot live in the worker).
"""

from __future__ import annotations

import threading

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_sim import protocol
from fl_sim.faults import CRASHED, INJECTED, NODE_LOST, ShardFault


def shard_actor_name(tag: str, shard: int) -> str:
    return f"fl_sim-{tag}-shard-{shard}"


_actors: dict = {}  # shard actor handles, looked up once per worker process


def make_client_app(tag: str) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        import ray

        shard = int(context.node_config["partition-id"])
        window = msg.content["window"]
        if shard in list(window["vanished"]):  # an injected node loss: its actor's state is wiped
            raise RuntimeError(f"shard={shard}: {NODE_LOST}, round {int(window['round'])}")
        name = shard_actor_name(tag, shard)
        # Deliveries come inline, or were handed to the shard's actor through Ray's object store.
        deliveries = protocol.from_record(msg.content["deliveries"]) if "deliveries" in msg.content else None
        try:
            actor = _actors.get(name) or _actors.setdefault(name, ray.get_actor(name))
            requests, metrics, table = ray.get(actor.call.remote(
                window["kind"], float(window["t0"]), float(window["t1"]), bool(window["last"]),
                int(window["round"]), deliveries))
        except Exception as exc:  # the error reply names the shard (see strategies.app)
            raise RuntimeError(f"shard={shard}: {exc}") from exc
        content = {"requests": protocol.to_record(requests),
                   "metrics": MetricRecord({**metrics, "shard": shard}),
                   "info": ConfigRecord({"shard": shard})}
        if table is not None:
            content["devices"] = protocol.to_record(table)
        return Message(RecordDict(content), reply_to=msg)

    return app


def run_shard_round(shard, kind: str, t0: float, t1: float, deliveries: dict, last: bool, round_: int):
    """One round of one shard, the same for every backend. An injected fault (faults.shard_fail)
    raises here, before the shard touches any device (or after the round, `shard_fail_partway`);
    a shard whose bootstrap failed bootstraps at the start of its next round."""
    fails = shard.faults.shard_fails(shard.index, round_)
    if fails and not shard.faults.shard_fail_partway:
        raise ShardFault(f"{INJECTED}: shard {shard.index}, round {round_}")
    if kind == "bootstrap":
        requests, metrics = shard.bootstrap(t0), {}
    else:
        late = shard.bootstrap(t0) if not shard.booted else None
        requests, metrics = shard.step(t0, t1, deliveries)
        if late is not None:
            requests = protocol.concat([late, requests])
    if fails:
        raise ShardFault(f"{CRASHED}: shard {shard.index}, round {round_}", partway=True)
    return requests, metrics, (shard.device_table() if last else None)


def rebuild_shard(run_dir: str, index: int, n_shards: int, checkpoint_dir: str | None, entries: list):
    """A shard as it was after its last completed round: its state at the last checkpoint (or
    at the start), then each round it completed since, replayed with the deliveries it got
    then (outputs already taken are dropped; every draw is keyed, so the replay is exact)."""
    from clients.shard import Shard

    shard = Shard(run_dir, index, n_shards)
    if checkpoint_dir is not None:
        shard.restore(f"{checkpoint_dir}/shard_{index}.pt")
    for r, (kind, t0, t1, _), deliveries in entries:
        run_shard_round(shard, kind, t0, t1, deliveries, False, r)
    return shard


class ShardActor:
    """Holds one shard between rounds (wrapped with ray.remote by the Ray backend)."""

    def __init__(self, shard: int, n_shards: int, threads: int = 1):
        import warnings

        import torch

        torch.set_num_threads(threads)
        # Arrays from Ray's object store are read-only; the shard never writes to them.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        self.index, self.n_shards = shard, n_shards
        self.mailbox: dict[int, dict] = {}
        self.posted = threading.Condition()
        self.shard = None

    def load(self, run_dir: str) -> None:
        from clients.shard import Shard

        shard = Shard(run_dir, self.index, self.n_shards)
        with self.posted:
            self.shard = shard
            self.posted.notify_all()

    def lose(self) -> None:
        """An injected node loss: the shard's state is gone (the actor stays, to be rebuilt)."""
        with self.posted:
            self.shard = None
            self.mailbox.clear()

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

    def deliver(self, round_: int, deliveries: dict) -> None:
        with self.posted:
            self.mailbox[round_] = deliveries
            self.posted.notify_all()

    def call(self, kind: str, t0: float, t1: float, last: bool, round_: int, deliveries: dict | None = None,
             wait_s: float = 600.0):
        """Run a round. Without inline deliveries, wait for the cloud's hand-over of this
        round's (posted concurrently: the actor runs two calls at a time)."""
        with self.posted:
            if not self.posted.wait_for(lambda: self.shard is not None, timeout=wait_s):
                raise RuntimeError(f"shard {self.index}: not loaded within {wait_s:.0f} s")
            if deliveries is None:
                if not self.posted.wait_for(lambda: round_ in self.mailbox, timeout=wait_s):
                    raise RuntimeError(f"shard {self.index}: no deliveries for round {round_} within {wait_s:.0f} s")
                deliveries = self.mailbox.pop(round_)
        return run_shard_round(self.shard, kind, t0, t1, deliveries, last, round_)
