"""Reports: request timing against true shifts, and a trigger sweep compared end to end."""

import json

import pandas as pd
import pytest

from fl_sim.report.load import Run, labels
from fl_sim.report.shifts import delays, shift_scores
from helpers import run_module
from helpers import SMALL


def test_shift_scores_by_hand():
    # Device 0: shift before its 3rd event, request at its 4th event (1 event later: recalled).
    # Device 1: shift before its 1st event, request at its 20th (too late for a horizon of 5).
    # Device 2: a request with no shift (imprecise). Device 3: shift with only 2 events after.
    shifts = pd.DataFrame({"device": [0, 1, 3], "time": [0.0, 0.0, 0.0], "event": [2, 0, 8], "events_after": [10, 30, 2]})
    requests = pd.DataFrame({"device": [0, 1, 2], "time": [0.0, 0.0, 0.0], "event": [4, 20, 3]})
    s = shift_scores(requests, shifts, horizon=5)
    assert s["shifts"] == 3 and s["shifts_scored"] == 2 and s["shifts_recalled"] == 1
    assert s["shift_recall"] == 0.5 and s["shift_precision"] == pytest.approx(1 / 3)
    assert s["requests_per_shift"] == 1.0
    assert sorted(delays(requests, shifts).tolist()) == [2.0, 20.0]  # device 3 never requests


def test_labels_name_what_differs(tmp_path):
    runs = []
    for name, trig in (("a", {"_target_": "clients.triggers.Drift", "threshold": 0.3}),
                       ("b", {"_target_": "clients.triggers.Budgeted", "inner": {"_target_": "clients.triggers.Drift"}})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(json.dumps({"seed": 0, "trigger": trig, "output_dir": name}))
        runs.append(Run(tmp_path / name))
    assert labels(runs) == ["drift", "budgeted/drift"]


def test_trigger_sweep_then_report(tmp_path):
    sweep = tmp_path / "sweep"
    env = {"FL_SIM_CACHE": str(tmp_path / "cache")}
    res = run_module("fl_sim.run", "-m", "trigger=never,always", "sim.backend=inprocess", *SMALL,
                     f"output_dir={sweep}", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_module("fl_sim.report", str(sweep))
    assert res.returncode == 0, res.stderr[-3000:]
    out = sweep / "report"
    table = pd.read_csv(out / "comparison.csv")
    assert table["run"].tolist() == ["never", "always"]
    never, always = table.iloc[0], table.iloc[1]
    assert never["requests_per_device_day"] == 0 and never["update_bytes_per_device_day"] == 0
    assert always["requests_per_device_day"] > 0 and always["shift_recall"] >= never["shift_recall"]
    assert "| never |" in (out / "comparison.md").read_text()
    groups = pd.read_csv(out / "by_group.csv")
    assert {"tier", "link_class"} == set(groups["by"]) and groups["ndcg10"].notna().any()
    for fig in ("pareto.png", "by_tier_and_link.png", "shifts.png", "blocks_by_tier.png"):
        assert (out / fig).stat().st_size > 10_000, fig


def test_report_refuses_bad_input(tmp_path):
    res = run_module("fl_sim.report", str(tmp_path))
    assert res.returncode == 2 and "no summary.json" in res.stderr
    res = run_module("fl_sim.report", str(tmp_path), "colour=red")
    assert res.returncode == 2 and "unknown option 'colour'" in res.stderr
