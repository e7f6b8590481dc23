"""What the cloud learns from uploads on ML-1M: `python -m fl_sim.privacy` for each method, and
for Forward-OFA under the Gaussian defence at several noise levels.

    python benchmarks/bench_privacy.py [--noise 0.3,1.0] [--pretrain-epochs 5] [--out DIR] [--plot-only]

5,000 ML-1M users of `ml1m_sas` as phones, in-process, the `drift` trigger, each method
pre-trained for a fixed number of epochs (not minutes, so the model does not depend on load),
as `benchmarks/fleet_ml1m.py`. Writes benchmarks/results/privacy.json (every command and its
privacy.json) and benchmarks/results/privacy_noise.png (the defence's curve: the fleet's
NDCG@10 and the attack's recall against the noise level), adding to the runs already there;
--plot-only redraws the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("FL_SIM_SHARED", ROOT.parent / "shared")) / "data/ml-1m/ml-1m-sas.txt.gz"
METHODS = ("forward_ofa", "duet", "device_rec", "diet")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--noise", default="0.3,1.0", help="privacy.h_noise levels for forward_ofa")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--pretrain-epochs", type=int, default=5)
    parser.add_argument("--out", default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--plot-only", action="store_true")
    opts = parser.parse_args()
    out_file = ROOT / "benchmarks/results/privacy.json"
    if opts.plot_only:
        plot(json.loads(out_file.read_text())["runs"], out_file.with_name("privacy_noise.png"))
        return
    base = Path(opts.out or tempfile.mkdtemp())
    cache = os.environ.get("FL_SIM_CACHE") or str(base / "cache")
    common = ["dataset=ml1m_sas", f"dataset.path={DATA}", "num_clients=5000", "trigger=drift",
              f"sim.pretrain.max_epochs={opts.pretrain_epochs}", "sim.pretrain.max_minutes=120",
              "sim.backend=inprocess"]
    runs = {m: [f"method={m}"] for m in opts.methods.split(",")}
    runs.update({f"forward_ofa_noise{s}": ["method=forward_ofa", f"privacy.h_noise={s}"]
                 for s in opts.noise.split(",") if s})
    # runs of earlier calls stay (a call with --methods diet --noise "" adds DIET's row)
    results = json.loads(out_file.read_text())["runs"] if out_file.exists() else {}
    for name, args in runs.items():
        out = base / name
        if not (out / "privacy.json").exists():  # finished by an earlier call
            start = time.perf_counter()
            res = subprocess.run([sys.executable, "-m", "fl_sim.privacy", *common, *args, f"output_dir={out}"],
                                 cwd=ROOT, capture_output=True, text=True, env={**os.environ, "FL_SIM_CACHE": cache})
            if res.returncode != 0:
                raise SystemExit(f"fl_sim.privacy {' '.join(args)} failed:\n{res.stderr[-3000:]}")
            print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
        results[name] = {"command": "python -m fl_sim.privacy " + " ".join([*common, *args]),
                         **json.loads((out / "privacy.json").read_text())}
        out_file.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                                        "runs": results}, indent=1))
    plot(results, out_file.with_name("privacy_noise.png"))
    for name, r in results.items():
        for row in r["rows"]:
            print(f"{name:24s} {row['attack']:14s} {row['uses']:16s} window R@10 {row['window_recall10']:.4f} "
                  f"next R@10 {row['next_recall10']:.4f} AUC {row['membership_auc']:.3f}")


def plot(results: dict, path: Path) -> None:
    """Forward-OFA under the defence: the fleet's NDCG@10 and the attack's window recall@10
    (from (beta, h), and from everything uploaded) against privacy.h_noise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted((r for r in results.values() if r["method"] == "forward_ofa"), key=lambda r: r["h_noise"])
    if len(runs) < 2:
        return
    x = [r["h_noise"] for r in runs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.plot(x, [r["fleet"]["ndcg10"] for r in runs], "o-")
    a.set(xlabel="privacy.h_noise (std of the noise on h)", ylabel="fleet NDCG@10", title="what the defence costs",
          ylim=(0, 1.2 * max(r["fleet"]["ndcg10"] for r in runs)))
    for uses, style in (("beta+h", "o-"), ("beta+h+user", "s--")):
        b.plot(x, [next(row["window_recall10"] for row in r["rows"] if row["uses"] == uses) for r in runs], style,
               label=f"attack on {uses}")
    for name, style in (("popularity", ":"), ("history model", "-.")):
        b.axhline(next(row["window_recall10"] for row in runs[0]["rows"] if row["attack"] == name), ls=style,
                  color="gray", label=f"{name} (no upload)")
    b.set(xlabel="privacy.h_noise", ylabel="recall@10 of the last 50 items", title="what the attack recovers")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
