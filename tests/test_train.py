"""Central training end to end on real data (small budgets), metrics contract, checkpoints."""

import json

import numpy as np
import pytest
import torch

from fl_sim.data import load_dataset
from fl_sim.models import checkpoint
from fl_sim.models.factory import build_model
from fl_sim.training import OfflineData, evaluate, fit
from helpers import make_cfg, run_module


@pytest.fixture(scope="module")
def ml100k(shared_data, tmp_path_factory):
    cfg = make_cfg("dataset=ml100k", f"dataset.path={shared_data / 'ml-100k'}", "model.maxlen=50")
    inter, _ = load_dataset(cfg.dataset, 10**6, 0, tmp_path_factory.mktemp("cache"))
    return OfflineData(inter), cfg


def small_model(cfg, method, data):
    cfg = make_cfg("dataset=ml100k", f"method={method}", "model.maxlen=50", "model.n_blocks=2", "model.d=32")
    return build_model(cfg.model, cfg.method, data.n_items)


@pytest.mark.parametrize("method", ["device_rec", "forward_ofa"])
def test_training_learns(ml100k, method):
    data, cfg = ml100k
    torch.manual_seed(0)
    model = small_model(cfg, method, data)
    before = evaluate(model, data, "valid")
    result = fit(model, data, lr=3e-3, batch=128, max_epochs=8, patience=8, ce_positions=20)
    after = evaluate(model, data, "valid")
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert after.ndcg10 > 2 * before.ndcg10 and after.ndcg10 > 0.02
    assert after.ndcg10 == pytest.approx(result.best_valid)


def test_plateau_schedule_follows_validation(ml100k):
    """The learning rate halves once more than `decay_patience` epochs in a row bring no better
    validation NDCG@10, recomputed here from the recorded validation history."""
    data, cfg = ml100k
    torch.manual_seed(0)
    model = small_model(cfg, "device_rec", data)
    result = fit(model, data, lr=0.05, batch=256, max_epochs=8, patience=8, ce_positions=10, lr_decay=0.5,
                 decay_patience=1)
    expected, lr, best, bad = [], 0.05, -1.0, 0
    for row in result.history:
        expected.append(lr)  # the rate this epoch trained with
        if row["valid_ndcg10"] > best:
            best, bad = row["valid_ndcg10"], 0
        else:
            bad += 1
            if bad > 1:
                lr, bad = lr * 0.5, 0
    assert [row["lr"] for row in result.history] == pytest.approx(expected)
    assert expected[-1] < 0.05  # lr 0.05 is too high for this model: validation stalls and the rate falls


def test_training_stops_after_max_sequences(ml100k):
    """The work bound, in whole epochs: an epoch runs only if its sequences (one per user) fit in
    what is left of `max_sequences`; a first epoch longer than the bound stops at the end of the
    batch that reaches it, and is validated as any other."""
    data, cfg = ml100k
    n = len(data)

    def fit_with(max_sequences, max_epochs=5):
        torch.manual_seed(0)
        result = fit(small_model(cfg, "device_rec", data), data, max_epochs=max_epochs, patience=5,
                     max_sequences=max_sequences, max_minutes=None)
        return result.epochs, result.stopped, result.history[-1]["sequences"]

    epochs, stopped, seen = fit_with(1)
    assert (epochs, stopped) == (1, "max_sequences") and 1 <= seen <= 128
    assert fit_with(n) == (1, "max_sequences", n)
    assert fit_with(2 * n - 1) == (1, "max_sequences", n)
    assert fit_with(2 * n) == (2, "max_sequences", 2 * n)
    assert fit_with(10 * n, max_epochs=2) == (2, "max_epochs", 2 * n)


def test_sampled_protocol_is_easier(ml100k):
    data, cfg = ml100k
    model = small_model(cfg, "device_rec", data)
    fit(model, data, lr=2e-3, max_epochs=2, ce_positions=20)
    full = evaluate(model, data, "test")
    sampled = evaluate(model, data, "test", protocol="sampled100")
    assert sampled.ndcg10 > full.ndcg10
    again = evaluate(model, data, "test", protocol="sampled100")
    assert again.ndcg10 == sampled.ndcg10  # negatives are seeded


def test_evaluation_does_not_depend_on_batching(ml100k):
    data, cfg = ml100k
    model = small_model(cfg, "forward_ofa", data)
    for head in model.mapper.heads:
        torch.nn.init.normal_(head.weight, std=0.01)
    a = evaluate(model, data, "test", batch=512)
    b = evaluate(model, data, "test", batch=37)
    np.testing.assert_allclose(a.per_user_ndcg, b.per_user_ndcg, atol=1e-9)
    np.testing.assert_array_equal(a.gates, b.gates)


def test_train_command_writes_metrics_and_checkpoint(shared_data, tmp_path):
    out = tmp_path / "run"
    res = run_module("fl_sim.train", "dataset=ml100k", f"dataset.path={shared_data / 'ml-100k'}",
                     "method=forward_ofa", "model.n_blocks=3", "model.d=32", "model.maxlen=50",
                     "train.max_epochs=2", f"output_dir={out}", env={"FL_SIM_CACHE": str(tmp_path / "c")})
    assert res.returncode == 0, res.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("dataset", "model", "method", "ndcg10", "hit10", "flops", "params", "train_s"):
        assert key in metrics
    assert metrics["dataset"] == "ml100k" and metrics["method"] == "forward_ofa"
    assert sum(metrics["kept_blocks_hist"]) == metrics["users"] == 943
    assert 0 < metrics["flops_ratio_full"] <= 1
    assert (out / "checkpoint.pt").exists()


def test_checkpoint_from_another_config_is_refused(ml100k, tmp_path):
    data, cfg = ml100k
    cfg_a = make_cfg("dataset=ml100k", "method=forward_ofa", "model.n_blocks=2", "model.d=32")
    model = build_model(cfg_a.model, cfg_a.method, data.n_items)
    path = tmp_path / "ck.pt"
    checkpoint.save(path, model, checkpoint.fingerprint(cfg_a, data.n_items))
    fresh = build_model(cfg_a.model, cfg_a.method, data.n_items)
    checkpoint.load(path, fresh, checkpoint.fingerprint(cfg_a, data.n_items))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, fresh.state_dict()[name])
    cfg_b = make_cfg("dataset=ml100k", "method=forward_ofa", "model.n_blocks=2", "model.d=32", "method.lam=0.1")
    with pytest.raises(checkpoint.CheckpointError, match="method"):
        checkpoint.load(path, fresh, checkpoint.fingerprint(cfg_b, data.n_items))
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match="not a readable"):
        checkpoint.load(path, fresh, checkpoint.fingerprint(cfg_a, data.n_items))


def test_the_gap_list_splits_ml1m_users_as_its_readme_says(shared_data, tmp_path):
    from fl_sim.train import by_users, user_groups
    from fl_sim.training import EvalResult

    cfg = make_cfg("dataset=ml1m_sas", f"dataset.path={shared_data / 'ml-1m' / 'ml-1m-sas.txt.gz'}")
    inter, info = load_dataset(cfg.dataset, 10**6, 0, tmp_path)
    groups = user_groups(cfg.dataset, info, OfflineData(inter))
    assert groups["gap"].sum() == 2779 and groups["complete"].sum() == 3261 and groups["all"].sum() == 6040
    # by hand: NDCG 1, 0, 0.5, 0 for four users, the middle two with a gap
    res = EvalResult(ndcg10=0.375, hit10=0.5, users=4, per_user_ndcg=np.array([1.0, 0.0, 0.5, 0.0]),
                     gates=np.ones((4, 1)), kept_blocks=np.ones(4, int), block_usage=np.ones(1))
    gap = np.array([False, True, True, False])
    got = by_users(res, {"all": np.ones(4, bool), "complete": ~gap, "gap": gap})
    assert got["complete"] == {"ndcg10": 0.5, "hit10": 0.5, "users": 2}
    assert got["gap"] == {"ndcg10": 0.25, "hit10": 0.5, "users": 2}
    assert got["all"]["ndcg10"] == 0.375


def _sas_file(folder, gaps):
    rng = np.random.default_rng(0)
    lines = [f"{u} {i}" for u in range(1, 41) for i in rng.integers(1, 60, 25)]
    (folder / "sas.txt").write_text("\n".join(lines) + "\n")
    (folder / "gap_users.txt").write_text("\n".join(str(u) for u in gaps) + "\n")
    return folder / "sas.txt"


def test_train_reports_complete_users_apart(tmp_path):
    path = _sas_file(tmp_path, range(1, 11))
    out = tmp_path / "run"
    common = ["dataset=ml1m_sas", f"dataset.path={path}", "method=device_rec", "model.n_blocks=1", "model.d=16",
              "model.maxlen=20", "train.max_epochs=1"]
    res = run_module("fl_sim.train", *common, "eval.users=complete", f"output_dir={out}",
                     env={"FL_SIM_CACHE": str(tmp_path / "c")})
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    groups = m["by_users"]
    assert m["eval_users"] == "complete" and m["users"] == groups["complete"]["users"] == 30
    assert groups["gap"]["users"] == 10 and groups["all"]["users"] == 40
    assert m["ndcg10"] == groups["complete"]["ndcg10"]
    assert groups["all"]["ndcg10"] * 40 == pytest.approx(groups["complete"]["ndcg10"] * 30
                                                          + groups["gap"]["ndcg10"] * 10)

    _sas_file(tmp_path, [1, 2, 999])  # a list from another file
    res = run_module("fl_sim.train", *common, f"output_dir={tmp_path / 'bad'}", env={"FL_SIM_CACHE": str(tmp_path / "c")})
    assert res.returncode != 0 and "1 of the 3 users" in res.stderr and "Traceback" not in res.stderr


def test_complete_users_need_a_gap_list(shared_data, tmp_path):
    res = run_module("fl_sim.train", "dataset=ml100k", f"dataset.path={shared_data / 'ml-100k'}", "eval.users=complete",
                     f"output_dir={tmp_path / 'run'}", env={"FL_SIM_CACHE": str(tmp_path / "c")})
    assert res.returncode != 0 and "eval.users=complete needs a list" in res.stderr and "Traceback" not in res.stderr


@pytest.fixture
def reproduce(tmp_path, monkeypatch):
    """benchmarks/reproduce.py writing its results to tmp_path, without drawing."""
    from helpers import ROOT

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import reproduce

    monkeypatch.setattr(reproduce, "RESULTS", tmp_path / "reproduction.json")
    monkeypatch.setattr(reproduce, "plot", lambda rows, path: None)
    return reproduce


def test_reproduction_rows_of_two_backbones_live_side_by_side(reproduce):
    """benchmarks/reproduce.py keys a row by name, data set and model: a NextItNet `device_rec`
    must not replace the SASRec one, and each row's ratios are to its own backbone's."""
    def row(name, model, ndcg, flops):
        return {"name": name, "method": name, "model": model, "dataset": "ml1m_sas", "ndcg10": ndcg, "flops": flops,
                "params": 1.0, "shipped_params": 1.0}

    reproduce._merge([row("device_rec", "sasrec", 0.15, 120.0), row("forward_ofa", "sasrec", 0.12, 60.0)])
    rows = reproduce._merge([row("device_rec", "nextitnet", 0.10, 200.0), row("forward_ofa", "nextitnet", 0.11, 50.0)])
    got = {(r["model"], r["name"]): (r["ndcg10_vs_device_rec"], r["flops_vs_device_rec"]) for r in rows}
    assert got == {("sasrec", "device_rec"): (1.0, 1.0), ("sasrec", "forward_ofa"): (0.8, 0.5),
                   ("nextitnet", "device_rec"): (1.0, 1.0), ("nextitnet", "forward_ofa"): (pytest.approx(1.1), 0.25)}
    rows = reproduce._merge([row("device_rec", "nextitnet", 0.12, 200.0)])  # the same key: replaced
    assert len(rows) == 4 and [r["ndcg10"] for r in rows if r["model"] == "nextitnet" and r["name"] == "device_rec"] == [0.12]


def test_seeds_added_later_give_the_row_of_all_seeds_at_once(reproduce, tmp_path):
    """`reproduce.py --add-seeds`: seed 0's row joined with a later run of seeds 1 and 2 equals
    the row that one invocation over seeds 0, 1, 2 writes; a different cap is refused."""
    def run(seed, ndcg):
        return {"seed": seed, "ndcg10": ndcg, "hit10": 2 * ndcg, "flops": 100.0 + seed, "params": 5.0,
                "shipped_params": 5.0, "kept_blocks_mean": 2.0 + seed, "train_s": 60.0 * (seed + 1), "epochs": 10 + seed,
                "stopped": "early_stopping", "best_epoch": seed, "threads": 1,
                "by_users": {"all": {"ndcg10": ndcg, "hit10": 2 * ndcg, "users": 10},
                             "complete": {"ndcg10": ndcg + 0.01, "hit10": 0.5, "users": 6}}}

    runs = [run(0, 0.10), run(1, 0.13), run(2, 0.16)]
    args = ("forward_ofa", "beauty", "sasrec", "forward_ofa", 60.0, [])
    reproduce.write([reproduce.row(*args, runs[:1])])
    reproduce.write([reproduce.row(*args, runs[1:])], add_seeds=True)
    joined = json.loads((tmp_path / "reproduction.json").read_text())["rows"]
    whole = reproduce.row(*args, runs)
    assert len(joined) == 1 and joined[0]["seeds"] == [0, 1, 2]
    for k in ("ndcg10", "hit10", "flops", "kept_blocks_mean", "train_s"):
        assert joined[0][k] == pytest.approx(whole[k])
    assert joined[0]["ndcg10"] == pytest.approx(0.13) and joined[0]["by_users"]["complete"]["ndcg10"] == pytest.approx(0.14)
    assert joined[0]["ndcg10_per_seed"] == [0.10, 0.13, 0.16] and joined[0]["epochs"] == [10, 11, 12]
    assert joined[0]["by_users_per_seed"]["complete"] == pytest.approx([0.11, 0.14, 0.17])
    with pytest.raises(SystemExit, match="max_minutes"):
        reproduce.write([reproduce.row("forward_ofa", "beauty", "sasrec", "forward_ofa", 30.0, [], [run(3, 0.1)])],
                        add_seeds=True)
    with pytest.raises(SystemExit, match="already has seeds"):
        reproduce.write([reproduce.row(*args, [run(1, 0.1)])], add_seeds=True)
