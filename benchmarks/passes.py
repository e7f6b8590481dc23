"""The backbone passes of a run and of its compute floor, counted and timed: how many passes,
over how many positions (padded, and real items), and how many block-positions (a position
times the blocks that ran on it), with the seconds spent in them. In one process on one
thread, so that the two are compared on the same footing.

    python benchmarks/passes.py [--runs 3] num_clients=5000 [more fl_sim.run overrides]

Runs `python -m fl_sim.run ... sim.backend=inprocess` in this process with a counting wrapper
on `Backbone.forward`, then the per-version floor (benchmarks/floor.py) over the same events
with the model versions that run installed, --runs times in separate processes (the machine's
speed varies). Writes benchmarks/results/passes.json: each pair {"run": {...}, "floor": {...}}
with the round loop's and the floor's seconds and the summary's NDCG@10, and the median ratio
(pre-training cached, as in `benchmarks/bench_fleet.py`: set FL_SIM_CACHE).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from fl_sim.models import backbone  # noqa: E402


class Count:
    """Wraps Backbone.forward: passes, positions, real items, block-positions and seconds."""

    def __init__(self):
        self.forward = backbone.Backbone.forward
        self.reset()
        count = self

        def counted(bb, seq, *args, **kwargs):
            start = time.perf_counter()
            out = count.forward(bb, seq, *args, **kwargs)
            count.seconds += time.perf_counter() - start
            keep, blocks = kwargs.get("keep"), kwargs.get("blocks")
            rows_blocks = (int(keep.sum()) if keep is not None else
                           (len(blocks) if blocks is not None else bb.n_blocks) * seq.shape[0])
            count.passes += 1
            count.positions += seq.numel()
            count.real += int((seq > 0).sum())
            count.block_positions += rows_blocks * seq.shape[1]
            return out

        backbone.Backbone.forward = counted

    def reset(self) -> None:
        self.passes = self.positions = self.real = self.block_positions = 0
        self.seconds = 0.0

    def result(self) -> dict:
        return {"passes": self.passes, "positions": self.positions, "real_positions": self.real,
                "block_positions": self.block_positions, "pass_s": round(self.seconds, 3),
                "us_per_block_position": round(1e6 * self.seconds / max(self.block_positions, 1), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # one pair, in this process
    opts, overrides = parser.parse_known_args()
    if not opts.one:  # each pair in a fresh process, so one does not warm the next
        pairs = []
        for _ in range(opts.runs):
            res = subprocess.run([sys.executable, __file__, "--one", *overrides], capture_output=True, text=True)
            if res.returncode != 0:
                raise SystemExit(f"passes.py failed:\n{res.stderr[-3000:]}")
            pairs.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(json.dumps(pairs[-1]), flush=True)
        result = {"what": __doc__.split("\n\n")[0], "overrides": overrides, "pairs": pairs,
                  "rounds_over_floor_median": statistics.median(p["rounds_over_floor"] for p in pairs)}
        (ROOT / "benchmarks" / "results" / "passes.json").write_text(json.dumps(result, indent=1) + "\n")
        return
    torch.set_num_threads(1)
    count = Count()
    import floor
    from fl_sim.run import main as run_main
    from fl_sim.memory import steady_heap

    steady_heap()
    out_dir = tempfile.mkdtemp(prefix="passes-")
    sys.argv = ["fl_sim.run", *overrides, "sim.backend=inprocess", f"output_dir={out_dir}"]
    try:
        run_main()
    except SystemExit as exc:  # Hydra's entry point exits when the run fails
        if exc.code:
            raise
    summary = json.loads((Path(out_dir) / "summary.json").read_text())
    run = {**count.result(), "rounds_s": round(summary["time_s"]["rounds"], 3), "ndcg10": summary["ndcg10"],
           "output_dir": out_dir}
    with tempfile.TemporaryDirectory() as tmp:
        fx, st = floor.deployed(str(floor.run_files(overrides, Path(tmp))))
        installs = floor.read_installs(out_dir)[0]
        count.reset()
        seconds, events, _, _ = floor.floor(fx, st, installs)
    print(json.dumps({"overrides": overrides, "threads": 1, "run": run,
                      "floor": {**count.result(), "floor_s": round(seconds, 3), "events": int(len(events))},
                      "rounds_over_floor": round(run["rounds_s"] / seconds, 2)}))


if __name__ == "__main__":
    main()
