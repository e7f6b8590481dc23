"""The fleet simulation as a user runs it: `python -m fl_sim.run num_clients=N ...`, timed from
process start to exit, with the peak memory of the whole process tree (Ray included) from
each run's summary.json.

    python benchmarks/bench_fleet.py [--runs 3] [--cold-runs 2] [--cases cold,warm,scaling] [--cache DIR]

Cases (5,000 devices and the default config unless named):
  cold       empty cache: data generation and the cloud's pre-training included
  warm       pre-training cached, on Ray (default) and in-process (same config)
  scaling    pre-training cached, 1,000 and 20,000 devices on Ray (5,000: from `warm`)
  faults     pre-training cached, in-process: checkpoints every 10 rounds; faults=flaky; and
             faults=flaky with lost nodes and part-way failures rebuilt from checkpoints
Writes benchmarks/results/fleet.json: every run and the median per case. --cache DIR reuses the
pre-trained models cached there (default: a fresh directory; pre-training is never timed in the
cached cases).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("wall_s", "sim_wall_s", "peak_rss_mb", "ndcg10", "hit10", "requests", "events_total", "events_evaluated",
        "budget_violations", "failed_shards", "pretrain_cached", "backend", "nodes", "num_devices", "rounds",
        "faults")


def run(args: list[str], cache: str) -> dict:
    out = tempfile.mkdtemp()
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "fl_sim.run", *args, f"output_dir={out}"], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "FL_SIM_CACHE": cache})
    wall = time.perf_counter() - start
    if res.returncode != 0:
        raise SystemExit(f"fl_sim.run {' '.join(args)} failed:\n{res.stderr[-3000:]}")
    summary = json.loads((Path(out) / "summary.json").read_text())
    row = {"args": args, "process_wall_s": round(wall, 2), **{k: summary[k] for k in KEYS}}
    print(json.dumps(row), flush=True)
    return row


def median(rows: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in rows), 3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cold-runs", type=int, default=2)
    parser.add_argument("--cases", default="cold,warm,scaling")
    parser.add_argument("--cache", help="cache directory to reuse (default: a fresh one)")
    opts = parser.parse_args()
    cases = opts.cases.split(",")
    path = ROOT / "benchmarks/results/fleet.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    result.update({"what": "python -m fl_sim.run, process start to exit; peak memory: PSS of the process tree",
                   "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                               "platform": platform.platform()}})
    runs = result.setdefault("runs", {})
    warm_cache = opts.cache or tempfile.mkdtemp()
    if "cold" in cases:
        runs["cold_ray_5000"] = [run(["num_clients=5000"], tempfile.mkdtemp()) for _ in range(opts.cold_runs)]
    if "warm" in cases:
        run(["num_clients=5000", "sim.backend=inprocess", "sim.max_rounds=1"], warm_cache)  # pre-train once
        runs["warm_ray_5000"] = [run(["num_clients=5000"], warm_cache) for _ in range(opts.runs)]
        runs["warm_inprocess_5000"] = [run(["num_clients=5000", "sim.backend=inprocess"], warm_cache)
                                       for _ in range(opts.runs)]
    if "scaling" in cases:
        for n in (1000, 20000):
            run([f"num_clients={n}", "sim.backend=inprocess", "sim.max_rounds=1"], warm_cache)  # pre-train once
            runs[f"warm_ray_{n}"] = [run([f"num_clients={n}"], warm_cache) for _ in range(opts.runs)]
    if "faults" in cases:
        base = ["num_clients=5000", "sim.backend=inprocess"]
        if "warm" not in cases:
            run([*base, "sim.max_rounds=1"], warm_cache)  # pre-train once
        flaky = ["faults=flaky", "faults.node_vanish=0.02", "faults.shard_fail_partway=true"]
        for name, extra in [("checkpoints", ["sim.checkpoint_every=10"]), ("flaky", ["faults=flaky"]),
                            ("flaky_rebuilt", [*flaky, "sim.checkpoint_every=10"])]:
            runs[f"warm_inprocess_5000_{name}"] = [run([*base, *extra], warm_cache) for _ in range(opts.runs)]
    result["median"] = {case: {k: median(rows, k) for k in ("process_wall_s", "wall_s", "sim_wall_s", "peak_rss_mb")}
                        for case, rows in runs.items()}
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["median"], indent=2))


if __name__ == "__main__":
    main()
