"""The fleet on real data: 5,000 MovieLens-1M users (SASRec preprocessing) as phones.

    python benchmarks/fleet_ml1m.py [--pretrain-epochs 5] [--out DIR]

Runs `python -m fl_sim.run dataset=ml1m_sas num_clients=5000` for DeviceRec (one model for
everyone, shipped once; its requests bring candidates) and Forward-OFA, each under the `never`,
`every_session`, `drift` and `always` triggers, all with the same
pre-training (epochs), then `python -m fl_sim.report` over them.
Writes benchmarks/results/fleet_ml1m.json (the comparison rows) and the report's table and
plots into benchmarks/results/fleet_ml1m/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("FL_SIM_SHARED", ROOT.parent / "shared")) / "data/ml-1m/ml-1m-sas.txt.gz"
TRIGGERS = ("never", "every_session", "drift", "always")
RUNS = {f"{method}_{trigger}": [f"method={method}", f"trigger={trigger}"]
        for method in ("device_rec", "forward_ofa") for trigger in TRIGGERS}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrain-epochs", type=int, default=5,
                        help="pre-training bounded by epochs (not minutes), so the model does not depend on load")
    parser.add_argument("--out", default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--triggers", default=",".join(TRIGGERS))
    opts = parser.parse_args()
    chosen = opts.triggers.split(",")
    runs = {name: args for name, args in RUNS.items() if args[1].split("=")[1] in chosen}
    base = Path(opts.out or tempfile.mkdtemp())
    cache = os.environ.get("FL_SIM_CACHE") or str(base / "cache")
    common = ["dataset=ml1m_sas", f"dataset.path={DATA}", "num_clients=5000",
              f"sim.pretrain.max_epochs={opts.pretrain_epochs}", "sim.pretrain.max_minutes=120",
              "sim.backend=inprocess"]
    dirs = []
    for name, args in runs.items():
        out = base / name
        if (out / "summary.json").exists():  # finished by an earlier call
            dirs.append(str(out))
            continue
        res = subprocess.run([sys.executable, "-m", "fl_sim.run", *common, *args, f"output_dir={out}"], cwd=ROOT,
                             capture_output=True, text=True, env={**os.environ, "FL_SIM_CACHE": cache})
        if res.returncode != 0:
            raise SystemExit(f"{name} failed:\n{res.stderr[-3000:]}")
        print(name, res.stdout.strip().splitlines()[-1], flush=True)
        dirs.append(str(out))
    report_dir = ROOT / "benchmarks/results/fleet_ml1m"
    shutil.rmtree(report_dir, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "fl_sim.report", *dirs, f"output_dir={report_dir}"], cwd=ROOT, check=True)
    table = pd.read_csv(report_dir / "comparison.csv").drop(columns=["path"])
    table.insert(0, "case", list(runs))
    summaries = {name: json.loads((base / name / "summary.json").read_text()) for name in runs}
    result = {"what": "fleet simulation on ML-1M (ml1m_sas), 5,000 devices, default devices and sim settings",
              "common_args": common, "runs": runs, "table": table.to_dict(orient="records"), "summaries": summaries}
    (ROOT / "benchmarks/results/fleet_ml1m.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table.to_string())


if __name__ == "__main__":
    main()
