"""The cloud as a Flower strategy (flwr.serverapp.strategy.Strategy, Message API).

Round 1 bootstraps every device's first model; each later round sends every shard its window
of simulated time and the sub-models answering its earlier requests, then answers all
requests of the round in one batched pass (strategies.cloud.Cloud).
"""

from __future__ import annotations

from typing import Iterable, Optional

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fl_sim import protocol
from fl_sim.engine import Recorder, Schedule


class CloudStrategy(Strategy):
    def __init__(self, recorder: Recorder, schedule: Schedule):
        self.rec, self.sched = recorder, schedule
        self.node_of_shard: dict[int, int] = {}

    def summary(self) -> None:
        pass

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        r = server_round - 1  # round 0 is the bootstrap
        kind, t0, t1, last = self.rec.window(r)
        nodes = sorted(grid.get_node_ids())
        per_shard = self.rec.deliveries_for_shards()
        messages = []
        for node in nodes:
            shard = self.rec.shard_of_node.get(node)
            deliveries = per_shard[shard] if shard is not None else protocol.empty_deliveries(self.rec.n_blocks)
            content = RecordDict({"window": ConfigRecord({"kind": kind, "t0": t0, "t1": t1, "last": last}),
                                  "deliveries": protocol.to_record(deliveries)})
            messages.append(Message(content, dst_node_id=node, message_type="train", group_id=str(server_round)))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        parts = []
        for reply in replies:
            if reply.has_error():
                self.rec.failed_shards += 1
                continue
            shard = int(reply.content["info"]["shard"])
            self.rec.shard_of_node[reply.metadata.src_node_id] = shard
            metrics = dict(reply.content["metrics"])
            metrics.pop("shard", None)
            tables = protocol.from_record(reply.content["devices"]) if "devices" in reply.content else None
            parts.append((shard, protocol.from_record(reply.content["requests"]), metrics, tables))
        self.rec.collect(server_round - 1, parts)
        return None, None

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round, replies) -> Optional[MetricRecord]:
        return None


def make_server_app(recorder: Recorder, schedule: Schedule) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context) -> None:
        CloudStrategy(recorder, schedule).start(grid, ArrayRecord(), num_rounds=schedule.rounds + 1, timeout=86_400)

    return app
