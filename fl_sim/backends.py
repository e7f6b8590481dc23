"""Where the shards run: in this process, or as Flower SuperNodes on Ray.

Both backends drive the same round loop (fl_sim.engine.drive) and the same shard code
(clients.app.run_shard_exchange), so a seed gives the same results on either; each supplies
only how one exchange reaches every shard.

On Ray, a shard's state lives in a named actor (Flower hands a node's messages to any worker
of its pool). For each exchange the cloud hands every shard actor its deliveries through Ray's
object store (weights are megabytes to gigabytes; Flower's message path copies and hashes them
several times), then Flower's message carries the exchange's window; the reply carries the
shard's requests and metrics.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from pathlib import Path

from omegaconf import DictConfig

from fl_sim.cli import CONF_DIR
from fl_sim.engine import Recorder, drive
from fl_sim.faults import Faults, ShardFault


class InProcess:
    def __init__(self, cfg: DictConfig, n_shards: int):
        self.n_shards = n_shards

    def load(self, run_dir: str) -> None:
        from clients.shard import Shard

        self.run_dir = run_dir
        self.shards = [Shard(run_dir, s, self.n_shards) for s in range(self.n_shards)]
        self.faults = self.shards[0].fx.faults

    def rebuild(self, s: int, checkpoint_dir: str | None, entries: list) -> None:
        from clients.app import rebuild_shard

        self.shards[s] = rebuild_shard(self.run_dir, s, self.n_shards, checkpoint_dir, entries)

    def save_shards(self, folder: str) -> None:
        for s, shard in enumerate(self.shards):
            shard.save(f"{folder}/shard_{s}.pt")

    def restore_shards(self, folder: str) -> None:
        for s, shard in enumerate(self.shards):
            shard.restore(f"{folder}/shard_{s}.pt")

    def run(self, rec: Recorder) -> None:
        rec.rebuild = self.rebuild
        drive(rec, lambda r, k, window, inboxes: self.exchange(rec, r, k, window, inboxes))

    def exchange(self, rec: Recorder, r: int, k: int, window: tuple, inboxes: list) -> list:
        from clients.app import run_shard_exchange

        kind, t0, t1, last = window
        replies = []
        for s in range(self.n_shards):
            if k == 0 and self.faults.node_vanishes(s, r):  # injected: the node goes, with its devices' state
                self.shards[s] = None
                rec.shard_failed(s, f"node vanished (injected), round {r}", state_lost=True)
                continue
            try:
                replies.append(run_shard_exchange(self.shards[s], kind, t0, t1, inboxes[s], last, r, k))
            except ShardFault as exc:  # injected: before it touched a device, or part-way
                rec.shard_failed(s, str(exc), state_lost=exc.partway)
            except Exception as exc:  # part-way: its state is in doubt
                rec.shard_failed(s, repr(exc), state_lost=True)
        return replies

    def close(self) -> None:
        pass


class RayFlower:
    """Ray and the shard actors start at construction; the shards load the run files later."""

    def __init__(self, cfg: DictConfig, n_shards: int):
        import ray

        from clients.app import ShardActor, shard_actor_name

        self.address = cfg.sim.ray.address
        self.n_shards = n_shards
        if not ray.is_initialized():
            # Workers import the project and any user module (a custom trigger) as this process does.
            paths = [str(Path(CONF_DIR).parent), *sys.path, *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
            # MALLOC_ARENA_MAX: each thread of a shard actor would get its own malloc arena and
            # hold its share of the freed weight buffers (measured: +0.5 GB at 5,000 devices).
            ray.init(address=self.address, include_dashboard=False, logging_level=logging.ERROR,
                     runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in paths if p),
                                               "MALLOC_ARENA_MAX": "2"}})
        self.tag = uuid.uuid4().hex[:8]
        cpus = ray.cluster_resources().get("CPU", 1)
        threads = int(cfg.sim.ray.threads or max(1, int(cpus) // n_shards))
        # Calls at once: an exchange running or waiting for its deliveries, and a hand-over,
        # rebuild or checkpoint.
        actor = ray.remote(num_cpus=0, max_concurrency=4)(ShardActor)
        self.actors = [actor.options(name=shard_actor_name(self.tag, s)).remote(s, n_shards, threads)
                       for s in range(n_shards)]
        self.faults = Faults.from_cfg(cfg)
        # One Flower worker per shard: a worker only forwards its shard's message to the actor,
        # and may wait there for the exchange's deliveries (Flower sizes its pool as
        # int(cpus / per_worker)).
        self.per_worker = max(cpus / n_shards * 0.999, 0.001)

    def load(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.loading = [a.load.remote(run_dir) for a in self.actors]  # the first round waits for these

    def rebuild(self, s: int, checkpoint_dir: str | None, entries: list) -> None:
        """Shard s rebuilt in its actor (its state was lost or is in doubt). An actor that died
        for real cannot be: the run stops, and resume=true continues it from its checkpoint."""
        import ray

        ray.get(self.actors[s].rebuild.remote(self.run_dir, checkpoint_dir, entries))

    def save_shards(self, folder: str) -> None:
        import ray

        ray.get([a.save.remote(f"{folder}/shard_{s}.pt") for s, a in enumerate(self.actors)])

    def restore_shards(self, folder: str) -> None:
        import ray

        ray.get([a.restore.remote(f"{folder}/shard_{s}.pt") for s, a in enumerate(self.actors)])

    def post(self, tick: int, round_: int, k: int, window: tuple | None, per_shard: list | None) -> None:
        """Each shard's job for the ClientApp's message number `tick`, posted without waiting
        (see ShardActor.post); window None: the run is over. An injected node loss wipes the
        shard's state instead (its ClientApp fails the exchange)."""
        for s, a in enumerate(self.actors):
            if window is None:
                a.post.remote(tick, {"stop": True})
            elif k == 0 and self.faults.node_vanishes(s, round_):
                a.post.remote(tick, {"lost": True, "round": round_})
            else:
                a.post.remote(tick, {"window": window, "round": round_, "exchange": k, "deliveries": per_shard[s]})

    def run(self, rec: Recorder) -> None:
        from flwr.simulation import run_simulation

        from clients.app import make_client_app
        from strategies.app import make_server_app

        logging.getLogger("flwr").addFilter(_QuietInjected())
        rec.rebuild = self.rebuild
        run_simulation(server_app=make_server_app(rec, post=self.post),
                       client_app=make_client_app(self.tag), num_supernodes=self.n_shards,
                       backend_config={"client_resources": {"num_cpus": self.per_worker, "num_gpus": 0.0}})

    def close(self) -> None:
        import ray

        if ray.is_initialized():  # run_simulation may already have shut Ray down
            for a in self.actors:
                ray.kill(a)
            if self.address is None:
                ray.shutdown()


class _QuietInjected(logging.Filter):
    """Flower logs every ClientApp exception with its traceback; an injected fault is expected
    and counted in summary.json, so its traceback is left out of the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        from fl_sim.faults import CRASHED, INJECTED, NODE_LOST

        message = record.getMessage()
        return not any(mark in message for mark in (INJECTED, NODE_LOST, CRASHED))


BACKENDS = {"inprocess": InProcess, "ray": RayFlower}
