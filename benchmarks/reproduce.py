"""The offline reproduction table (full ranking, leave-last-out).

    python benchmarks/reproduce.py [--dataset ml1m_sas] [--model sasrec] [--methods device_rec forward_ofa ...]
                                   [--seeds 0 1 2] [--max-minutes 60] [--minutes-for forward_ofa=25]
                                   [--extra key=value ...] [--tag " (label)"] [--threads N] [--add-seeds]
    python benchmarks/reproduce.py --plot-only

Trains each method with `python -m fl_sim.train` (early stopping on the validation item,
capped at --max-minutes), then, after `forward_ofa`, a depth-matched `device_rec` with as many
blocks as forward_ofa keeps on average. Each row of benchmarks/results/reproduction.json names
its method, model, data set, seeds, cap and the overrides it ran with (the command that
reproduces it); rows of earlier invocations are kept, a row of the same name, data set and model
is replaced; with --add-seeds, the new seeds join the row of the same name instead (same cap,
overrides and threads; its means become the means over all its seeds). Prints a Markdown table
beside the paper's numbers and draws benchmarks/results/reproduction.png (NDCG@10 against FLOPs
per inference, the paper's ratios marked).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("FL_SIM_SHARED", ROOT.parent / "shared")) / "data"
DATA = {"ml1m_sas": SHARED / "ml-1m/ml-1m-sas.txt.gz", "beauty": SHARED / "beauty/Beauty.txt"}
RESULTS = ROOT / "benchmarks/results/reproduction.json"
METHODS = ["device_rec", "forward_ofa", "forward_ofa_no_struct", "controller_only", "duet", "first_k", "last_k",
           "random_k", "finetune", "diet"]
PAPER = {  # SASRec, ML-1M, NDCG@10 / Hit@10 (Forward-OFA paper, Tables 1-3)
    ("ml1m_sas", "sasrec", "device_rec"): (0.0969, 0.1816), ("ml1m_sas", "sasrec", "controller_only"): (0.0946, 0.1765),
    ("ml1m_sas", "sasrec", "duet"): (0.1140, 0.2050), ("ml1m_sas", "sasrec", "forward_ofa_no_struct"): (0.1166, 0.2068),
    ("ml1m_sas", "sasrec", "forward_ofa"): (0.1182, 0.2081), ("ml1m_sas", "sasrec", "first_k"): (0.0174, None),
    ("ml1m_sas", "nextitnet", "device_rec"): (0.0975, 0.1846), ("ml1m_sas", "nextitnet", "forward_ofa"): (0.1226, 0.2140),
}
# The paper's ratios to DeviceRec, (FLOPs, NDCG@10), per model: where its claims would put each
# method beside this project's own device_rec (Table 1; FLOPs in its own units).
PAPER_RATIOS = {
    "sasrec": {"duet": (0.6244 / 0.6244, 0.1140 / 0.0969), "forward_ofa": (0.5699 / 0.6244, 0.1182 / 0.0969)},
    "nextitnet": {"forward_ofa": (0.6167 / 1.5053, 0.1226 / 0.0975)},
}
MEAN_KEYS = ("ndcg10", "hit10", "valid_ndcg10", "flops", "params", "shipped_params", "shipped_bytes",
             "shipped_bytes_bits", "once_bytes_reference", "kept_blocks_mean", "train_s")  # DIET: bytes as coded, as bits


def command(dataset: str, model: str, method: str, seed: int, minutes: float, overrides: list[str]) -> list[str]:
    path = os.path.relpath(DATA[dataset], ROOT)  # run from the project's folder
    return ["python", "-m", "fl_sim.train", f"dataset={dataset}", f"dataset.path={path}", f"model={model}",
            f"method={method}", f"seed={seed}", f"train.max_minutes={minutes}", *overrides]


def train(dataset: str, model: str, method: str, seed: int, minutes: float, overrides: list[str],
          threads: Optional[int] = None) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"{method}-{seed}-"))
    cmd = command(dataset, model, method, seed, minutes, overrides)
    print("+", " ".join(cmd[2:]), flush=True)
    env = os.environ | ({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {})
    subprocess.run([sys.executable, *cmd[1:], f"output_dir={out}"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   env=env)
    metrics = json.loads((out / "metrics.json").read_text())
    metrics.pop("history", None)
    metrics["threads"] = threads or os.cpu_count()
    return metrics


def row(name: str, dataset: str, model: str, method: str, minutes: float, overrides: list[str],
        runs: list[dict]) -> dict:
    """One table row: what ran (method, model, data set, seeds, cap, overrides, the command of
    its first seed) and its metrics, averaged over the seeds."""
    seeds = [r["seed"] for r in runs]
    out = {"name": name, "method": method, "model": model, "dataset": dataset, "seeds": seeds,
           "max_minutes": minutes, "overrides": overrides,
           "command": " ".join(command(dataset, model, method, seeds[0], minutes, overrides)),
           **{k: statistics.mean(r[k] for r in runs) for k in MEAN_KEYS if k in runs[0]},
           "ndcg10_per_seed": [r["ndcg10"] for r in runs], "epochs": [r["epochs"] for r in runs],
           "stopped": [r["stopped"] for r in runs], "best_epoch": [r.get("best_epoch") for r in runs],
           "threads": runs[0].get("threads"), "eval_users": runs[0].get("eval_users", "all")}
    if all("by_users" in r for r in runs):  # test figures per user group (all / complete / gap)
        out["by_users"] = {g: {k: statistics.mean(r["by_users"][g][k] for r in runs) for k in ("ndcg10", "hit10")}
                           | {"users": runs[0]["by_users"][g]["users"]} for g in runs[0]["by_users"]}
        out["by_users_per_seed"] = {g: [r["by_users"][g]["ndcg10"] for r in runs] for g in runs[0]["by_users"]}
    for key in ("kept_blocks_hist", "block_usage", "distinct_structures", "mask_code"):
        if key in runs[0]:
            out[key] = runs[0][key]
    same_model = not any(x.lstrip("+").startswith("model.") for x in overrides)  # not a depth-matched variant
    out["paper_ndcg10"], out["paper_hit10"] = PAPER.get((dataset, model, method), (None, None)) if same_model \
        else (None, None)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="ml1m_sas", choices=sorted(DATA))
    parser.add_argument("--model", default="sasrec")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--max-minutes", type=float, default=60)
    parser.add_argument("--minutes-for", nargs="*", default=[], help="per-method caps: METHOD=MINUTES")
    parser.add_argument("--extra", nargs="*", default=[], help="more key=value overrides for every run")
    parser.add_argument("--tag", default="", help="suffix for this invocation's row names")
    parser.add_argument("--no-depth-matched", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per run (default: all cores); 1 lets two runs share 2 cores")
    parser.add_argument("--add-seeds", action="store_true",
                        help="add these seeds to the existing row of the same name instead of replacing it")
    parser.add_argument("--plot-only", action="store_true", help="redraw reproduction.png from the results")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads(RESULTS.read_text())["rows"], RESULTS.with_name("reproduction.png"))
        return
    minutes = {m: float(v) for m, v in (x.split("=") for x in args.minutes_for)}
    for method in args.methods:
        cap = minutes.get(method, args.max_minutes)
        runs = [train(args.dataset, args.model, method, s, cap, args.extra, args.threads) for s in args.seeds]
        rows = [row(method + args.tag, args.dataset, args.model, method, cap, args.extra, runs)]
        if method == "forward_ofa" and not args.no_depth_matched:  # the depth-matched baseline right after it
            k = max(1, round(statistics.mean(r["kept_blocks_mean"] for r in runs)))
            cap = minutes.get("device_rec", args.max_minutes)
            extra = [x for x in args.extra if not x.lstrip("+").startswith("method.")] + [f"model.n_blocks={k}"]
            runs = [train(args.dataset, args.model, "device_rec", s, cap, extra, args.threads) for s in args.seeds]
            rows.append(row(f"device_rec ({k} blocks)", args.dataset, args.model, "device_rec", cap, extra, runs))
        write(rows, add_seeds=args.add_seeds)


def write(new_rows: list[dict], add_seeds: bool = False) -> None:
    """Adds the rows to the results file (under a lock: several invocations may share it)."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = _merge(new_rows, add_seeds)
    table(rows)


def join_seeds(old: dict, new: dict) -> dict:
    """One row over the seeds of both: means weighted by their seed counts, per-seed lists
    joined. Only rows of the same run (method, cap, overrides, threads) and other seeds join."""
    for k in ("method", "max_minutes", "overrides", "threads"):
        if old.get(k) != new.get(k):
            raise SystemExit(f"--add-seeds: row {old['name']!r} ran with {k}={old.get(k)!r}, these seeds with "
                             f"{new.get(k)!r}; run them as their own row (--tag) instead")
    if set(old["seeds"]) & set(new["seeds"]):
        raise SystemExit(f"--add-seeds: row {old['name']!r} already has seeds {sorted(set(old['seeds']) & set(new['seeds']))}")
    n_old, n_new = len(old["seeds"]), len(new["seeds"])
    mean = lambda a, b: (a * n_old + b * n_new) / (n_old + n_new)  # noqa: E731
    out = dict(old, seeds=old["seeds"] + new["seeds"])
    for k in MEAN_KEYS:
        if k in old and k in new:
            out[k] = mean(old[k], new[k])
    for k in ("ndcg10_per_seed", "epochs", "stopped", "best_epoch"):
        out[k] = old.get(k, [None] * n_old) + new.get(k, [None] * n_new)
    if "by_users" in old and "by_users" in new:
        out["by_users"] = {g: {k: mean(old["by_users"][g][k], new["by_users"][g][k]) for k in ("ndcg10", "hit10")}
                           | {"users": old["by_users"][g]["users"]} for g in old["by_users"]}
        before = old.get("by_users_per_seed") or {g: [v["ndcg10"]] for g, v in old["by_users"].items()}
        out["by_users_per_seed"] = {g: before[g] + new["by_users_per_seed"][g] for g in before}
    return out


def _key(row: dict) -> tuple[str, str, str]:
    """What names a row: a NextItNet row never replaces a SASRec one of the same name."""
    return row["name"], row["dataset"], row["model"]


def _merge(new_rows: list[dict], add_seeds: bool = False) -> list[dict]:
    """Each new row replaces the row of its key (or, with `add_seeds`, joins it)."""
    rows = json.loads(RESULTS.read_text())["rows"] if RESULTS.exists() else []
    for new in new_rows:
        old = next((r for r in rows if _key(r) == _key(new)), None)
        if old is not None and add_seeds:
            new = join_seeds(old, new)
        rows = [r for r in rows if _key(r) != _key(new)] + [new]
    for r in rows:  # ratios to the plain device_rec of the same data set and model
        base = next((b for b in rows if _key(b) == ("device_rec", r["dataset"], r["model"])), None)
        for key in ("ndcg10", "flops", "params", "shipped_params"):
            r[f"{key}_vs_device_rec"] = r[key] / base[key] if base else None
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    tmp.replace(RESULTS)
    plot(rows, RESULTS.with_name("reproduction.png"))
    return rows


def spread(row: dict) -> float | None:
    """The standard deviation of a row's NDCG@10 over its seeds (None for one seed)."""
    per_seed = row.get("ndcg10_per_seed", [])
    return statistics.stdev(per_seed) if len(per_seed) > 1 else None


def table(rows: list[dict]) -> None:
    print("| data set | model | method | NDCG@10 | Hit@10 | complete users NDCG@10 | vs device_rec | FLOPs x | "
          "params x | blocks kept | paper |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rel = lambda k: f"{r[k]:.2f}" if r.get(k) is not None else "-"  # noqa: E731
        paper = f"{r['paper_ndcg10']:.4f}" if r["paper_ndcg10"] else "-"
        complete = r.get("by_users", {}).get("complete", {}).get("ndcg10")
        ndcg = f"{r['ndcg10']:.4f}" + (f" ± {spread(r):.4f}" if spread(r) is not None else "")
        print(f"| {r['dataset']} | {r['model']} | {r['name']} | {ndcg} | {r['hit10']:.4f} | "
              f"{'-' if complete is None else f'{complete:.4f}'} | "
              f"{rel('ndcg10_vs_device_rec')} | {rel('flops_vs_device_rec')} | {rel('params_vs_device_rec')} | "
              f"{r['kept_blocks_mean']:.2f} | {paper} |")


def plot(rows: list[dict], path: Path) -> None:
    """NDCG@10 against FLOPs per inference, one panel per data set and model, every row a point
    (a colour per method; filled: trained under the 60-minute cap, hollow: a shorter one; bars:
    the seeds' standard deviation), and
    crosses where the paper's ratios to DeviceRec would put its methods beside this device_rec."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({r["method"] for r in rows})
    colour = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    panels = sorted({(r["dataset"], r["model"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5), squeeze=False)
    for ax, (dataset, model) in zip(axes[0], panels):
        mine = [r for r in rows if (r["dataset"], r["model"]) == (dataset, model)]
        for m in sorted({r["method"] for r in mine}):
            for full_cap in (True, False):
                pts = [r for r in mine if r["method"] == m and (r["max_minutes"] >= 60) == full_cap]
                if pts:
                    ax.scatter([r["flops"] / 1e6 for r in pts], [r["ndcg10"] for r in pts], s=28,
                               facecolors=colour[m] if full_cap else "none", edgecolors=colour[m],
                               label=m if full_cap or not any(r["max_minutes"] >= 60 for r in mine
                                                              if r["method"] == m) else None)
        for r in mine:  # several seeds: their standard deviation
            if spread(r) is not None:
                ax.errorbar(r["flops"] / 1e6, r["ndcg10"], yerr=spread(r), color=colour[r["method"]], capsize=3, lw=1)
        for r in mine:
            if r["name"] != r["method"]:  # variants and shorter caps: their names
                ax.annotate(r["name"].removeprefix(r["method"]).strip(" ,") or r["name"],
                            (r["flops"] / 1e6, r["ndcg10"]), fontsize=5.5, xytext=(3, 2), textcoords="offset points",
                            color=colour[r["method"]])
        base = next((r for r in mine if r["name"] == "device_rec"), None)
        for method, (f, n) in PAPER_RATIOS.get(model, {}).items() if base else ():
            ax.scatter(base["flops"] * f / 1e6, base["ndcg10"] * n, marker="x", color="k", s=30)
            ax.annotate(f"paper's {method}: {n:.2f}x NDCG, {f:.2f}x FLOPs of device_rec",
                        (base["flops"] * f / 1e6, base["ndcg10"] * n), fontsize=6, xytext=(-150, 4),
                        textcoords="offset points")
        ax.set(xlabel="MFLOPs per inference", ylabel="test NDCG@10 (all users)",
               title=f"{dataset}, {model} (filled: 60-minute cap; hollow: shorter)")
        ax.set_ylim(0, ax.get_ylim()[1] * 1.08)  # room for the crosses' labels
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
