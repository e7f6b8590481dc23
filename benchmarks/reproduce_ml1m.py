"""Reproduction on ML-1M (SASRec preprocessing, full ranking, leave-last-out).

    python benchmarks/reproduce_ml1m.py [--methods device_rec forward_ofa ...] [--seeds 0 1 2]
                                        [--max-minutes 30] [--model sasrec]

Trains each method with `python -m fl_sim.train` (early stopping on the validation item,
capped at --max-minutes), then a depth-matched SASRec with as many blocks as forward_ofa keeps
on average. Writes benchmarks/results/reproduction_ml1m.json and prints a Markdown table
beside the paper's numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("FL_SIM_SHARED", ROOT.parent / "shared")) / "data/ml-1m/ml-1m-sas.txt.gz"
METHODS = ["device_rec", "forward_ofa", "forward_ofa_no_struct", "controller_only", "duet", "first_k", "last_k",
           "random_k", "finetune"]
PAPER = {  # SASRec, ML-1M, NDCG@10 / Hit@10 (Forward-OFA paper, Tables 1-3)
    "device_rec": (0.0969, 0.1816), "controller_only": (0.0946, 0.1765), "duet": (0.1140, 0.2050),
    "forward_ofa_no_struct": (0.1166, 0.2068), "forward_ofa": (0.1182, 0.2081), "first_k": (0.0174, None),
}


def train(method: str, seed: int, minutes: float, model: str, extra: list[str]) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"{method}-{seed}-"))
    cmd = [sys.executable, "-m", "fl_sim.train", "dataset=ml1m_sas", f"dataset.path={DATA}", f"model={model}",
           f"method={method}", f"seed={seed}", f"train.max_minutes={minutes}", f"output_dir={out}", *extra]
    print("+", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    metrics = json.loads((out / "metrics.json").read_text())
    metrics.pop("history", None)
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--max-minutes", type=float, default=30)
    parser.add_argument("--model", default="sasrec")
    parser.add_argument("--minutes-for", nargs="*", default=[], help="per-method caps: METHOD=MINUTES")
    parser.add_argument("--extra", nargs="*", default=[], help="more key=value overrides for every run")
    parser.add_argument("--tag", default="", help="suffix for this invocation's row names")
    parser.add_argument("--merge", type=Path, help="keep the rows of an earlier results file")
    parser.add_argument("--no-depth-matched", action="store_true")
    args = parser.parse_args()
    minutes = {m: float(v) for m, v in (x.split("=") for x in args.minutes_for)}
    old = json.loads(args.merge.read_text()) if args.merge else {"rows": {}, "invocations": []}
    if "invocations" not in old:  # a file from before invocations were recorded
        old["invocations"] = [{k: old.get(k) for k in ("seeds", "max_minutes", "minutes_for", "extra")}]
    runs: dict[str, list[dict]] = {}
    for method in args.methods:
        cap = minutes.get(method, args.max_minutes)
        runs[method + args.tag] = [train(method, s, cap, args.model, args.extra) for s in args.seeds]
        if method == "forward_ofa" and not args.no_depth_matched:  # the depth-matched baseline right after it
            k = max(1, round(statistics.mean(r["kept_blocks_mean"] for r in runs[method + args.tag])))
            cap = minutes.get("device_rec", args.max_minutes)
            extra = [x for x in args.extra if not x.lstrip("+").startswith("method.")]
            runs[f"device_rec_{k}_blocks"] = [train("device_rec", s, cap, args.model, [*extra, f"model.n_blocks={k}"])
                                              for s in args.seeds]
        write(args, runs, old)


def write(args, runs: dict[str, list[dict]], old: dict) -> None:
    rows = dict(old["rows"])
    for name, rs in runs.items():
        row = {key: statistics.mean(r[key] for r in rs) for key in
               ("ndcg10", "hit10", "valid_ndcg10", "flops", "params", "shipped_params", "kept_blocks_mean",
                "train_s")}
        row["ndcg10_per_seed"] = [r["ndcg10"] for r in rs]
        row["epochs"] = [r["epochs"] for r in rs]
        row["stopped"] = [r["stopped"] for r in rs]
        row["kept_blocks_hist"] = rs[0]["kept_blocks_hist"]
        row["block_usage"] = rs[0]["block_usage"]
        row["distinct_structures"] = rs[0]["distinct_structures"]
        row["overrides"] = args.extra
        row["paper_ndcg10"], row["paper_hit10"] = PAPER.get(name.removesuffix(args.tag), (None, None))
        rows[name] = row
    base = rows.get("device_rec")
    for row in rows.values():
        if base:
            row["ndcg_vs_device_rec"] = row["ndcg10"] / base["ndcg10"]
            row["flops_vs_device_rec"] = row["flops"] / base["flops"]
            row["params_vs_device_rec"] = row["params"] / base["params"]
            row["shipped_vs_device_rec"] = row["shipped_params"] / base["shipped_params"]
    out = ROOT / "benchmarks/results/reproduction_ml1m.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    invocation = {"methods": args.methods, "seeds": args.seeds, "max_minutes": args.max_minutes,
                  "minutes_for": args.minutes_for, "extra": args.extra, "tag": args.tag}
    invocations = [*old.get("invocations", [])]
    if not invocations or invocations[-1] != invocation:
        invocations.append(invocation)
    old["invocations"] = invocations
    out.write_text(json.dumps({"model": args.model, "invocations": invocations, "rows": rows}, indent=2) + "\n")
    print("| method | NDCG@10 | Hit@10 | vs device_rec | FLOPs x | params x | blocks kept | paper NDCG@10 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        rel = lambda k: f"{r[k]:.2f}" if r.get(k) is not None else "-"  # noqa: E731
        paper = f"{r['paper_ndcg10']:.4f}" if r["paper_ndcg10"] else "-"
        print(f"| {name} | {r['ndcg10']:.4f} | {r['hit10']:.4f} | {rel('ndcg_vs_device_rec')} | "
              f"{rel('flops_vs_device_rec')} | {rel('params_vs_device_rec')} | {r['kept_blocks_mean']:.2f} | {paper} |")


if __name__ == "__main__":
    main()
