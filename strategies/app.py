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
    """`deliver(round, per_shard)` hands each shard its deliveries outside Flower's messages
    (through Ray's object store); then a round's message carries only its window, and is sent
    one round ahead: the shard's ClientApp starts and waits in its actor for the deliveries,
    so Flower's message polling overlaps the previous round. `vanishing(round)`: the shards an
    injected node loss takes away in a round."""

    def __init__(self, recorder: Recorder, schedule: Schedule, deliver=None, vanishing=None,
                 connect_timeout_s: float = 300.0):
        self.rec, self.sched = recorder, schedule
        self.deliver, self.vanishing = deliver, vanishing
        self.connect_timeout_s = connect_timeout_s

    def summary(self) -> None:
        pass

    def start(self, grid: Grid, timeout: float = 86_400) -> None:
        """The rounds, as Strategy.start runs them, for as many as the recorder needs (catch-up
        rounds after a failed shard; a resumed run starts where its checkpoint ended)."""
        r = self.rec.next_round()
        if r is None:
            return
        sent = self._push(grid, self.configure_train(r + 1, ArrayRecord(), ConfigRecord(), grid))
        while True:
            ahead = None  # the next round's messages, sent before this round's replies are in
            if self.deliver is not None and r + 1 <= self.sched.rounds:
                ahead = self._push(grid, self._messages(r + 1, grid))
            self.aggregate_train(r + 1, self._pull(grid, sent, timeout))
            r = self.rec.next_round()
            if r is None:
                return
            if ahead is not None:
                self._hand_over(r)
                sent = ahead
            else:
                sent = self._push(grid, self.configure_train(r + 1, ArrayRecord(), ConfigRecord(), grid))

    @staticmethod
    def _push(grid: Grid, messages: list[Message]) -> list:
        return list(grid.push_messages(messages))

    def _pull(self, grid: Grid, ids: list, timeout: float) -> list[Message]:
        """Every reply to the round's messages (as Grid.send_and_receive waits for them)."""
        replies, waiting = [], set(ids)
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            got = list(grid.pull_messages(list(waiting)))
            for reply in got:
                waiting.discard(reply.metadata.reply_to_message_id)
            replies += got
            if waiting:
                time.sleep(0.005)
        return replies

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        r = server_round - 1  # round 0 is the bootstrap
        per_shard = self._hand_over(r)
        messages = self._messages(r, grid)
        if self.deliver is None:  # the deliveries go inside the messages
            for m in messages:
                shard = self.rec.shard_of_node.get(m.metadata.dst_node_id)
                deliveries = per_shard[shard] if shard is not None else protocol.empty_deliveries(self.rec.n_blocks)
                m.content["deliveries"] = protocol.to_record(deliveries)
        return messages

    def _hand_over(self, r: int) -> list[dict]:
        per_shard = self.rec.deliveries_for_shards()
        if self.deliver is not None:
            self.deliver(r, per_shard)
        return per_shard

    def _messages(self, r: int, grid: Grid) -> list[Message]:
        kind, t0, t1, last = self.rec.window(r)
        vanished = self.vanishing(r) if self.vanishing is not None else []
        window = {"kind": kind, "t0": t0, "t1": t1, "last": last, "round": r, "vanished": vanished}
        return [Message(RecordDict({"window": ConfigRecord(window)}), dst_node_id=node, message_type="train",
                        group_id=str(r + 1)) for node in self._nodes(grid)]

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


def make_server_app(recorder: Recorder, schedule: Schedule, deliver=None, vanishing=None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context) -> None:
        if hasattr(grid, "pull_interval"):  # the in-memory grid polls for replies; 0.1 s a round adds up
            grid.pull_interval = 0.005
        CloudStrategy(recorder, schedule, deliver, vanishing).start(grid)

    return app
