"""Cloud serving: (beta, h) for N requests in, N sub-models out, in one batched pass of the mapper.

    python benchmarks/bench_serving.py [--checkpoint DIR] [--requests 5000] [--runs 5]

With --checkpoint (a `fl_sim.train` output folder of forward_ofa on ml1m_sas) the requests come
from the trained controller and extractor reading real users' recent items, so the number of
blocks per request is the trained one. Without it, an untrained model with every block
selected is timed (the worst case: all heads run). Device-side encoding is not timed; the
cloud's work is: budget-aware block selection, the heads of the kept blocks, the payloads.
Writes benchmarks/results/serving.json (median of --runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from fl_sim.data import load_dataset
from fl_sim.models import checkpoint
from fl_sim.models.assemble import Budget, assemble
from fl_sim.models.factory import build_model
from fl_sim.training import OfflineData, left_pad

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("FL_SIM_SHARED", ROOT.parent / "shared")) / "data/ml-1m/ml-1m-sas.txt.gz"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if args.checkpoint:
        cfg = OmegaConf.load(args.checkpoint / "config.yaml")
    else:
        from hydra import compose, initialize_config_dir

        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
            cfg = compose("config", overrides=["dataset=ml1m_sas", f"dataset.path={DATA}", "method=forward_ofa"])
    inter, _ = load_dataset(cfg.dataset, 10**9, cfg.seed, cfg.cache_dir)
    data = OfflineData(inter)
    model = build_model(cfg.model, cfg.method, data.n_items)
    if args.checkpoint:
        checkpoint.load(args.checkpoint / "checkpoint.pt", model, checkpoint.fingerprint(cfg, data.n_items))
    model.eval()
    users = np.arange(args.requests) % len(data)
    recent = left_pad([data.history(j, "test") for j in users], model.spec.window)
    with torch.no_grad():
        beta, gate, h = model.encode(recent)
    if not args.checkpoint:
        gate = torch.ones_like(gate)
    budgets = [Budget()] * len(users)
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        subs = assemble(model, beta, gate, h, budgets)
        times.append(time.perf_counter() - start)
    result = {
        "requests": args.requests, "runs": args.runs, "threads": torch.get_num_threads(),
        "trained": bool(args.checkpoint), "median_s": statistics.median(times), "all_s": times,
        "mean_blocks": float(np.mean([len(s.blocks) for s in subs])),
        "payload_mb_total_fp32": sum(s.payload_bytes(model) for s in subs) / 1e6,
    }
    out = ROOT / "benchmarks/results/serving.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
