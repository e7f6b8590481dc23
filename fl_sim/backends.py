"""Where the shards run: in this process, or as Flower SuperNodes on Ray.

Both backends drive the same round loop (fl_sim.engine.Recorder) and the same shard code
(clients.app.run_shard_round), so a seed gives the same results on either.

On Ray, a shard's state lives in a named actor (Flower hands a node's messages to any worker
of its pool). Each round the cloud hands every shard actor its deliveries through Ray's object
store (weights are megabytes to gigabytes; Flower's message path copies and hashes them
several times), then Flower's message carries the round's window; the reply carries the
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
from fl_sim.engine import Recorder
from fl_sim.errors import FlSimError
from fl_sim.resume import RESUME_HINT


class InProcess:
    def __init__(self, cfg: DictConfig, n_shards: int):
        self.n_shards = n_shards

    def load(self, run_dir: str) -> None:
        from clients.shard import Shard

        self.shards = [Shard(run_dir, s, self.n_shards) for s in range(self.n_shards)]

    def save_shards(self, folder: str) -> None:
        for s, shard in enumerate(self.shards):
            shard.save(f"{folder}/shard_{s}.pt")

    def restore_shards(self, folder: str) -> None:
        for s, shard in enumerate(self.shards):
            shard.restore(f"{folder}/shard_{s}.pt")

    def run(self, rec: Recorder) -> None:
        from clients.app import run_shard_round

        from fl_sim.faults import ShardFault

        while (r := rec.next_round()) is not None:
            kind, t0, t1, last = rec.window(r)
            per_shard = rec.deliveries_for_shards()
            parts = []
            for s in range(self.n_shards):
                try:
                    parts.append((s, *run_shard_round(self.shards[s], kind, t0, t1, per_shard[s], last, r)))
                except ShardFault:
                    pass  # missing from this round: the recorder counts it, the shard catches up
                except Exception as exc:  # a real failure: the shard's state is in doubt, stop here
                    raise FlSimError(f"device shard {s} failed in round {r}: {exc!r}{RESUME_HINT}") from exc
            rec.collect(r, parts)

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
            ray.init(address=self.address, include_dashboard=False, logging_level=logging.ERROR,
                     runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}})
        self.tag = uuid.uuid4().hex[:8]
        cpus = ray.cluster_resources().get("CPU", 1)
        threads = int(cfg.sim.ray.threads or max(1, int(cpus) // n_shards))
        actor = ray.remote(num_cpus=0, max_concurrency=2)(ShardActor)
        self.actors = [actor.options(name=shard_actor_name(self.tag, s)).remote(s, n_shards, threads)
                       for s in range(n_shards)]
        # One Flower worker per shard: a worker only forwards its shard's message to the actor.
        self.per_worker = max(cpus / n_shards, 0.01)

    def load(self, run_dir: str) -> None:
        self.loading = [a.load.remote(run_dir) for a in self.actors]  # the first round waits for these

    def save_shards(self, folder: str) -> None:
        import ray

        ray.get([a.save.remote(f"{folder}/shard_{s}.pt") for s, a in enumerate(self.actors)])

    def restore_shards(self, folder: str) -> None:
        import ray

        ray.get([a.restore.remote(f"{folder}/shard_{s}.pt") for s, a in enumerate(self.actors)])

    def deliver(self, round_: int, per_shard: list[dict]) -> None:
        """Posted without waiting: the shard's round waits for them (see ShardActor.call)."""
        for a, d in zip(self.actors, per_shard):
            a.deliver.remote(round_, d)

    def run(self, rec: Recorder) -> None:
        from flwr.simulation import run_simulation

        from clients.app import make_client_app
        from strategies.app import make_server_app

        logging.getLogger("flwr").addFilter(_QuietInjected())
        run_simulation(server_app=make_server_app(rec, rec.sched, deliver=self.deliver),
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
    """Flower logs every ClientApp exception with its traceback; an injected shard fault is
    expected and counted in summary.json, so its traceback is left out of the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        from fl_sim.faults import INJECTED

        return INJECTED not in record.getMessage()


BACKENDS = {"inprocess": InProcess, "ray": RayFlower}
