"""Where the shards run: in this process, or as Flower SuperNodes on Ray.

Both backends drive the same round loop (fl_sim.engine.drive) and the same shard code
(clients.app.run_shard_exchange), so a seed gives the same results on either; each supplies
only how one exchange reaches every shard.

On Ray, a shard's state lives in a named actor (Flower hands a node's messages to any worker
of its pool). For each exchange the cloud hands every shard actor its window and deliveries
through Ray's object store (weights are megabytes to gigabytes; Flower's message path copies and
hashes them several times); Flower's message is a numbered tick that runs it (several are kept
queued ahead: strategies.app.CloudStrategy), and the reply carries the shard's requests and
metrics.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig

from fl_sim.cli import CONF_DIR
from fl_sim.engine import Recorder, drive
from fl_sim.errors import FlSimError
from fl_sim.faults import Faults, ShardFault
from fl_sim.resume import shard_file


class InProcess:
    name = "inprocess"

    def __init__(self, cfg: DictConfig, n_shards: int):
        self.n_shards = n_shards

    def load(self, run_dir: str) -> None:
        from clients.shard import Shard

        self.run_dir = run_dir
        self.shards = [Shard(run_dir, s, self.n_shards) for s in range(self.n_shards)]
        self.faults = self.shards[0].fx.faults

    def rebuild(self, s: int, checkpoint_dir: str | None, entries: list) -> None:
        from clients.app import rebuild_shard

        checkpoint = str(shard_file(checkpoint_dir, s)) if checkpoint_dir is not None else None
        self.shards[s] = rebuild_shard(self.run_dir, s, self.n_shards, checkpoint, entries)

    def save_shards(self, folder: str) -> None:
        for s, shard in enumerate(self.shards):
            shard.save(str(shard_file(folder, s)))

    def restore_shards(self, folder: str) -> None:
        for s, shard in enumerate(self.shards):
            shard.restore(str(shard_file(folder, s)))

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

    def placement_report(self) -> dict:
        return {"address": None, "nodes_used": 1, "shards_per_node": [self.n_shards], "storage": "run folder"}

    def remote_peak_mb(self) -> float:
        return 0.0

    def close(self) -> None:
        pass


class RayFlower:
    """Ray and the shard actors start at construction; the shards load the run files later.

    On one machine (`sim.ray.address` null) Ray starts here and the shards read the run's
    folder. Joining a cluster, the project's code ships with the runtime environment
    (`py_modules`), and the run files and checkpoints travel through Ray's object store (or
    through `sim.storage`, a folder every node can read). Shards are spread over the nodes in
    proportion to their CPUs, each pinned to its node, with torch threads = the node's CPUs /
    its shards (or `sim.ray.threads`)."""

    name = "ray"

    def __init__(self, cfg: DictConfig, n_shards: int):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from clients.app import ShardActor, shard_actor_name

        self.address = cfg.sim.ray.address
        self.storage = cfg.sim.storage
        self.n_shards = n_shards
        if not ray.is_initialized():
            # "local": a Ray of this run's own, never a cluster that happens to run on this machine.
            ray.init(address=self.address or "local", include_dashboard=False, logging_level=logging.ERROR,
                     runtime_env=runtime_env(shipped=self.address is not None))
        self.tag = uuid.uuid4().hex[:8]
        nodes = {n["NodeID"]: n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]}
        self.placement = place(nodes, n_shards)
        on_node = {node: self.placement.count(node) for node in nodes}
        # Calls at once: an exchange running or waiting for its deliveries, and a hand-over,
        # rebuild or checkpoint.
        actor = ray.remote(num_cpus=0, max_concurrency=4)(ShardActor)
        self.actors = []
        for s, node in enumerate(self.placement):
            threads = int(cfg.sim.ray.threads or max(1, int(nodes[node]) // on_node[node]))
            self.actors.append(actor.options(name=shard_actor_name(self.tag, s),
                                             scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                               .remote(s, n_shards, threads))
        # Peak memory of every other node's Ray processes (this machine's are in the driver's tree).
        sampler = ray.remote(num_cpus=0)(NodeMemory)
        self.samplers = [] if self.address is None else [
            sampler.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
            for node in nodes]
        self.where: list = []
        self.remote_mb = 0.0
        self.faults = Faults.from_cfg(cfg)
        # One Flower worker per shard: a worker only forwards its shard's message to the actor,
        # and may wait there for the exchange's deliveries (Flower sizes its pool as
        # int(cpus / per_worker) per node).
        self.per_worker = max(sum(nodes.values()) / n_shards * 0.999, 0.001)

    def load(self, run_dir: str) -> None:
        import ray

        self.run_dir = run_dir
        if self.address is None:
            self.files = run_dir  # every node is this machine
        elif self.storage:
            self.files = str(Path(self.storage) / Path(run_dir).resolve().name / uuid.uuid4().hex[:8])
            shutil.copytree(Path(run_dir), self.files)
        else:
            from fl_sim import runfiles

            self.files = ray.put(runfiles.pack(run_dir))
        # Every shard holds its devices before the simulation's clock starts, as in-process (and
        # as the compute floor's shard does); a shard that cannot load says why here.
        try:
            ray.get([a.load.remote(self.files) for a in self.actors])
        except Exception as exc:
            raise FlSimError(f"a shard could not load the run's files: {exc}") from exc

    def rebuild(self, s: int, checkpoint_dir: str | None, entries: list) -> None:
        """Shard s rebuilt in its actor (its state was lost or is in doubt). An actor that died
        for real cannot be: the run stops, and resume=true continues it from its checkpoint."""
        import ray

        state = shard_file(checkpoint_dir, s).read_bytes() if checkpoint_dir is not None else None
        ray.get(self.actors[s].rebuild.remote(self.files, state, entries))

    def save_shards(self, folder: str) -> None:
        """On one machine the shards write their checkpoint files themselves, side by side; on
        a cluster their states come back as bytes through the object store."""
        import ray

        if self.address is None:
            ray.get([a.save.remote(str(shard_file(folder, s))) for s, a in enumerate(self.actors)])
            return
        for s, state in enumerate(ray.get([a.save.remote() for a in self.actors])):
            shard_file(folder, s).write_bytes(state)

    def restore_shards(self, folder: str) -> None:
        import ray

        ray.get([a.restore.remote(shard_file(folder, s).read_bytes()) for s, a in enumerate(self.actors)])

    def _finish(self) -> None:
        """At the run's end, while Ray is still up (Flower shuts it down when its simulation ends)."""
        import ray

        self.where = ray.get([a.where.remote() for a in self.actors])
        self.remote_mb = float(sum(ray.get([m.peak_mb.remote() for m in self.samplers]))) if self.samplers else 0.0
        ray.get([a.close.remote() for a in self.actors])  # node-local copies of the run files

    def placement_report(self) -> dict:
        """Where the shards ran: nodes used, shards per node, threads, and where their code came from."""
        where = self.where
        if not where:  # the run did not get to its end
            return {"address": self.address}
        nodes = sorted({w["node"] for w in where})
        return {"address": self.address, "nodes_used": len(nodes),
                "shards_per_node": [sum(w["node"] == n for w in where) for n in nodes],
                "threads": [w["threads"] for w in where],
                "code_shipped": all(w["code"] != str(Path(CONF_DIR).parent) for w in where),
                "storage": "run folder" if self.address is None else (self.storage or "object store")}

    def remote_peak_mb(self) -> float:
        """Summed peak memory of the cluster's nodes' Ray processes (0 on one machine, where
        they are in this process's tree)."""
        return self.remote_mb

    def post(self, tick: int, round_: int, k: int, window: tuple | None, per_shard: list | None) -> None:
        """Each shard's job for the ClientApp's message number `tick`, posted without waiting
        (see ShardActor.post); window None: no exchange for this tick (the warm-up tick before
        the first, or the run is over). An injected node loss wipes the shard's state instead
        (its ClientApp fails the exchange)."""
        for s, a in enumerate(self.actors):
            if window is None:
                a.post.remote(tick, {"stop": True})
            elif k == 0 and self.faults.node_vanishes(s, round_):
                a.post.remote(tick, {"lost": True, "round": round_})
            else:
                a.post.remote(tick, {"window": window, "round": round_, "exchange": k, "deliveries": per_shard[s]})

    def run(self, rec: Recorder) -> None:
        from flwr.simulation import run_simulation

        from clients.app import app
        from strategies.app import make_server_app

        logging.getLogger("flwr").addFilter(_QuietInjected())
        rec.rebuild = self.rebuild
        with prompt_messages():
            run_simulation(server_app=make_server_app(rec, self.post, self.tag, self._finish),
                           client_app=app, num_supernodes=self.n_shards,
                           backend_config={"client_resources": {"num_cpus": self.per_worker, "num_gpus": 0.0}})

    def close(self) -> None:
        import ray

        if ray.is_initialized():  # run_simulation may already have shut Ray down
            try:
                ray.get([a.close.remote() for a in self.actors], timeout=30)
            except Exception:  # an actor already gone: nothing of it to clean up here
                pass
            for a in [*self.actors, *self.samplers]:
                ray.kill(a)
            if self.address is None:
                ray.shutdown()


PUMP_INTERVAL_S = 0.02


def pump_messages(state, queue, nodes_mapping, f_stop) -> None:
    """In place of Flower's `vce_api.add_messages_to_queue` (flwr 1.42), which moves one
    message per node from the SuperLink's state to its workers' queue every 0.1 s: a node then
    runs at most ten exchanges a second, whatever their work (measured at 1,000 devices: every
    round took its exchanges x 0.1 s, 12.5 s of rounds for 4.4 s of shard work). This moves every
    message waiting, every 20 ms, in the order they were pushed across nodes (a message's
    `created_at`), so the ticks sent ahead keep their order: every shard's tick of an exchange
    enters the queue before any tick of a later one (strategies.app.CloudStrategy). A tick is
    sent eight exchanges before its own, so its 20 ms at most on the way are not waited for."""
    while not f_stop.is_set():
        waiting = [m for node in nodes_mapping for m in state.get_message_ins(node_id=node, limit=None)]
        for message in sorted(waiting, key=lambda m: m.metadata.created_at):
            queue.put(message)
        f_stop.wait(PUMP_INTERVAL_S)


@contextmanager
def prompt_messages():
    """Flower's simulation runtime with `pump_messages` moving the messages to its workers (the
    runtime looks the function up when it starts its thread)."""
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api.add_messages_to_queue
    vce_api.add_messages_to_queue = pump_messages
    try:
        yield
    finally:
        vce_api.add_messages_to_queue = original


def runtime_env(shipped: bool) -> dict:
    """Ray workers import the project and any user module (a custom trigger) as this process
    does: on this machine from the driver's path; on a cluster, the project's packages ship
    with the job (`py_modules`) and only the user's PYTHONPATH is passed on.
    MALLOC_ARENA_MAX: each thread of a shard actor would get its own malloc arena and hold its
    share of the freed weight buffers (measured: +0.5 GB at 5,000 devices)."""
    import clients
    import fl_sim
    import strategies

    root = str(Path(CONF_DIR).parent)
    user = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {"env_vars": {"MALLOC_ARENA_MAX": "2"}}
    if shipped:
        env["py_modules"] = [str(Path(m.__file__).parent) for m in (fl_sim, clients, strategies)]
        paths = [p for p in user if Path(p).resolve() != Path(root).resolve()]
    else:
        paths = [root, *sys.path, *user]
    if paths:
        env["env_vars"]["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def place(nodes: dict[str, float], n_shards: int) -> list[str]:
    """Each shard's node: shards go, one at a time, to the node with the most CPUs per shard
    (ties: the node id), so a node gets shards in proportion to its CPUs."""
    count = dict.fromkeys(nodes, 0)
    out = []
    for _ in range(n_shards):
        node = max(sorted(nodes), key=lambda n: max(nodes[n], 1e-9) / (count[n] + 1))
        count[node] += 1
        out.append(node)
    return out


class NodeMemory:
    """Samples the peak PSS of its node's Ray processes (the raylet and everything it started)."""

    def __init__(self):
        from fl_sim.memory import PeakMemory

        self.memory = PeakMemory(root=os.getppid()).__enter__()

    def peak_mb(self) -> float:
        return self.memory.peak_mb


class _QuietInjected(logging.Filter):
    """Flower logs every ClientApp exception with its traceback; an injected fault is expected
    and counted in summary.json, so its traceback is left out of the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        from fl_sim.faults import CRASHED, INJECTED, NODE_LOST

        message = record.getMessage()
        return not any(mark in message for mark in (INJECTED, NODE_LOST, CRASHED))


class FlowerGrid:
    """Under `flwr run`: Flower's runtime runs the SuperNodes (one shard each) and hands this
    run its Grid. The window and deliveries travel in the messages, and each shard keeps its
    state in the run's folder between exchanges (clients.app). Checkpoints and lost-shard
    rebuilds are not offered here (`python -m fl_sim.run` has them)."""

    name = "flwr run"

    def __init__(self, grid, n_shards: int):
        self.grid, self.n_shards = grid, n_shards

    def load(self, run_dir: str) -> None:
        self.run_dir = run_dir

    def run(self, rec: Recorder) -> None:
        from strategies.app import CloudStrategy

        CloudStrategy(rec, run_dir=self.run_dir).start(self.grid)

    def rebuild(self, s: int, checkpoint_dir: str | None, entries: list) -> None:
        raise FlSimError(f"shard {s} lost its state: rebuilding needs `python -m fl_sim.run` (not `flwr run`)")

    def save_shards(self, folder: str) -> None:
        raise FlSimError("checkpoints need `python -m fl_sim.run` (not `flwr run`)")

    restore_shards = save_shards

    def placement_report(self) -> dict:
        return {"address": "flwr run", "nodes_used": None, "shards_per_node": None, "storage": "run folder"}

    def remote_peak_mb(self) -> float:
        return 0.0

    def close(self) -> None:
        pass


BACKENDS = {"inprocess": InProcess, "ray": RayFlower}
