"""Backbones, Forward-OFA parts, sub-model assembly and cost accounting."""

import math

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from fl_sim.models import cost
from fl_sim.models.assemble import Budget, assemble, run_submodel, select_blocks
from fl_sim.models.backbone import Backbone
from fl_sim.models.blocks import LowRank
from fl_sim.models.forward_ofa import argmax_gate, compact_loss, gumbel_gate
from fl_sim.models.payload import roundtrip
from fl_sim.models.recommender import MethodSpec, Recommender

KINDS = [("sasrec", 4), ("nextitnet", 6)]


def make(kind, L, method="forward_ofa", structure="learned", mapper=True, structural=True, perturb=True, k=2,
         generate="full"):
    torch.manual_seed(0)
    bb = Backbone(kind, n_items=50, d=16, n_blocks=L, maxlen=12, dropout=0.0)
    model = Recommender(bb, MethodSpec(method, structure, mapper, structural, k=k, generate=generate, rank=2), hidden=8)
    if perturb and model.mapper is not None:  # heads start at zero; make generated weights differ
        for head in model.mapper.heads:
            torch.nn.init.normal_(head.weight, std=0.05)
    return model.eval()


def batch(n=5, T=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, 51, (n, T), generator=g)
    seq[0, :7] = 0  # a short, padded sequence
    return seq


@pytest.mark.parametrize("generate", ["full", "lowrank"])
@pytest.mark.parametrize("kind,L", KINDS)
def test_submodel_equals_gated_full_model(kind, L, generate):
    model = make(kind, L, generate=generate)
    seq = batch()
    with torch.no_grad():
        full, beta, gate = model(seq, seq)
        beta, gate, h = model.encode(seq)
    subs = assemble(model, beta, gate, h, [Budget()] * len(seq))
    assert any(0 < len(s.blocks) < L for s in subs) or len({tuple(s.blocks) for s in subs}) > 1
    for i, sub in enumerate(subs):
        assert sub.blocks == torch.nonzero(gate[i]).flatten().tolist()
        out = run_submodel(model, sub, seq[i:i + 1])
        torch.testing.assert_close(out, full[i:i + 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,L", KINDS)
def test_one_pass_of_mixed_structures_equals_each_device_alone(kind, L):
    """`keep`: rows of different structures in one pass (a block runs on the rows that keep
    it, with their own generated weights) give what each row's sub-model gives alone."""
    model = make(kind, L, generate="lowrank")
    seq = batch(n=8)
    with torch.no_grad():
        _, _, h = model.encode(seq)
        keep = torch.rand(len(seq), L, generator=torch.Generator().manual_seed(3)) < 0.5
        keep[0], keep[1] = False, True  # a device with no block passes its embeddings through
        assert len({tuple(r.tolist()) for r in keep}) >= 4
        blocks = model.backbone.blocks
        rows = [torch.nonzero(keep[:, k]).flatten() for k in range(L)]
        mixed = model.backbone(seq, params=[model.mapper.block_params(b, k, h[rows[k]]) for k, b in enumerate(blocks)],
                               keep=keep)
        for i in range(len(seq)):
            alone = model.backbone(seq[i:i + 1], params=[model.mapper.block_params(b, k, h[i:i + 1])
                                                         for k, b in enumerate(blocks)],
                                   blocks=torch.nonzero(keep[i]).flatten().tolist())
            torch.testing.assert_close(mixed[i:i + 1], alone, atol=1e-5, rtol=1e-5)
    assert not torch.equal(mixed[2], mixed[3])


@pytest.mark.parametrize("kind,L", KINDS)
def test_padding_does_not_change_outputs(kind, L):
    model = make(kind, L)
    seq = batch(T=8)[1:2]
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), seq], 1)
    with torch.no_grad():
        a, _, _ = model(seq, seq)
        b, _, _ = model(padded, seq)
    torch.testing.assert_close(a, b[:, 4:], atol=1e-5, rtol=1e-5)


def test_generated_weights_are_per_device_and_block_independent():
    model = make("sasrec", 4)
    seq = batch()
    _, _, h = model.encode(seq)
    params = model.generate(h)
    assert not torch.allclose(params[0]["wq"][0], params[0]["wq"][1])
    # Block k's generated weights get gradients only through block k's head.
    model.train()
    out = model.backbone(seq, params=params, blocks=[2])
    out.sum().backward()
    grads = [hd.weight.grad for hd in model.mapper.heads]
    assert grads[2] is not None and grads[2].abs().sum() > 0
    assert all(g is None or g.abs().sum() == 0 for i, g in enumerate(grads) if i != 2)


def test_gumbel_straight_through():
    beta = torch.log_softmax(torch.randn(64, 6, 2), -1).requires_grad_()
    g = gumbel_gate(beta, tau=5.0)
    assert torch.allclose(g.detach(), g.detach().round())
    g.sum().backward()
    assert beta.grad.abs().sum() > 0
    assert torch.equal(argmax_gate(beta.detach()), (beta[..., 0] >= beta[..., 1]).float())
    # The compact constraint pushes towards skipping: its gradient raises the skip logit.
    b = torch.zeros(1, 3, 2, requires_grad=True)
    compact_loss(b).backward()
    assert (b.grad[..., 1] < 0).all() and (b.grad[..., 0] > 0).all()
    assert math.isclose(compact_loss(torch.zeros(1, 3, 2)).item(), 3 * math.log(2), rel_tol=1e-6)


def test_fixed_structures():
    L, k = 6, 2
    for structure, expected in (("first_k", [0, 1]), ("last_k", [4, 5])):
        model = make("sasrec", L, structure=structure, k=k)
        _, gate, _ = model.encode(batch())
        assert all(torch.nonzero(g).flatten().tolist() == expected for g in gate)
    model = make("sasrec", L, structure="random_k", k=k)
    _, gate, _ = model.encode(batch(n=40))
    assert (gate.sum(1) == k).all() and len({tuple(g.tolist()) for g in gate}) > 1


@pytest.mark.parametrize("kind,L", KINDS)
def test_flops_match_flop_counter(kind, L):
    model = make(kind, L, perturb=False)
    bb = model.backbone
    seq = torch.randint(1, 51, (1, bb.maxlen))
    for blocks in ([], [0], list(range(L))):
        # The fused CPU attention kernel has no FLOP formula; the math kernel runs the same
        # products as counted matmuls.
        with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            h = bb(seq, blocks=blocks)
            bb.scores(h[:, -1])
        counted = counter.get_total_flops()
        analytic = cost.inference_flops(bb, blocks)
        assert abs(analytic - counted) <= 0.05 * counted, (blocks, analytic, counted)


def test_param_counts_and_bytes():
    model = make("sasrec", 4, perturb=False)
    bb = model.backbone
    everything = sum(p.numel() for p in bb.parameters())
    assert cost.model_params(bb, range(4)) == everything
    assert cost.block_params(bb, [1]) == sum(p.numel() for p in bb.blocks[1].parameters())
    assert cost.payload_bytes(1000, 10, "fp16") == 2000
    assert cost.payload_bytes(1000, 10, "int8") == 1040


def test_budget_drops_least_wanted_blocks():
    model = make("sasrec", 4, perturb=False)
    bb = model.backbone
    gate = np.array([[1, 1, 1, 0]] * 3)
    margin = np.array([[0.9, 0.1, 0.5, -1.0]] * 3)
    inf = np.full(3, np.inf)
    max_flops = np.array([np.inf, cost.inference_flops(bb, [0, 2]), np.inf])
    max_params = np.array([np.inf, np.inf, cost.model_params(bb, [0])])
    keep = select_blocks(model, gate, margin, max_flops, max_params)
    assert [np.flatnonzero(k).tolist() for k in keep] == [[0, 1, 2], [0, 2], [0]]
    assert select_blocks(model, gate, margin, inf, inf).sum() == 9
    # A budget below the block-free model: a defined outcome, not a crash.
    seq = batch()
    beta, g, h = model.encode(seq)
    subs = assemble(model, beta, g, h, [Budget(max_flops=1.0)] * len(seq))
    assert all(s.blocks == [] and not s.fits for s in subs)
    assert run_submodel(model, subs[0], seq[:1]).shape == (1, 12, 16)
    ok = assemble(model, beta, g, h, [Budget()] * len(seq))
    assert all(s.fits and s.shipped_params == cost.block_params(bb, s.blocks) for s in ok)
    assert ok[0].payload_bytes(model, "fp16") == 2 * ok[0].shipped_params


def test_payload_bytes_full_and_delta_by_hand():
    """SASRec, d=16: a block is 6 matrices of 16x16 and 10 vectors of 16 (1,696 numbers, 6,784
    bytes at fp32); `affine` generates the 10 vectors (160 numbers, 640 bytes)."""
    model = make("sasrec", 2, generate="affine")
    keep = np.array([[1, 1], [1, 0], [0, 1], [0, 0]], bool)
    holds = np.array([[1, 0], [1, 1], [0, 0], [0, 0]], bool)
    whole, terms = 4 * (6 * 16 * 16 + 10 * 16), 4 * 10 * 16
    assert cost.Payload(model, "full").bytes(keep, holds).tolist() == [2 * whole, whole, whole, 0]
    assert cost.Payload(model, "delta").bytes(keep, holds).tolist() == [2 * terms + whole, terms, terms + whole, 0]
    static = make("sasrec", 2, method="device_rec", structure="all", mapper=False, structural=False)
    assert cost.Payload(static, "delta").bytes(keep, holds).tolist() == [2 * whole, whole, whole, 0]
    with pytest.raises(ValueError, match="payload mode"):
        cost.Payload(model, "half")


def test_device_weights_from_terms_equal_served_weights():
    """What a device rebuilds from its terms and the shared weights is the sub-model the cloud
    assembled (the fleet stores terms; offline evaluation runs the full vectors)."""
    for generate in ("full", "affine", "lowrank"):
        model = make("sasrec", 3, generate=generate)
        seq = batch()
        beta, g, h = model.encode(seq)
        subs = assemble(model, beta, g, h, [Budget()] * len(seq))
        for i, sub in enumerate(subs):
            for k, flat in zip(sub.blocks, sub.flat):
                block = model.backbone.blocks[k]
                named = model.mapper.params_from_terms(block, k, model.mapper.terms(k, h[i:i + 1]))
                rebuilt = block.unflatten(flat.unsqueeze(0))
                for name, t in named.items():
                    t = t.dense() if isinstance(t, LowRank) else t
                    torch.testing.assert_close(rebuilt[name], t.expand_as(rebuilt[name]))


@pytest.mark.parametrize("kind,generate", [("sasrec", "full"), ("sasrec", "affine"), ("sasrec", "lowrank"),
                                           ("nextitnet", "lowrank")])
def test_serving_weights_equal_training_weights(kind, generate):
    torch.manual_seed(0)
    bb = Backbone(kind, n_items=50, d=16, n_blocks=3, maxlen=12, dropout=0.0)
    model = Recommender(bb, MethodSpec("forward_ofa", "learned", True, True, generate=generate, rank=2),
                        hidden=8).eval()
    for head in model.mapper.heads:
        torch.nn.init.normal_(head.weight, std=0.05)
        torch.nn.init.normal_(head.bias, std=0.05)
    h = torch.randn(4, 8)
    for k, block in enumerate(bb.blocks):
        named = model.mapper.block_params(block, k, h)
        flat = block.unflatten(model.mapper.block_flat(block, k, h))
        for name, t in named.items():
            t = t.dense() if isinstance(t, LowRank) else t
            torch.testing.assert_close(flat[name], t.expand_as(flat[name]))
    if generate == "affine":
        assert model.mapper.head_params() < 0.1 * sum(b.n_params() for b in bb.blocks) * 9
    if generate == "lowrank":  # every weight matrix moves, but only through a rank-2 delta
        w = flat["wq" if kind == "sasrec" else "c1_w"].flatten(2)
        delta = w - getattr(block, "wq" if kind == "sasrec" else "c1_w").flatten(1)  # the last block's
        assert delta.abs().max() > 0
        assert all(torch.linalg.matrix_rank(d) <= 2 for d in delta)


def test_lowrank_delta_starts_at_zero_and_learns():
    torch.manual_seed(0)
    bb = Backbone("sasrec", n_items=50, d=16, n_blocks=2, maxlen=12, dropout=0.0)
    model = Recommender(bb, MethodSpec("forward_ofa", "all", True, False, generate="lowrank", rank=2), hidden=8)
    h = torch.randn(3, 8)
    params = model.mapper.block_params(bb.blocks[0], 0, h)
    assert isinstance(params["wq"], LowRank)  # kept factored in training: never a [B, 16, 16] tensor
    torch.testing.assert_close(params["wq"].dense(), bb.blocks[0].wq.expand(3, 16, 16))  # starts as the shared model
    seq = batch(n=3)
    model.backbone(seq, params=[params, None], blocks=[0]).pow(2).sum().backward()
    head = model.mapper.heads[0]
    assert head.weight.grad.abs().sum() > 0  # U's part gets a gradient although the delta is zero
    # 10 LN/bias vectors of 16, then U and V of each of the 6 matrices: rank 2 x (16 + 16) numbers
    assert head.out_features == 10 * 16 + 6 * 2 * 32


def test_payload_roundtrip_error_is_small():
    t = torch.randn(3, 64, 64)
    for precision, tol in (("fp32", 0), ("fp16", 1e-3), ("int8", 0.02)):
        err = (roundtrip(t, precision, batched=True) - t).abs().max() / t.abs().max()
        assert err <= tol + 1e-9
    with pytest.raises(ValueError):
        roundtrip(t, "fp8", True)
