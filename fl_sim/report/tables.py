"""The comparison tables: one row per run, and metrics by device tier and link class."""

from __future__ import annotations

import numpy as np
import pandas as pd

from fl_sim.report.load import Run
from fl_sim.report.shifts import shift_scores


def run_row(run: Run, label: str, horizon: int) -> dict:
    s = run.summary
    row = {"run": label, "method": s.get("method"), "trigger": str(s.get("trigger", "")).rsplit(".", 1)[-1],
           "devices": s["num_devices"], "ndcg10": s["ndcg10"], "hit10": s["hit10"],
           "requests_per_device_day": s["requests"] / s["num_devices"] / run.days,
           "bytes_per_device_day": s["bytes_per_device_per_day"],
           "update_bytes_per_device_day": s.get("update_bytes_per_device_per_day", float("nan")),
           "mflops_per_inference": s["mean_flops_per_inference"] / 1e6,
           "kparams_on_device": s["mean_params_on_device"] / 1e3,
           "events_evaluated": s["events_evaluated"], "events_total": s["events_total"],
           "budget_violations": s["budget_violations"], "wall_s": s["wall_s"], "path": str(run.path),
           # item ids requests revealed to the cloud (DIET's requests carry them; 0 for the rest)
           "items_revealed_per_request": s.get("items_revealed", 0) / max(s["requests"], 1)}
    if "bytes_down_candidates" in s:
        row["candidate_bytes_per_device_day"] = s["bytes_down_candidates"] / s["num_devices"] / run.days
        row["model_bytes_per_device_day"] = s["bytes_down_model"] / s["num_devices"] / run.days
    delay = s.get("request_to_install_s", {}).get("all", {})
    row["install_delay_median_s"], row["install_delay_p90_s"] = delay.get("median"), delay.get("p90")
    requests, shifts = run.table("requests"), run.table("shifts")
    if requests is not None and shifts is not None:
        sc = shift_scores(requests, shifts, horizon)
        row.update({"shift_recall": sc["shift_recall"], "shift_precision": sc["shift_precision"],
                    "requests_per_shift": sc["requests_per_shift"], "shifts": sc["shifts"]})
    return row


def comparison(runs: list[Run], labels: list[str], horizon: int = 10) -> pd.DataFrame:
    return pd.DataFrame([run_row(r, lab, horizon) for r, lab in zip(runs, labels)])


def by_group(runs: list[Run], labels: list[str]) -> pd.DataFrame:
    """NDCG@10, sub-model size and block usage per device tier and per link class."""
    rows = []
    for run, label in zip(runs, labels):
        dev = run.table("devices")
        if dev is None:
            continue
        blocks = sorted((c for c in dev.columns if c.startswith("block_")), key=lambda c: int(c.split("_")[1]))
        for kind in ("tier", "link_class"):
            g = dev.groupby(kind, sort=True)
            sums = g[["ndcg", "hit", "scored", "params", "flops", *blocks]].sum()
            scored = sums["scored"].where(sums["scored"] > 0)
            part = pd.DataFrame({"run": label, "by": kind, "group": sums.index.astype(str),
                                 "devices": g.size().to_numpy(), "ndcg10": (sums["ndcg"] / scored).to_numpy(),
                                 "hit10": (sums["hit"] / scored).to_numpy(),
                                 "kparams_on_device": (sums["params"] / scored / 1e3).to_numpy(),
                                 "mflops_per_inference": (sums["flops"] / scored / 1e6).to_numpy(),
                                 "requests_per_device": (g["requests"].sum() / g.size()).to_numpy()})
            for b in blocks:
                part[f"usage_{b}"] = (sums[b] / scored).to_numpy()
            rows.append(part)
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


TIER_ORDER = ("low", "mid", "high")
LINK_ORDER = ("3g", "lte", "fixed", "wifi")


def ordered(groups) -> list:
    """Tiers low, mid, high and links slow to fast where the names are known; others after."""
    known = [g for g in (*TIER_ORDER, *LINK_ORDER) if g in set(groups)]
    return known + sorted(g for g in groups if g not in known)


def from_summaries(runs: list[Run], labels: list[str]) -> pd.DataFrame:
    """Per run, per device tier and per link class, what summary.json reports: requests, the
    share of answers whose budget removed blocks, kept blocks, FLOPs, NDCG@10, and the delay
    from a request to its answer installed (median, p90)."""
    rows = []
    for run, label in zip(runs, labels):
        for by, key in (("tier", "by_tier"), ("link_class", "by_link")):
            for group, g in run.summary.get(key, {}).items():
                delay = g.get("request_to_install_s", {})
                rows.append({"run": label, "by": by, "group": group, "devices": g["devices"],
                             "requests": g["requests"], "share_budget_cut": g["share_budget_cut"],
                             "mean_kept_blocks": g["mean_kept_blocks"],
                             "mflops_per_inference": (g["mean_flops_per_inference"] or np.nan) / 1e6,
                             "ndcg10": g["ndcg10"], "install_delay_median_s": delay.get("median"),
                             "install_delay_p90_s": delay.get("p90")})
    return pd.DataFrame(rows)


def to_markdown(df: pd.DataFrame, columns: list[str]) -> str:
    """A Markdown table (no extra dependency): numbers to 4 significant digits."""
    cols = [c for c in columns if c in df.columns]

    def fmt(v) -> str:
        if isinstance(v, (float, np.floating)):
            return "" if np.isnan(v) else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df[cols].itertuples(index=False)]
    return "\n".join(lines) + "\n"
