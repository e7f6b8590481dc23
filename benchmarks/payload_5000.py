"""Full against delta payloads on 5,000 synthetic devices (the default run, seed 0).

    python benchmarks/payload_5000.py [--out DIR] [--cache DIR]

Runs `python -m fl_sim.run num_clients=5000 sim.backend=inprocess sim.payload=P` for P in full
(every answer ships its kept blocks' whole weights, as the paper does) and delta (the mapper's
terms, plus a block's shared weights the first time a device keeps it), pre-training bounded
by epochs as in benchmarks/triggers_5000.py, and writes benchmarks/results/payload_5000.json:
bytes, request-to-install delay per link class, events ranked while an answer was on its way,
accuracy, and each run's peak memory. A finished run in DIR is reused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("ndcg10", "hit10", "requests", "bytes_down", "bytes_down_model", "bytes_down_candidates",
        "bytes_first_model", "bytes_per_device_per_day", "update_bytes_per_device_per_day", "events_waiting",
        "request_to_install_s", "peak_rss_mb", "sim_wall_s", "wall_s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--cache", default=None, help="cache directory (pre-trained models) to reuse")
    opts = parser.parse_args()
    base = Path(opts.out or tempfile.mkdtemp())
    cache = opts.cache or os.environ.get("FL_SIM_CACHE") or str(base / "cache")
    common = ["num_clients=5000", "sim.backend=inprocess", "sim.pretrain.max_epochs=5", "sim.pretrain.max_minutes=60",
              "seed=0"]
    runs = {}
    for mode in ("full", "delta"):
        out = base / mode
        if not (out / "summary.json").exists():
            res = subprocess.run([sys.executable, "-m", "fl_sim.run", *common, f"sim.payload={mode}",
                                  f"output_dir={out}"], cwd=ROOT, capture_output=True, text=True,
                                 env={**os.environ, "FL_SIM_CACHE": cache})
            if res.returncode != 0:
                raise SystemExit(f"{mode} failed:\n{res.stderr[-3000:]}")
        summary = json.loads((out / "summary.json").read_text())
        runs[mode] = {k: summary[k] for k in KEYS}
    full, delta = runs["full"], runs["delta"]
    result = {"what": "5,000 synthetic devices, default config (session_drift), in-process, seed 0",
              "common_args": common, "runs": runs,
              "ratio_full_to_delta": {k: full[k] / delta[k] for k in ("bytes_down_model", "bytes_per_device_per_day",
                                                                      "update_bytes_per_device_per_day")},
              "ndcg10_delta_minus_full": delta["ndcg10"] - full["ndcg10"]}
    (ROOT / "benchmarks/results/payload_5000.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
