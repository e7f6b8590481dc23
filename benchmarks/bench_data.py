"""Wall time of `python -m fl_sim.data` as a user runs it (process start to exit).

    python benchmarks/bench_data.py [--runs 5]

Writes benchmarks/results/data.json: the median and all runs per case. Real datasets are
timed cold (empty cache) and warm (cache hit).
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
SHARED = Path(os.environ.get("FL_SIM_SHARED", ROOT.parent / "shared")) / "data"
REAL = {
    "ml100k": SHARED / "ml-100k",
    "ml1m": SHARED / "ml-1m/ratings.dat.gz",
    "ml1m_sas": SHARED / "ml-1m/ml-1m-sas.txt.gz",
    "beauty": SHARED / "beauty/Beauty.txt",
}


def timed(args: list[str], cache: str) -> float:
    out = tempfile.mkdtemp()
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fl_sim.data", *args, f"output_dir={out}"], cwd=ROOT, check=True,
                   capture_output=True, env={**os.environ, "FL_SIM_CACHE": cache})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    runs = parser.parse_args().runs
    cases: dict[str, list[float]] = {}
    for n in (1000, 5000, 20000):
        cases[f"synthetic_{n}"] = [timed([f"num_clients={n}"], tempfile.mkdtemp()) for _ in range(runs)]
    for name, path in REAL.items():
        args = [f"dataset={name}", f"dataset.path={path}"]
        cold, warm = [], []
        for _ in range(runs):
            cache = tempfile.mkdtemp()
            cold.append(timed(args, cache))
            warm.append(timed(args, cache))
        cases[f"{name}_cold"], cases[f"{name}_warm"] = cold, warm
    result = {
        "what": "wall seconds of `python -m fl_sim.data ...`, process start to exit",
        "runs": runs,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "median_s": {k: round(statistics.median(v), 3) for k, v in cases.items()},
        "all_s": {k: [round(x, 3) for x in v] for k, v in cases.items()},
    }
    out = ROOT / "benchmarks/results/data.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["median_s"], indent=2))


if __name__ == "__main__":
    main()
