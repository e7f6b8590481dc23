"""Request triggers on 5,000 synthetic devices in the deployment setting, over seeds.

    python benchmarks/triggers_5000.py [--seeds 0,1,2] [--first-only always] [--skip always]
                                       [--more periodic,drift,...] [--out DIR] [--cache DIR]
                                       [--reuse-recorded]

For each seed, `python -m fl_sim.run num_clients=5000 sim.backend=inprocess seed=S trigger=T`
with the defaults otherwise (pre-training bounded by epochs, `sim.pretrain.max_epochs=5
sim.pretrain.max_minutes=60`, so that the model does not depend on the machine's load), for T in never, every_session, session_drift (the default) and
always; for the first seed also the other built-in triggers. Then `python -m fl_sim.report` over
the first seed's runs (table and plots into benchmarks/results/triggers_5000/), and
benchmarks/results/triggers_5000.json: every run's summary, per trigger the mean and spread
(sample standard deviation) over seeds, and every pair's difference in NDCG@10 with its spread.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = ["never", "every_session", "session_drift", "always"]
MORE = ["periodic", "drift", "uncertainty", "random", "budgeted", "bandwidth_aware"]
KEYS = ("ndcg10", "hit10", "requests", "bytes_per_device_per_day", "update_bytes_per_device_per_day",
        "bytes_down_model", "bytes_down_candidates", "mean_flops_per_inference", "request_to_install_s", "by_tier",
        "by_link", "events_total", "events_evaluated", "events_no_model", "budget_violations", "sim_wall_s", "wall_s",
        "peak_rss_mb")


def run(name: str, args: list[str], out: Path, cache: str) -> dict:
    if (out / "summary.json").exists() and (out / "config.yaml").exists():  # a finished run of an earlier call
        summary = json.loads((out / "summary.json").read_text())
        return {k: summary[k] for k in KEYS}
    res = subprocess.run([sys.executable, "-m", "fl_sim.run", *args, f"output_dir={out}"], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "FL_SIM_CACHE": cache})
    if res.returncode != 0:
        raise SystemExit(f"{name} failed:\n{res.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    print(name, json.dumps({k: summary[k] for k in ("ndcg10", "requests", "bytes_per_device_per_day", "wall_s")}),
          flush=True)
    return {k: summary[k] for k in KEYS}


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--more", default=",".join(MORE), help="the other triggers, run for the first seed only")
    parser.add_argument("--first-only", default="", help="triggers of the core four run for the first seed only")
    parser.add_argument("--skip", default="", help="triggers of the core four not run at all")
    parser.add_argument("--out", default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--cache", default=None, help="cache directory (pre-trained models) to reuse")
    parser.add_argument("--reuse-recorded", action="store_true",
                        help="take runs of the seeds after the first from benchmarks/results/triggers_5000.json "
                             "where it holds them (the report needs only the first seed's run folders)")
    opts = parser.parse_args()
    results_path = ROOT / "benchmarks/results/triggers_5000.json"
    recorded = json.loads(results_path.read_text())["runs"] if opts.reuse_recorded and results_path.exists() else {}
    seeds = [int(s) for s in opts.seeds.split(",")]
    base = Path(opts.out or tempfile.mkdtemp())
    cache = opts.cache or os.environ.get("FL_SIM_CACHE") or str(base / "cache")
    common = ["num_clients=5000", "sim.backend=inprocess", "sim.pretrain.max_epochs=5", "sim.pretrain.max_minutes=60"]
    runs: dict[str, dict] = {}
    first_dirs = []
    more = [t for t in opts.more.split(",") if t]
    first_only = {t for t in opts.first_only.split(",") if t}
    core = [t for t in CORE if t not in {t for t in opts.skip.split(",") if t}]
    plan = [(seed, t) for seed in seeds for t in core if t not in first_only]
    plan += [(seeds[0], t) for t in core if t in first_only] + [(seeds[0], t) for t in more]
    for seed, trigger in plan:
        name = f"{trigger}_seed{seed}"
        out = base / name
        if seed != seeds[0] and name in recorded and not out.exists():
            runs[name] = recorded[name]
            continue
        runs[name] = run(name, [*common, f"seed={seed}", f"trigger={trigger}"], out, cache)
        if seed == seeds[0]:
            first_dirs.append(str(out))
    report_dir = ROOT / "benchmarks/results/triggers_5000"
    shutil.rmtree(report_dir, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "fl_sim.report", *first_dirs, f"output_dir={report_dir}"], cwd=ROOT,
                   check=True, capture_output=True)
    per_trigger = {}
    for trigger in core:
        have = [s for s in seeds if f"{trigger}_seed{s}" in runs]
        vals = [runs[f"{trigger}_seed{s}"]["ndcg10"] for s in have]
        byte = [runs[f"{trigger}_seed{s}"]["bytes_per_device_per_day"] for s in have]
        per_trigger[trigger] = {"ndcg10_mean": statistics.mean(vals), "ndcg10_spread": spread(vals),
                                "ndcg10_per_seed": vals, "bytes_per_device_per_day_mean": statistics.mean(byte),
                                "seeds": have}
    pairs = {}
    for a, b in itertools.combinations(core, 2):
        both = [s for s in seeds if f"{a}_seed{s}" in runs and f"{b}_seed{s}" in runs]
        diff = [runs[f"{b}_seed{s}"]["ndcg10"] - runs[f"{a}_seed{s}"]["ndcg10"] for s in both]
        pairs[f"{b} - {a}"] = {"mean": statistics.mean(diff), "spread": spread(diff), "per_seed": diff, "seeds": both}
    result = {"what": "5,000 synthetic devices, default config, in-process; spread = sample std over seeds",
              "common_args": common, "seeds": seeds, "per_trigger": per_trigger, "pairs": pairs, "runs": runs}
    results_path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"per_trigger": per_trigger, "pairs": pairs}, indent=2))


if __name__ == "__main__":
    main()
