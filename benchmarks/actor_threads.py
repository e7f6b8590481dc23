"""The same torch work timed in this process, in this process while Ray runs beside it, and in a
threaded Ray actor like the shards' (num_cpus=0, max_concurrency=4): wall and thread CPU per
call, with torch on 1 and on 2 threads. It separates what the actor process itself costs from
what Ray's other processes on the same cores cost.

    python benchmarks/actor_threads.py [--rounds 3] [--reps 30]

Work (as in a shard's exchange, d=64): a packed GRU over 256 windows of up to 50 items (the
devices' request encoding), a linear layer over 128 x 200 positions, causal attention over 128 x
200. Writes benchmarks/results/actor_threads.json: per setting and threads, the median over
--rounds of each op's mean ms per call (wall and the calling thread's CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "actor_threads.json"


def work(threads: int, reps: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    gru, lin = torch.nn.GRU(64, 64, batch_first=True), torch.nn.Linear(64, 64)
    x, lengths = torch.randn(256, 50, 64), torch.randint(1, 51, (256,))
    big = torch.randn(128, 200, 64)
    q = big[:, None]
    ops = {"gru": lambda: gru(torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                                                     enforce_sorted=False)),
           "linear": lambda: lin(big),
           "attention": lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)}
    out = {}
    with torch.no_grad():
        for name, op in ops.items():
            op()
            wall, cpu = time.perf_counter(), time.thread_time()
            for _ in range(reps):
                op()
            out[name] = {"wall_ms": 1e3 * (time.perf_counter() - wall) / reps,
                         "thread_cpu_ms": 1e3 * (time.thread_time() - cpu) / reps}
    return out


def median_of(results: list[dict]) -> dict:
    return {op: {k: round(statistics.median(r[op][k] for r in results), 2) for k in results[0][op]}
            for op in results[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=30)
    opts = parser.parse_args()
    import ray

    settings = {"this process": {}, "this process, Ray running": {}, "Ray actor (as the shards')": {}}
    for threads in (1, 2):
        settings["this process"][threads] = median_of([work(threads, opts.reps) for _ in range(opts.rounds)])
    ray.init(include_dashboard=False, logging_level=40)
    time.sleep(10)  # Ray's prestarted workers finish starting up

    @ray.remote(num_cpus=0, max_concurrency=4)
    class Actor:
        def run(self, threads: int, reps: int) -> dict:
            return work(threads, reps)

    actor = Actor.remote()
    ray.get(actor.run.remote(1, 1))
    for threads in (1, 2):
        runs_actor, runs_here = [], []
        for _ in range(opts.rounds):  # alternating, so that both see the same background
            runs_actor.append(ray.get(actor.run.remote(threads, opts.reps)))
            runs_here.append(work(threads, opts.reps))
        settings["Ray actor (as the shards')"][threads] = median_of(runs_actor)
        settings["this process, Ray running"][threads] = median_of(runs_here)
    ray.shutdown()
    result = {"what": __doc__.split("\n\n")[0], "rounds": opts.rounds, "reps": opts.reps,
              "ms_per_call": {name: {f"{t} thread{'s' if t > 1 else ''}": v for t, v in by.items()}
                              for name, by in settings.items()}}
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ms_per_call"], indent=1))


if __name__ == "__main__":
    main()
