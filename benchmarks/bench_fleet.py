"""The fleet simulation as a user runs it: `python -m fl_sim.run num_clients=N ...`, timed from
process start to exit, with the peak memory of the whole process tree (Ray included) from
each run's summary.json.

    python benchmarks/bench_fleet.py [--runs 3] [--cold-runs 2] [--cases cold,warm,scaling] [--cache DIR]
    python benchmarks/bench_fleet.py --cases scale [--sizes 1000,5000,20000,100000] [--runs 3] [--cache DIR]

Cases (5,000 devices and the default config unless named):
  cold       empty cache: data generation and the cloud's pre-training included
  warm       pre-training cached, on Ray (default) and in-process (same config)
  scaling    pre-training cached, 1,000 and 20,000 devices on Ray (5,000: from `warm`)
  faults     pre-training cached, in-process: checkpoints every 10 rounds; faults=flaky; and
             faults=flaky with lost nodes and part-way failures rebuilt from checkpoints
  scale      pre-training cached, the default command (Ray) at each of --sizes (--runs runs each,
             one at 100,000), where its time goes (summary's time_s), one run at the largest
             size with a checkpoint every 10 rounds (seconds per checkpoint), and the compute
             floor (benchmarks/floor.py) at 5,000 and the largest size: the simulation's
             wall time over the floor's
  rows       the rows of `scale` alone (no checkpoint run, no floor); a row keeps its earlier
             floor when its results are unchanged
  checkpoints  the checkpoint run of `scale` alone (pre-training cached at the largest size)
  floor      the floors of `scale` alone, each against new runs of the default command (--pairs:
             how many, alternating run and floor; medians of the ratios). The pairs replace the
             row's, which move to floor_pairs_<commit>; with --add-pairs they join the row's
             pairs of the same commit (each pair names its commit; a work tree with changes
             never adds)
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
        "faults", "time_s", "checkpoint_s")


def run(args: list[str], cache: str) -> dict:
    out = tempfile.mkdtemp()
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "fl_sim.run", *args, f"output_dir={out}"], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "FL_SIM_CACHE": cache})
    wall = time.perf_counter() - start
    if res.returncode != 0:
        raise SystemExit(f"fl_sim.run {' '.join(args)} failed:\n{res.stderr[-3000:]}")
    summary = json.loads((Path(out) / "summary.json").read_text())
    row = {"args": args, "process_wall_s": round(wall, 2), **{k: summary[k] for k in KEYS}, "output_dir": out}
    print(json.dumps(row), flush=True)
    return row


def median(rows: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in rows), 3)


def scale(result: dict, runs: dict, cache: str, sizes: list[int], n_runs: int, rows_only: bool = False) -> None:
    """Rows per fleet size: wall, peak memory, ms per device, where the time went; a checkpoint
    run at the largest size; the compute floor and the simulation's ratio to it. `rows_only`:
    the rows alone; a row's earlier floor stays when the run's results are the same to the last
    digit (the same model versions), its ratios then over the new wall time."""
    rows = result.setdefault("scale", {})
    for n in sizes:
        run([f"num_clients={n}", "sim.backend=inprocess", "sim.max_rounds=1"], cache)  # pre-train once
        key = f"scale_ray_{n}"
        runs[key] = [run([f"num_clients={n}"], cache) for _ in range(1 if n >= 100_000 else n_runs)]
        mid = sorted(runs[key], key=lambda r: r["sim_wall_s"])[len(runs[key]) // 2]
        old = rows.get(str(n), {})
        row = {"runs": len(runs[key]), "process_wall_s": median(runs[key], "process_wall_s"),
               "sim_wall_s": median(runs[key], "sim_wall_s"), "peak_rss_mb": median(runs[key], "peak_rss_mb"),
               "ms_per_device_simulation": round(1000 * median(runs[key], "sim_wall_s") / n, 3),
               "time_s_of_median_run": mid["time_s"], "events": mid["events_total"],
               "requests": mid["requests"], "ndcg10": mid["ndcg10"],
               "before": {k: old.get(k) for k in ("process_wall_s", "sim_wall_s", "peak_rss_mb", "ndcg10")}}
        if old.get("ndcg10") == mid["ndcg10"]:
            for k in ("floor", "checkpoint_s", "checkpoint_run"):
                if k in old:
                    row[k] = old[k]
            if "floor" in row:
                row.update(ratios(row["sim_wall_s"], mid["time_s"]["rounds"], row["floor"]))
        keep(row, old)
        rows[str(n)] = row
    if rows_only:
        return
    checkpoints(result, runs, cache, max(sizes))
    floors(result, runs, cache, sizes)


def keep(row: dict, old: dict) -> None:
    """What a new row must not lose of the row it replaces: the floor pairs (each names its
    commit) stay as they are; the old row's floor, checkpoint and ratios, when the new row does
    not carry them over, stay under `before` (they belong to the old runs)."""
    for k, v in old.items():
        if k.startswith("floor_pairs") and k not in row:
            row[k] = v
        elif k not in row and k != "before":
            row["before"][k] = v


def commit() -> str:
    """The checked-out commit, with "+dirty" when the work tree differs from it (results aside:
    writing them is what a benchmark does)."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                            ":(exclude)benchmarks/results"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return (head or "unknown") + ("+dirty" if dirty else "")


def floors(result: dict, runs: dict, cache: str, sizes: list[int], pairs: int = 1, add: bool = False) -> None:
    """The compute floor at 5,000 devices and the largest size (pre-training cached there):
    with the deployment models only, and with one pass per model version of a run of the
    default command (its installs.parquet), in one process on the machine's threads and split
    over the run's shards as one-thread processes; that run's simulation wall time over each.
    `pairs`: that many runs, each followed by its floor; the row keeps every pair and the
    medians of their ratios (the machine's speed varies within an hour). `add`: the new pairs
    join the row's pairs measured at the same commit; otherwise they replace the row's pairs.
    Pairs that leave `floor_pairs` are not mixed in and not lost: they stay under
    `floor_pairs_<commit>` (`shelve`)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from floor import measure

    os.environ["FL_SIM_CACHE"] = cache  # the floor reads the same cached pre-training
    rows = result.setdefault("scale", {})
    code = commit()
    for n in sorted({5000, max(sizes)} & set(sizes)):
        samples = []
        for i in range(pairs):
            mid = run([f"num_clients={n}"], cache)  # its model versions (the runs above gave the same)
            runs.setdefault(f"scale_ray_{n}_for_floor", []).append(mid)
            fl = measure([f"num_clients={n}"], check=n <= 5000 and i == 0, run_output=mid["output_dir"],
                         processes=int(mid["nodes"]))
            print(json.dumps(fl), flush=True)
            # The ratio is a run of this sitting over its floor: a row measured on another day
            # (another model, another load on the machine) is not compared with it.
            samples.append({"commit": code, "floor": fl, "floor_run": {k: mid[k] for k in ("process_wall_s", "sim_wall_s", "peak_rss_mb",
                                                                            "ndcg10", "time_s")},
                            **ratios(mid["sim_wall_s"], mid["time_s"]["rounds"], fl)})
        row = rows.setdefault(str(n), {})
        if add and "+dirty" in code:
            print("--add-pairs: the work tree has changes, so the new pairs replace the row's", file=sys.stderr)
        elif add:
            samples = [x for x in row.get("floor_pairs", []) if x.get("commit") == code] + samples
        shelve(row, [x for x in row.get("floor_pairs", []) if x not in samples])
        mid_pair = sorted(samples, key=lambda x: x["rounds_over_floor_versions"])[len(samples) // 2]
        row["floor"], row["floor_run"] = mid_pair["floor"], mid_pair["floor_run"]
        row.update({k: round(statistics.median(x[k] for x in samples), 2) for k in samples[-1] if "_over_" in k})
        row["floor_pairs"] = samples


def shelve(row: dict, pairs: list[dict]) -> None:
    """Floor pairs leaving the row's `floor_pairs` kept under `floor_pairs_<commit>`, one key per
    commit (joining pairs already kept there)."""
    for pair in pairs:
        kept = row.setdefault(f"floor_pairs_{pair.get('commit', 'unknown')[:7]}", [])
        if pair not in kept:
            kept.append(pair)


def ratios(sim_wall_s: float, rounds_s: float, floor: dict) -> dict:
    """A run's simulation time over the floor (deployment models only; one pass per model
    version), and its round loop alone (without the engine's fixed start and stop) over the
    latter; `_parallel`: over the floor split as the run's shards (one-thread processes).
    `rounds_over_floor_versions_and_requests`: the round loop over the floor plus the run's
    requests' own computation on the device (not scoring: beside the target, not in it)."""
    out = {"simulation_over_floor": round(sim_wall_s / floor["floor_s"], 2),
           "simulation_over_floor_versions": round(sim_wall_s / floor["floor_versions_s"], 2),
           "rounds_over_floor_versions": round(rounds_s / floor["floor_versions_s"], 2)}
    if "parallel" in floor:
        out["simulation_over_floor_versions_parallel"] = round(sim_wall_s / floor["parallel"]["floor_versions_s"], 2)
        out["rounds_over_floor_versions_parallel"] = round(rounds_s / floor["parallel"]["floor_versions_s"], 2)
    if "requests_s" in floor:
        out["rounds_over_floor_versions_and_requests"] = round(
            rounds_s / (floor["floor_versions_s"] + floor["requests_s"]), 2)
        if "parallel" in floor:
            out["rounds_over_floor_versions_and_requests_parallel"] = round(
                rounds_s / floor["parallel"]["floor_versions_and_requests_s"], 2)
    return out


def checkpoints(result: dict, runs: dict, cache: str, n: int) -> None:
    """One run of n devices (pre-training cached) saving a checkpoint every 10 rounds: seconds
    per checkpoint, and the run's peak memory with them."""
    ck = run([f"num_clients={n}", "sim.checkpoint_every=10"], cache)
    runs[f"scale_ray_{n}_checkpoints"] = [ck]
    row = result.setdefault("scale", {}).setdefault(str(n), {})
    row["checkpoint_s"] = ck["checkpoint_s"]
    row["checkpoint_run"] = {k: ck[k] for k in ("process_wall_s", "sim_wall_s", "peak_rss_mb", "ndcg10")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cold-runs", type=int, default=2)
    parser.add_argument("--cases", default="cold,warm,scaling")
    parser.add_argument("--cache", help="cache directory to reuse (default: a fresh one)")
    parser.add_argument("--sizes", default="1000,5000,20000,100000", help="scale: fleet sizes")
    parser.add_argument("--pairs", type=int, default=1, help="floor: runs each followed by its floor, per size")
    parser.add_argument("--add-pairs", action="store_true",
                        help="floor: add the new pairs to the row's pairs of the same commit instead of replacing them")
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
    if "scale" in cases or "rows" in cases:
        scale(result, runs, warm_cache, [int(n) for n in opts.sizes.split(",")], opts.runs, rows_only="rows" in cases)
    else:  # parts of `scale` alone (pre-training cached at the sizes)
        sizes = [int(n) for n in opts.sizes.split(",")]
        if "checkpoints" in cases:
            checkpoints(result, runs, warm_cache, max(sizes))
        if "floor" in cases:
            floors(result, runs, warm_cache, sizes, opts.pairs, add=opts.add_pairs)
    result["median"] = {case: {k: median(rows, k) for k in ("process_wall_s", "wall_s", "sim_wall_s", "peak_rss_mb")}
                        for case, rows in runs.items()}
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["median"], indent=2))


if __name__ == "__main__":
    main()
