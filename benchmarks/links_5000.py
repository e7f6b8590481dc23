"""What a slow link costs: the same 5,000 synthetic devices, every one on one link class.

    python benchmarks/links_5000.py [--cache DIR] [--out DIR]

Runs the default fleet (seed 0, in-process, pre-training bounded by epochs as in
triggers_5000.py) three times, every device on 3G, on LTE, then on Wi-Fi (the link classes of
conf/devices/tiers.yaml); everything else, the devices' interests and phones included, is the
same. Writes benchmarks/results/links_5000.json: NDCG@10, the seconds from a request to its
answer installed, and the share of events ranked while an answer was on its way.
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
LINKS = ("3g", "lte", "wifi")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--cache", default=None)
    opts = parser.parse_args()
    base = Path(opts.out or tempfile.mkdtemp())
    cache = opts.cache or os.environ.get("FL_SIM_CACHE") or str(base / "cache")
    common = ["num_clients=5000", "sim.backend=inprocess", "sim.pretrain.max_epochs=5", "sim.pretrain.max_minutes=60"]
    rows = {}
    for link in LINKS:
        only = [f"devices.links.{k}.share={1.0 if k == link else 1e-12}" for k in LINKS]
        out = base / link
        res = subprocess.run([sys.executable, "-m", "fl_sim.run", *common, *only, f"output_dir={out}"], cwd=ROOT,
                             capture_output=True, text=True, env={**os.environ, "FL_SIM_CACHE": cache})
        if res.returncode != 0:
            raise SystemExit(f"{link} failed:\n{res.stderr[-3000:]}")
        s = json.loads((out / "summary.json").read_text())
        rows[link] = {"ndcg10": s["ndcg10"], "hit10": s["hit10"], "requests": s["requests"],
                      "request_to_install_s": s["request_to_install_s"]["all"],
                      "share_events_waiting": s["events_waiting"] / max(s["events_evaluated"], 1),
                      "by_link": s["by_link"]}
        print(link, json.dumps({k: rows[link][k] for k in ("ndcg10", "request_to_install_s", "share_events_waiting")}),
              flush=True)
    result = {"what": "5,000 synthetic devices, seed 0, every device on one link class", "common_args": common,
              "runs": rows}
    (ROOT / "benchmarks/results/links_5000.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
