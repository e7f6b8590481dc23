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
