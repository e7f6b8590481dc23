"""The cloud as a Flower strategy (flwr.serverapp.strategy.Strategy, Message API).

The strategy drives the simulation's one round loop (fl_sim.engine.drive): each exchange of a
round sends every shard's SuperNode a message with the window (its deliveries go through Ray's
object store, or inline), gathers the replies, and the cloud (strategies.cloud.Cloud) answers
every request of the exchange in one batched pass.
"""

from __future__ import annotations

import re
import time
from collections import deque
from typing import Iterable, Optional

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fl_sim import protocol
from fl_sim.engine import Recorder, Reply, drive
from fl_sim.errors import FlSimError
from fl_sim.faults import INJECTED


class CloudStrategy(Strategy):
    """`post(tick, round, exchange, window, per_shard)` hands each shard its exchange outside
    Flower's messages (through Ray's object store); the Flower message is then only a tick, and
    `ahead` ticks are kept sent beyond the current exchange. Flower's simulation runtime moves
    messages to its workers by polling (fl_sim.backends.pump_messages: every message waiting,
    every 20 ms; Flower's own moves one per node every 0.1 s): with a single tick ahead, an
    exchange shorter than the poll waited for its message (measured at 5,000 devices with
    Flower's: 36 ms an exchange on average, 5.3 s over 147 exchanges); with eight, each exchange
    finds its tick waiting. A worker holds one tick at a time and ticks are queued in order, so
    each exchange's ticks are all taken before any later one (one worker per shard:
    `RayFlower.per_worker`). Without `post` the window and deliveries travel inside the messages,
    one exchange at a time."""

    def __init__(self, recorder: Recorder, post=None, tag: str = "", run_dir: str = "",
                 connect_timeout_s: float = 300.0, timeout_s: float = 86_400.0, ahead: int = 8):
        self.rec, self.post, self.tag, self.run_dir = recorder, post, tag, run_dir
        self.connect_timeout_s, self.timeout_s = connect_timeout_s, timeout_s
        self.tick, self.ahead, self.sent = 0, ahead, deque()

    def summary(self) -> None:
        pass

    def start(self, grid: Grid, timeout: float = 86_400) -> None:
        self.timeout_s = timeout
        if hasattr(grid, "pull_interval"):  # a grid polling for replies: 0.1 s an exchange adds up
            grid.pull_interval = 0.002
        if self.post is not None:
            # A first tick with no exchange: the ClientApp workers start and import the project
            # now, before the round loop's clock (fl_sim.engine.drive) starts.
            self.post(0, 0, 0, None, None)
            self._pull(grid, self._push_tick(grid, 0))
            self.tick = 1
            for n in range(1, 1 + self.ahead):
                self.sent.append(self._push_tick(grid, n))
        drive(self.rec, lambda r, k, window, inboxes: self.exchange(grid, r, k, window, inboxes))
        if self.post is not None:  # the ticks sent ahead find the run over
            for n in range(self.tick, self.tick + len(self.sent)):
                self.post(n, 0, 0, None, None)
            self._pull(grid, [m for ids in self.sent for m in ids])

    def _push_tick(self, grid: Grid, n: int) -> list:
        config = ConfigRecord({"n": n, "tag": self.tag})
        return list(grid.push_messages([Message(RecordDict({"tick": config}), dst_node_id=node, message_type="train",
                                                group_id=str(n)) for node in self._nodes(grid)]))

    def exchange(self, grid: Grid, r: int, k: int, window: tuple, inboxes: list) -> list[Reply]:
        if self.post is not None:
            self.post(self.tick, r, k, window, inboxes)
            sent = self.sent.popleft()
            self.sent.append(self._push_tick(grid, self.tick + self.ahead))
            self.tick += 1
            return self._replies(self._pull(grid, sent))
        kind, t0, t1, last = window
        config = ConfigRecord({"kind": kind, "t0": t0, "t1": t1, "last": last, "round": r, "exchange": k,
                               "run": self.run_dir, "seq": self.tick})
        self.tick += 1
        messages = []
        for node in self._nodes(grid):
            shard = self.rec.shard_of_node.get(node)
            d = inboxes[shard] if shard is not None else self.rec.cloud.empty_deliveries()
            content = RecordDict({"window": config, "deliveries": protocol.to_record(d.arrays())})
            messages.append(Message(content, dst_node_id=node, message_type="train", group_id=f"{r}.{k}"))
        return self._replies(self._pull(grid, list(grid.push_messages(messages))))

    def _pull(self, grid: Grid, ids: list) -> list[Message]:
        """Every reply to the exchange's messages (as Grid.send_and_receive waits for them)."""
        replies, waiting = [], set(ids)
        deadline = time.monotonic() + self.timeout_s
        pause = 0.001
        while waiting and time.monotonic() < deadline:
            got = list(grid.pull_messages(list(waiting)))
            for reply in got:
                waiting.discard(reply.metadata.reply_to_message_id)
            replies += got
            if waiting:  # polling backs off to 3 ms: a reply waits at most that long
                time.sleep(pause)
                pause = 0.001 if got else min(pause * 1.5, 0.003)
        return replies

    def _nodes(self, grid: Grid) -> list[int]:
        """Every shard's node. The ServerApp can start before the SuperNodes are up; an exchange
        sent then would reach no shard, so wait for all of them."""
        deadline = time.monotonic() + self.connect_timeout_s
        while len(nodes := sorted(grid.get_node_ids())) < self.rec.n_shards:
            if time.monotonic() > deadline:
                raise FlSimError(f"only {len(nodes)} of {self.rec.n_shards} shard nodes connected "
                                 f"within {self.connect_timeout_s:.0f} s")
            time.sleep(0.05)
        return nodes

    def _replies(self, messages: Iterable[Message]) -> list[Reply]:
        out = []
        for reply in messages:
            if reply.has_error():  # the shard catches up next exchange; rebuilt first if it failed part-way
                reason = reply.error.reason
                named = re.search(r"shard=(\d+)", reason)
                if named:
                    self.rec.shard_failed(int(named.group(1)), reason[-600:], state_lost=INJECTED not in reason)
                continue  # (a shard missing without a word is rebuilt: see Recorder.collect)
            info = reply.content["info"]
            shard = int(info["shard"])
            if info.get("stop"):
                continue
            self.rec.shard_of_node[reply.metadata.src_node_id] = shard
            metrics = dict(reply.content["metrics"])
            metrics.pop("shard", None)
            table = installs = None
            if "devices" in reply.content:
                table = protocol.from_record(reply.content["devices"])
                installs = protocol.from_record(reply.content["installs"])["installs"]
            requests = protocol.from_record(reply.content["requests"])  # checked by the cloud
            out.append(Reply(shard=shard, requests=requests, metrics=metrics, parked=int(info["parked"]),
                             table=table, installs=installs))
        return out

    # Strategy's abstract methods: this strategy runs its own loop (start), not FedAvg's rounds.
    def configure_train(self, server_round, arrays: ArrayRecord, config: ConfigRecord, grid) -> Iterable[Message]:
        return []

    def aggregate_train(self, server_round, replies):
        return None, None

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round, replies) -> Optional[MetricRecord]:
        return None


def make_server_app(recorder: Recorder, post, tag: str, finish) -> ServerApp:
    """The ServerApp of `python -m fl_sim.run` on Ray, bound to the run it drives; `finish()`
    runs after the last exchange, while the backend's processes are still up."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context) -> None:
        CloudStrategy(recorder, post, tag=tag).start(grid)
        finish()

    return server


app = ServerApp()


@app.main()
def main(grid: Grid, context) -> None:
    """`flwr run`: the whole simulation from the run config (`overrides`: the command line of
    `python -m fl_sim.run`; `output-dir`); the SuperNodes of Flower's federation are the shards."""
    from fl_sim.run import simulate_on_grid

    simulate_on_grid(grid, dict(context.run_config))
