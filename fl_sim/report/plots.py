"""The report's figures (PNG): the Pareto view, accuracy by tier and link, request timing
against ground-truth shifts, block usage and sub-model size by tier."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from fl_sim.report.load import Run  # noqa: E402
from fl_sim.report.shifts import delays  # noqa: E402
from fl_sim.report.tables import ordered  # noqa: E402


def _legend_outside(ax, fontsize: int = 7) -> None:
    """The legend beside the axes, never over the bars."""
    ax.legend(fontsize=fontsize, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pareto(table: pd.DataFrame, out: Path) -> Path:
    """NDCG@10 against the bytes each device spends a day on model updates after deployment
    (the first download is the same for every trigger); the frontier joins the runs that
    nothing beats on both."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    x = table["update_bytes_per_device_day"].fillna(table["bytes_per_device_day"]).to_numpy()
    y = table["ndcg10"].to_numpy()
    ax.scatter(x, y, zorder=3)
    for xi, yi, lab in zip(x, y, table["run"]):
        ax.annotate(lab, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    order = np.argsort(x)
    front, best = [], -np.inf
    for i in order:
        if y[i] > best:
            front.append(i)
            best = y[i]
    ax.plot(x[front], y[front], "--", color="gray", zorder=2, label="Pareto frontier")
    ax.set_xscale("symlog", linthresh=max(float(np.min(x[x > 0], initial=1e3)) / 10, 1.0))  # 0 stays visible
    ax.set(xlabel="update bytes per device per day", ylabel="fleet NDCG@10",
           title="Accuracy against communication")
    ax.legend(loc="best", fontsize=8)
    return _save(fig, out / "pareto.png")


def by_group(groups: pd.DataFrame, out: Path) -> Path | None:
    """NDCG@10 by device tier (low, mid, high) and by link class, one bar per run; both panels
    on one y-axis from 0, so bars compare across panels."""
    if groups.empty:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, kind in zip(axes, ("tier", "link_class")):
        pivot = groups[groups["by"] == kind].pivot(index="group", columns="run", values="ndcg10")
        pivot = pivot.loc[ordered(pivot.index)]
        pivot.plot.bar(ax=ax, rot=0, legend=False)
        ax.set(xlabel=kind.replace("_", " "), ylabel="NDCG@10", title=f"NDCG@10 by {kind.replace('_', ' ')}")
    axes[0].set_ylim(bottom=0)
    _legend_outside(axes[1])
    return _save(fig, out / "by_tier_and_link.png")


def install_delay(summaries: pd.DataFrame, out: Path) -> Path | None:
    """Seconds from a request to its answer installed, by link class: median (bar) and p90
    (whisker), one bar per run, on a log axis shared by every run."""
    links = summaries[(summaries["by"] == "link_class") & summaries["install_delay_median_s"].notna()] \
        if not summaries.empty else summaries
    if links.empty:
        return None
    med = links.pivot(index="group", columns="run", values="install_delay_median_s").astype(float)
    p90 = links.pivot(index="group", columns="run", values="install_delay_p90_s").astype(float)
    order = ordered(med.index)
    med, p90 = med.loc[order], p90.loc[order]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(len(med.columns), 1)
    x = np.arange(len(order))
    for i, run in enumerate(med.columns):
        m, p = med[run].to_numpy(), p90[run].to_numpy()
        ax.bar(x + (i - (len(med.columns) - 1) / 2) * width, m, width, label=run,
               yerr=np.vstack([np.zeros_like(m), np.nan_to_num(p - m)]), capsize=2)
    ax.set_xticks(x, order)
    ax.set(yscale="log", xlabel="link class", ylabel="seconds (median, whisker: p90)",
           title="Request to installed answer, by link class")
    _legend_outside(ax)
    return _save(fig, out / "install_delay.png")


def shifts(runs: list[Run], labels: list[str], table: pd.DataFrame, out: Path, horizon: int) -> Path | None:
    """Recall and precision of each trigger against the true shifts, and how many events after
    a shift each device's next request came."""
    if "shift_recall" not in table.columns:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    idx = np.arange(len(table))
    axes[0].bar(idx - 0.2, table["shift_recall"], 0.4, label=f"recall (within {horizon} events)")
    axes[0].bar(idx + 0.2, table["shift_precision"], 0.4, label="precision")
    for i, rps in zip(idx, table["requests_per_shift"]):
        axes[0].annotate(f"{rps:.2g} req/shift", (i, 0.02), ha="center", fontsize=7, rotation=90, color="white")
    axes[0].set_xticks(idx, table["run"], rotation=20, ha="right", fontsize=8)
    axes[0].set(ylim=(0, 1), title="Requests against true interest shifts")
    axes[0].legend(fontsize=8, loc="upper right")
    for run, label in zip(runs, labels):
        req, sh = run.table("requests"), run.table("shifts")
        if req is None or sh is None:
            continue
        d = np.sort(delays(req, sh))
        if len(d):
            axes[1].step(d, np.arange(1, len(d) + 1) / len(sh), where="post", label=label)
    axes[1].axvline(horizon, color="gray", ls=":")
    axes[1].set(xscale="log", xlim=(0.9, None), xlabel="events from a shift to the device's next request",
                ylabel="share of shifts", title="Time to react")
    _legend_outside(axes[1])
    return _save(fig, out / "shifts.png")


def blocks(groups: pd.DataFrame, out: Path) -> Path | None:
    """Block usage and sub-model size by device tier (one row of panels per run)."""
    usage_cols = [c for c in groups.columns if c.startswith("usage_block_")] if not groups.empty else []
    tiers = groups[groups["by"] == "tier"] if usage_cols else groups
    runs = list(dict.fromkeys(tiers["run"])) if usage_cols else []
    if not runs:
        return None
    runs = runs[:6]
    top = float(np.nanmax(tiers["mflops_per_inference"].to_numpy(dtype=float))) * 1.1
    fig, axes = plt.subplots(len(runs), 2, figsize=(11, 3 * len(runs)), squeeze=False)
    for row, run in zip(axes, runs):
        t = tiers[tiers["run"] == run].set_index("group")
        t = t.loc[ordered(t.index)]
        for group, g in t.iterrows():
            row[0].plot(np.arange(len(usage_cols)), g[usage_cols].to_numpy(dtype=float), marker="o", label=group)
        row[0].set(xlabel="block", ylabel="share of events held", ylim=(0, 1.05), title=f"{run}: block usage by tier")
        _legend_outside(row[0])
        row[1].bar(t.index, t["mflops_per_inference"])
        row[1].set(ylabel="MFLOPs per inference", ylim=(0, top), title=f"{run}: FLOPs by tier")
    return _save(fig, out / "blocks_by_tier.png")
