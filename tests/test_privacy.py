"""The cloud's inversion attack on uploads (fl_sim.privacy): its metrics recomputed by hand, a
case with a known answer, the defence's noise, and the command end to end on a small fleet."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from fl_sim import privacy
from helpers import SMALL, make_cfg, run_module

FAST = ["sim.backend=inprocess", "privacy.train_windows=1500", "privacy.epochs=3", "privacy.hidden=64"]


def test_an_upload_that_is_a_one_hot_of_an_item_is_inverted_to_that_item():
    n = 20
    items = np.repeat(np.arange(n), 10)
    x = np.eye(n, dtype=np.float32)[items]
    windows, nxt = items[:, None], (items + 1) % n  # the window is the item; the next one follows it
    inv = privacy.fit_inversion(x, windows, nxt, n_items=n, hidden=64, epochs=40, lr=3e-3)
    w_scores, n_scores = privacy.invert(inv, np.eye(n, dtype=np.float32))
    assert (w_scores.argmax(1) == np.arange(n)).all()
    assert (n_scores.argmax(1) == (np.arange(n) + 1) % n).all()
    got = privacy.evaluate(w_scores, n_scores, np.arange(n)[:, None], (np.arange(n) + 1) % n)
    assert got["window_recall10"] == 1.0 and got["window_ndcg10"] == 1.0 and got["next_ndcg10"] == 1.0
    assert got["membership_auc"] == 1.0


def test_recovery_and_membership_by_hand():
    scores = np.array([[0.9, 0.1, 0.5, 0.3, 0.7]])
    relevant = np.array([[2, 4, 1, 4, -1]])  # items 1, 2, 4 (4 twice: counts once)
    got = privacy.recovery(scores, relevant, k=2)  # top 2: items 0 and 4
    assert got["recall"] == pytest.approx(1 / 2)
    assert got["ndcg"] == pytest.approx((1 / np.log2(3)) / (1 + 1 / np.log2(3)))
    # members 0.1, 0.5, 0.7 against non-members 0.9, 0.3: 2 of 6 pairs ordered right
    assert privacy.membership_auc(scores, relevant) == pytest.approx(2 / 6)
    assert privacy.membership_auc(np.ones((1, 5)), relevant) == pytest.approx(0.5)  # ties: one half
    empty = privacy.recovery(scores, np.array([[-1]]))
    assert empty["n"] == 0


def test_the_truth_behind_a_request():
    item = np.array([5, 6, 7, 8, 9, 1, 2, 3])
    indptr, split = np.array([0, 5, 8]), np.array([3, 6])
    # device 0 saw 2 stream events (items 8, 9), device 1 saw 1 (item 2)
    ends = privacy.request_ends(split, np.array([0, 1]), np.array([2, 1]))
    assert ends.tolist() == [5, 7]
    windows, nxt = privacy.windows_at(item, indptr, np.array([0, 1]), ends, window=3)
    assert windows.tolist() == [[7, 8, 9], [-1, 1, 2]]
    assert nxt.tolist() == [-1, 3]  # device 0 has no event after; device 1's next is item 3
    device, at = privacy.history_positions(indptr, split, 10, np.random.default_rng(0))
    # every history position with an item before it and its next item in the history
    assert sorted(zip(device.tolist(), at.tolist())) == [(0, 1), (0, 2)]


def test_the_defence_is_keyed_and_a_device_upload_does_not_depend_on_its_batch():
    from clients import outbox
    from fl_sim.models.factory import build_model

    h = np.zeros((4000, 8), np.float32)
    g, ends = np.arange(4000), np.full(4000, 17)
    noisy = outbox.defend(h, g, ends, 0.5, seed=0)
    assert abs(noisy.mean()) < 0.02 and noisy.std() == pytest.approx(0.5, rel=0.03)
    assert np.array_equal(outbox.defend(h[7:8], g[7:8], ends[7:8], 0.5, seed=0), noisy[7:8])  # alone or in a batch
    assert not np.array_equal(outbox.defend(h, g, ends, 0.5, seed=0, stream=1), noisy)  # the attacker's own draws
    assert outbox.defend(h, g, ends, 0.0, seed=0) is h

    cfg = make_cfg(*SMALL, "method=forward_ofa")
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.method, 100).eval()
    rng = np.random.default_rng(0)
    short, full = rng.integers(1, 101, 3), rng.integers(1, 101, 60)
    alone = outbox.upload_vectors(model, [short], np.array([0]), np.array([3]), 0)
    together = outbox.upload_vectors(model, [full, short], np.array([1, 0]), np.array([60, 3]), 0)
    assert np.array_equal(alone[0][0], together[0][1]) and np.allclose(alone[1][0], together[1][1], atol=1e-6)


def _attack(tmp_path, name, *extra):
    out = tmp_path / name
    res = run_module("fl_sim.privacy", *SMALL, *FAST, *extra, f"output_dir={out}",
                     env={"FL_SIM_CACHE": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((out / "privacy.json").read_text()), out


def test_the_attack_end_to_end_with_and_without_the_defence(tmp_path):
    plain, out = _attack(tmp_path, "plain", "method=forward_ofa")
    requests = pd.read_parquet(out / "fleet/requests.parquet")
    uploads = np.load(out / "fleet/uploads.npz")
    assert len(uploads["h"]) == len(requests) == plain["uploads_total"] == plain["uploads_attacked"] > 0
    assert plain["alignment"]["checked"] > 0 and plain["alignment"]["max_abs_diff"] < 1e-5
    assert [r["uses"] for r in plain["rows"] if r["attack"] == "upload"] == \
        ["+".join(f) for f in privacy.ATTACKS["forward_ofa"]]
    assert {r["attack"] for r in plain["rows"]} == {"upload", "popularity", "history model", "items upload"}
    items = next(r for r in plain["rows"] if r["attack"] == "items upload")
    for key in ("window_recall10", "window_ndcg10", "membership_auc"):  # the items themselves
        assert items[key] == pytest.approx(1.0), key
    for row in plain["rows"]:
        for key in ("window_recall10", "window_ndcg10", "next_recall10", "next_ndcg10", "membership_auc"):
            assert 0.0 <= row[key] <= 1.0, (row, key)

    # Attacked again with another attack: the fleet run is reused, not simulated again.
    again, _ = _attack(tmp_path, "plain", "method=forward_ofa", "privacy.lr=0.002")
    assert not plain["fleet_reused"] and again["fleet_reused"] and again["fleet"] == plain["fleet"]

    # duet: every device keeps every block, generated from h (the small model's controller may keep none)
    duet, _ = _attack(tmp_path, "duet", "method=duet")
    noisy, _ = _attack(tmp_path, "noisy", "method=duet", "privacy.h_noise=0.5")
    assert [r["uses"] for r in duet["rows"] if r["attack"] == "upload"] == ["h", "user", "h+user"]
    # The fleet's devices really sent noisy h: the alignment check recomputed each upload from
    # its window plus the devices' draws at std 0.5 (without them it would be off by ~0.5).
    assert noisy["alignment"]["max_abs_diff"] < 1e-5 and noisy["h_noise"] == 0.5
    assert noisy["fleet"]["ndcg10"] != duet["fleet"]["ndcg10"]  # the generated models changed with h


def test_diet_requests_reveal_their_items(tmp_path):
    res, out = _attack(tmp_path, "diet", "method=diet")
    uploads = np.load(out / "fleet/uploads.npz")
    summary = json.loads((out / "fleet/summary.json").read_text())
    assert uploads["h"].shape[1] == 0 and uploads["items"].shape[1] == 50  # no h: the items themselves
    assert summary["items_revealed"] == int((uploads["items"] > 0).sum()) > 0
    upload = next(r for r in res["rows"] if r["attack"] == "upload")
    assert upload["uses"] == "items" and res["alignment"]["checked"] == res["uploads_attacked"]
    for key in ("window_recall10", "window_ndcg10", "membership_auc"):
        assert upload[key] == pytest.approx(1.0), key


def test_a_method_without_an_attack_is_refused(tmp_path):
    res = run_module("fl_sim.privacy", *SMALL, *FAST, "method=finetune", f"output_dir={tmp_path / 'x'}",
                     env={"FL_SIM_CACHE": str(tmp_path / "cache")})
    assert res.returncode != 0 and "method=finetune has no attack" in res.stderr
    assert "Traceback" not in res.stderr
