"""The devices as a Flower ClientApp: each SuperNode simulates one shard of the fleet.

The message in carries the round's window and the shard's deliveries; the reply carries its
requests and metrics (and, in the last round, its per-device table). Shard state persists
across rounds in a named Ray actor per shard (Flower hands a node's messages to any worker of
its pool, so the state cannot live in the worker).
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_sim import protocol


def shard_actor_name(tag: str, shard: int) -> str:
    return f"fl_sim-{tag}-shard-{shard}"


def make_client_app(tag: str) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        import ray

        shard = int(context.node_config["partition-id"])
        window = msg.content["window"]
        actor = ray.get_actor(shard_actor_name(tag, shard))
        deliveries = protocol.from_record(msg.content["deliveries"])
        requests, metrics, table = ray.get(actor.call.remote(window["kind"], float(window["t0"]),
                                                            float(window["t1"]), deliveries, bool(window["last"])))
        content = {"requests": protocol.to_record(requests),
                   "metrics": MetricRecord({**metrics, "shard": shard}),
                   "info": ConfigRecord({"shard": shard})}
        if table is not None:
            content["devices"] = protocol.to_record(table)
        return Message(RecordDict(content), reply_to=msg)

    return app


def run_shard_round(shard, kind: str, t0: float, t1: float, deliveries: dict, last: bool):
    """One round of one shard, the same for every backend."""
    if kind == "bootstrap":
        requests, metrics = shard.bootstrap(t0), {}
    else:
        requests, metrics = shard.step(t0, t1, deliveries)
    return requests, metrics, (shard.device_table() if last else None)


class ShardActor:
    """Holds one shard between rounds (wrapped with ray.remote by the Ray backend)."""

    def __init__(self, run_dir: str, shard: int, n_shards: int, threads: int = 1):
        import torch

        from clients.shard import Shard

        torch.set_num_threads(threads)
        self.shard = Shard(run_dir, shard, n_shards)

    def call(self, kind: str, t0: float, t1: float, deliveries: dict, last: bool):
        return run_shard_round(self.shard, kind, t0, t1, deliveries, last)
