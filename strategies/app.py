"""The cloud as a Flower strategy (flwr.serverapp.strategy.Strategy, Message API).

Round 1 bootstraps every device's first model; each later round sends every shard its window
of simulated time and the sub-models answering its earlier requests, then answers all
requests of the round in one batched pass (strategies.cloud.Cloud).
"""

from __future__ import annotations

import re
import time
from typing import Iterable, Optional

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fl_sim import protocol
from fl_sim.engine import Recorder, Schedule
from fl_sim.errors import FlSimError
from fl_sim.faults import INJECTED


class CloudStrategy(Strategy):
    def __init__(self, recorder: Recorder, schedule: Schedule, deliver=None, connect_timeout_s: float = 300.0):
        self.rec, self.sched = recorder, schedule
        self.deliver = deliver  # deliver(round, per_shard) hands weights over outside the message
        self.connect_timeout_s = connect_timeout_s

    def summary(self) -> None:
        pass

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        r = server_round - 1  # round 0 is the bootstrap
        kind, t0, t1, last = self.rec.window(r)
        nodes = self._nodes(grid)
        per_shard = self.rec.deliveries_for_shards()
        vanished = (self.deliver(r, per_shard) or []) if self.deliver is not None else []
        messages = []
        for node in nodes:
            window = ConfigRecord({"kind": kind, "t0": t0, "t1": t1, "last": last, "round": r,
                                   "generations": list(self.rec.generation), "vanished": vanished})
            content = RecordDict({"window": window})
            if self.deliver is None:
                shard = self.rec.shard_of_node.get(node)
                deliveries = per_shard[shard] if shard is not None else protocol.empty_deliveries(self.rec.n_blocks)
                content["deliveries"] = protocol.to_record(deliveries)
            messages.append(Message(content, dst_node_id=node, message_type="train", group_id=str(server_round)))
        return messages

    def _nodes(self, grid: Grid) -> list[int]:
        """Every shard's node. The ServerApp can start before the SuperNodes are up; a round
        sent then would reach no shard, so wait for all of them."""
        deadline = time.monotonic() + self.connect_timeout_s
        while len(nodes := sorted(grid.get_node_ids())) < self.rec.n_shards:
            if time.monotonic() > deadline:
                raise FlSimError(f"only {len(nodes)} of {self.rec.n_shards} shard nodes connected "
                                 f"within {self.connect_timeout_s:.0f} s")
            time.sleep(0.05)
        return nodes

    def start(self, grid: Grid, timeout: float = 86_400) -> None:
        """The rounds, as Strategy.start runs them, for as many as the recorder needs (catch-up
        rounds after a failed shard; a resumed run starts where its checkpoint ended)."""
        while (r := self.rec.next_round()) is not None:
            messages = self.configure_train(r + 1, ArrayRecord(), ConfigRecord(), grid)
            self.aggregate_train(r + 1, grid.send_and_receive(messages, timeout=timeout))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        parts = []
        for reply in replies:
            if reply.has_error():  # the shard catches up next round; rebuilt first if it failed part-way
                reason = reply.error.reason
                named = re.search(r"shard=(\d+)", reason)
                if named:
                    self.rec.shard_failed(int(named.group(1)), reason[-600:], state_lost=INJECTED not in reason)
                continue  # (a shard missing without a word is rebuilt: see Recorder.collect)
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


def make_server_app(recorder: Recorder, schedule: Schedule, deliver=None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context) -> None:
        if hasattr(grid, "pull_interval"):  # the in-memory grid polls for replies; 0.1 s a round adds up
            grid.pull_interval = 0.005
        CloudStrategy(recorder, schedule, deliver).start(grid)

    return app
