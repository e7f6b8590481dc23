"""`python -m fl_sim.report DIR [DIR ...] [output_dir=OUT] [horizon=10]`

Compares runs (each DIR a run's output folder, or a Hydra multirun folder of them) and writes
into OUT (default: DIR/report for a multirun folder, else report/ beside the first DIR): comparison.md/.csv, by_group.csv and PNG
plots (pareto, by_tier_and_link, shifts, blocks_by_tier, install_delay), and by_summary.csv (per tier
and link class: requests, budget cuts, kept blocks, FLOPs, NDCG@10, request-to-install delay).
"""

from __future__ import annotations

import sys
from pathlib import Path

from fl_sim.errors import ConfigError, FlSimError
from fl_sim.report import plots, tables
from fl_sim.report.load import find_runs, labels

COLUMNS = ["run", "devices", "ndcg10", "hit10", "requests_per_device_day", "update_bytes_per_device_day",
           "bytes_per_device_day", "candidate_bytes_per_device_day", "install_delay_median_s", "install_delay_p90_s",
           "mflops_per_inference", "kparams_on_device", "shift_recall", "shift_precision", "requests_per_shift",
           "items_revealed_per_request", "budget_violations", "wall_s"]


def report(paths: list[str], out: Path, horizon: int = 10) -> dict:
    runs = find_runs(paths)
    names = labels(runs)
    out.mkdir(parents=True, exist_ok=True)
    table = tables.comparison(runs, names, horizon)
    table.to_csv(out / "comparison.csv", index=False)
    (out / "comparison.md").write_text(tables.to_markdown(table, COLUMNS))
    groups = tables.by_group(runs, names)
    groups.to_csv(out / "by_group.csv", index=False)
    summaries = tables.from_summaries(runs, names)
    summaries.to_csv(out / "by_summary.csv", index=False)
    figures = [plots.pareto(table, out), plots.by_group(groups, out),
               plots.shifts(runs, names, table, out, horizon), plots.blocks(groups, out),
               plots.install_delay(summaries, out)]
    return {"runs": len(runs), "out": str(out), "figures": [str(f) for f in figures if f]}


def parse(argv: list[str]) -> tuple[list[str], dict]:
    paths, opts = [], {"output_dir": None, "horizon": "10"}
    for arg in argv:
        if "=" in arg:
            key, value = arg.split("=", 1)
            if key not in opts:
                raise ConfigError(f"unknown option {key!r}; known: {', '.join(opts)}")
            opts[key] = value
        else:
            paths.append(arg)
    if not paths:
        raise ConfigError("give at least one run directory: python -m fl_sim.report DIR [DIR ...]")
    return paths, opts


def main(argv: list[str]) -> int:
    try:
        paths, opts = parse(argv)
        first = Path(paths[0]).resolve()
        default = first / "report" if not (first / "summary.json").exists() else first.parent / "report"
        out = Path(opts["output_dir"]) if opts["output_dir"] else default
        if not opts["horizon"].isdigit() or int(opts["horizon"]) < 1:
            raise ConfigError(f"horizon must be a positive number of events, got {opts['horizon']!r}")
        result = report(paths, out, int(opts["horizon"]))
    except FlSimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{result['runs']} runs -> {result['out']}/comparison.md")
    print((Path(result["out"]) / "comparison.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
