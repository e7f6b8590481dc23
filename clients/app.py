"""The devices as a Flower ClientApp: each SuperNode simulates one shard of the fleet.

The message in carries an exchange of a round's window (and, inline or through Ray's object
store, the shard's deliveries); the reply carries its requests, metrics, how many of its
devices wait for an answer, and, in the last round, its per-device table. Flower hands a
node's messages to any worker of its pool, so the shard's state cannot live in the worker: it
persists in a named Ray actor per shard (`python -m fl_sim.run`), or in the run's folder
(`flwr run`, which starts the module-level `app` declared in pyproject.toml).
"""

from __future__ import annotations

import threading
from pathlib import Path

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_sim import protocol
from fl_sim.engine import Reply
from fl_sim.faults import CRASHED, INJECTED, NODE_LOST, ShardFault
from fl_sim.protocol import Deliveries


def shard_actor_name(tag: str, shard: int) -> str:
    return f"fl_sim-{tag}-shard-{shard}"


_actors: dict = {}  # shard actor handles, looked up once per worker process
_held: dict = {}  # (run folder, shard) -> (Shard, the exchange it last ran), under `flwr run`

app = ClientApp()


@app.train()
def train(msg: Message, context) -> Message:
    """One exchange of this node's shard. Under `python -m fl_sim.run` on Ray the message is a
    tick naming the run's shard actor, which holds the shard and was handed the exchange's
    window and deliveries (ShardActor.post). Under `flwr run` the window and deliveries come in
    the message, and the shard's state is kept in the run's folder between exchanges."""
    shard = int(context.node_config["partition-id"])
    try:
        if "tick" in msg.content:
            reply = _by_actor(msg.content["tick"], shard)
        else:
            reply = _in_folder(msg.content["window"], shard, int(context.node_config["num-partitions"]),
                               Deliveries.from_arrays(protocol.from_record(msg.content["deliveries"])))
    except Exception as exc:  # the error reply names the shard (see strategies.app)
        raise RuntimeError(f"shard={shard}: {exc}") from exc
    if reply is None:  # no exchange for this tick (the warm-up tick, or the run is over)
        return Message(RecordDict({"info": ConfigRecord({"shard": shard, "stop": True})}), reply_to=msg)
    content = {"requests": protocol.to_record(reply.requests.arrays()),
               "metrics": MetricRecord({**reply.metrics, "shard": shard}),
               "info": ConfigRecord({"shard": shard, "parked": reply.parked})}
    if reply.table is not None:
        content["devices"] = protocol.to_record(reply.table)
        content["installs"] = protocol.to_record({"installs": reply.installs})
    return Message(RecordDict(content), reply_to=msg)


def _by_actor(tick, shard: int) -> Reply | None:
    import ray

    name = shard_actor_name(str(tick["tag"]), shard)
    actor = _actors.get(name) or _actors.setdefault(name, ray.get_actor(name))
    return ray.get(actor.call.remote(int(tick["n"])))


def _in_folder(window, shard: int, n_shards: int, deliveries: Deliveries) -> Reply:
    """Flower may hand a node's messages to any of its workers: a worker that did not run this
    shard's previous exchange loads the shard's state from the run's folder, and every
    exchange saves it there."""
    from clients.shard import Shard
    from fl_sim.resume import shard_file

    run_dir, seq = str(window["run"]), int(window["seq"])
    state = shard_file(Path(run_dir) / "state", shard)
    held = _held.pop((run_dir, shard), None)
    if held is not None and held[1] == seq - 1:
        s = held[0]
    else:
        s = Shard(run_dir, shard, n_shards)
        if state.exists():
            s.restore(str(state))
    reply = run_shard_exchange(s, str(window["kind"]), float(window["t0"]), float(window["t1"]), deliveries,
                               bool(window["last"]), int(window["round"]), int(window["exchange"]))
    state.parent.mkdir(exist_ok=True)
    s.save(str(state))
    _held[(run_dir, shard)] = (s, seq)
    return reply


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


def rebuild_shard(run_dir: str, index: int, n_shards: int, checkpoint, entries: list):
    """A shard as it was after its last completed exchange: its state at the last checkpoint
    (its file or bytes; None: the start), then each exchange it completed since, replayed with
    the deliveries it got then (outputs already taken are dropped; every draw is keyed, so the
    replay is exact)."""
    from clients.shard import Shard

    shard = Shard(run_dir, index, n_shards)
    if checkpoint is not None:
        shard.restore(checkpoint)
    for r, k, (kind, t0, t1, _), deliveries in entries:
        run_shard_exchange(shard, kind, t0, t1, deliveries, False, r, k)
    return shard


class ShardActor:
    """Holds one shard between exchanges (wrapped with ray.remote by the Ray backend). Its run
    files come as a folder this node can read, or as bytes through Ray's object store (written
    to a node-local folder); its checkpoints leave and return as bytes, so no node needs the
    driver's disk."""

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
        # A threaded actor runs its calls in any order: a rebuild may finish before the first
        # load does. Once rebuilt, the shard is never replaced by that load's fresh one (it would
        # silently undo every exchange the rebuilt shard ran since).
        self.rebuilt = False
        self.load_error: str | None = None
        self.local: str | None = None  # a node-local copy of the run files, removed by close()
        self.unpacking = threading.Lock()

    def _run_dir(self, run) -> str:
        if isinstance(run, str):
            return run
        with self.unpacking:  # a load and a rebuild may ask at once: one copy
            if self.local is None:
                import tempfile

                from fl_sim import runfiles

                self.local = runfiles.unpack(run, tempfile.mkdtemp(prefix=f"fl_sim-shard{self.index}-"))
        return self.local

    def where(self) -> dict:
        """Where this shard runs: its Ray node, its torch threads, the folder its code came from."""
        import os

        import ray
        import torch

        import clients

        return {"node": ray.get_runtime_context().get_node_id(), "threads": torch.get_num_threads(),
                "code": os.path.dirname(os.path.dirname(os.path.abspath(clients.__file__)))}

    def load(self, run) -> None:
        from clients.shard import Shard

        try:
            shard = Shard(self._run_dir(run), self.index, self.n_shards)
        except Exception as exc:  # told to whoever waits for the shard, not left to a timeout
            with self.posted:
                self.load_error = repr(exc)
                self.posted.notify_all()
            raise
        with self.posted:
            if not self.rebuilt:
                self.shard = shard
            self.posted.notify_all()

    def rebuild(self, run, checkpoint: bytes | None, entries: list) -> None:
        shard = rebuild_shard(self._run_dir(run), self.index, self.n_shards, checkpoint, entries)
        with self.posted:
            self.shard, self.rebuilt, self.load_error = shard, True, None
            self.posted.notify_all()

    def _loaded(self, wait_s: float = 600.0):
        with self.posted:
            if not self.posted.wait_for(lambda: self.shard is not None or self.load_error, timeout=wait_s):
                raise RuntimeError(f"shard {self.index}: not loaded within {wait_s:.0f} s")
            if self.shard is None:
                raise RuntimeError(f"shard {self.index} could not load its run files: {self.load_error}")
        return self.shard

    def save(self, path: str | None = None) -> bytes | None:
        """The shard's state: into the file `path` (on a disk this node shares with the driver),
        else as bytes for the driver to write."""
        if path is not None:
            self._loaded().save(path)
            return None
        return self._loaded().state_bytes()

    def restore(self, state: bytes) -> None:
        self._loaded().restore(state)

    def close(self) -> None:
        if self.local is not None:
            import shutil

            shutil.rmtree(self.local, ignore_errors=True)
            self.local = None

    def post(self, tick: int, job: dict) -> None:
        """The exchange the ClientApp's message number `tick` runs: {"window", "round",
        "exchange", "deliveries"}, {"lost": True} for an injected node loss (the shard's state is
        wiped; the actor stays, to be rebuilt), or {"stop": True}: no exchange for this tick (the
        warm-up tick before the first, or the run is over)."""
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
