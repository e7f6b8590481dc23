"""DIET: masks over a frozen random backbone, their payload and their FLOPs."""

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch

from fl_sim.models import cost
from fl_sim.models.backbone import Backbone
from fl_sim.models.diet import Masker, decode, encode, matrices, pack, unpack
from fl_sim.models.recommender import MethodSpec, Recommender
from fl_sim.training import train_loss


def make(kind, keep=0.5, L=3):
    torch.manual_seed(0)
    bb = Backbone(kind, n_items=40, d=16, n_blocks=L, maxlen=10, dropout=0.0)
    model = Recommender(bb, MethodSpec("diet", "all", True, False, generate="mask", keep=keep), hidden=8)
    for head in model.mapper.heads:  # devices' masks differ visibly
        torch.nn.init.normal_(head.weight, std=0.5)
    return model.eval()


def seqs(n=4, T=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, 41, (n, T), generator=g)
    seq[0, :6] = 0
    return seq


@pytest.mark.parametrize("kind", ["sasrec", "nextitnet"])
def test_masked_model_equals_dense_model_with_masked_weights_zeroed(kind):
    model = make(kind)
    seq = seqs()
    with torch.no_grad():
        _, _, h = model.encode(seq)
        params = model.generate(h)
        out = model.backbone(seq, params=params)
        for b in range(seq.shape[0]):
            dense = copy.deepcopy(model.backbone)
            for k, block in enumerate(dense.blocks):
                mask = model.mapper.terms(k, h[b:b + 1])[0]
                pos = 0
                for name, shape in matrices(block):
                    n = math.prod(shape)
                    getattr(block, name).mul_(mask[pos:pos + n].view(shape))
                    pos += n
            ref = dense(seq[b:b + 1])[0]
            assert torch.allclose(out[b], ref, atol=1e-5)
            # and the devices differ: the plain frozen backbone gives another output
            assert not torch.allclose(model.backbone(seq[b:b + 1])[0], ref, atol=1e-3)


def test_masks_keep_their_share_and_travel_at_one_bit_a_weight():
    model = make("sasrec", keep=0.3)
    h = torch.randn(5, 8)
    for k, block in enumerate(model.backbone.blocks):
        m = model.mapper.terms(k, h)
        pos = 0
        for _, shape in matrices(block):
            n = math.prod(shape)
            assert set(m[:, pos:pos + n].unique().tolist()) == {0.0, 1.0}
            assert (m[:, pos:pos + n].sum(1) == round(0.3 * n)).all()  # scores tie with probability 0
            pos += n
        packed = pack(m)
        assert packed.dtype == np.uint8 and packed.shape == (5, model.mapper.mask_bytes(k))
        assert model.mapper.mask_bytes(k) == 6 * 16 * 16 // 8  # q, k, v, o and the two FFN matrices
        assert torch.equal(unpack(torch.from_numpy(packed), m.shape[1]), m)
        # the device's weights from the packed masks are those from the float ones
        a = model.mapper.params_from_terms(block, k, m)
        b = model.mapper.params_from_terms(block, k, torch.from_numpy(packed))
        assert all(torch.equal(a[n], b[n]) for n in a)
    fp32 = 4 * model.backbone.blocks[0].n_params()
    assert fp32 / model.mapper.mask_bytes(0) > 32  # the LN and bias terms ship once, never again


def test_coded_masks_decode_exactly_and_shrink_with_their_distance_to_the_reference():
    model = make("sasrec")
    mapper = model.mapper
    with pytest.raises(ValueError, match="reference interest is unset"):
        mapper.coded_bytes(0, mapper.terms(0, torch.randn(1, 8)))
    mapper.reference_h.copy_(torch.randn(8))
    ref = mapper.reference(0)
    n = mapper.sizes[0]
    base = unpack(torch.from_numpy(ref[None]), n)[0]
    flips = [0, 3, 40, n // 2]  # a mask at these Hamming distances from the reference
    masks = torch.stack([base] * len(flips))
    g = torch.Generator().manual_seed(0)
    for row, f in enumerate(flips):
        idx = torch.randperm(n, generator=g)[:f]
        masks[row, idx] = 1 - masks[row, idx]
    sizes = mapper.coded_bytes(0, masks)
    for m, size in zip(pack(masks), sizes):
        blob = encode(m, ref)
        assert len(blob) == size and np.array_equal(decode(blob, ref), m)  # what is counted is what decodes
    raw = mapper.mask_bytes(0)
    assert sizes[0] < 16 and sizes[1] < sizes[2] < raw  # near the reference: a fraction of 1 bit a weight
    assert sizes[3] == raw + 1  # half the bits flipped: no code beats the bits, which travel as they are
    with pytest.raises(ValueError, match="not a DIET mask"):
        decode(b"\x07" + bytes(3), ref)
    bits = Recommender(model.backbone, MethodSpec("diet", "all", True, False, generate="mask", code="bits"), hidden=8)
    assert bits.mapper.coded_bytes(0, masks).tolist() == [raw] * len(flips)


def test_training_sets_the_reference_to_the_mean_interest_and_checkpoints_keep_it(tmp_path):
    from fl_sim.data.interactions import Interactions
    from fl_sim.models import checkpoint
    from fl_sim.training import OfflineData, fit, left_pad

    g = np.random.default_rng(0)
    users = np.repeat(np.arange(12), 9)
    inter = Interactions(users, g.integers(0, 40, users.size), np.arange(users.size), False, np.arange(12),
                         np.arange(40))
    data = OfflineData(inter)
    model = make("sasrec")
    fit(model, data, max_epochs=1, max_minutes=1)
    with torch.no_grad():  # by hand: the extractor's output over each user's items before validation
        h = torch.stack([model.encode(left_pad([data.history(j, "valid")], 50))[2][0] for j in range(len(data))])
    assert torch.allclose(model.mapper.reference_h, h.mean(0), atol=1e-5)
    checkpoint.save(tmp_path / "c.pt", model, {})
    again = make("sasrec")
    checkpoint.load(tmp_path / "c.pt", again, {})
    assert torch.equal(again.mapper.reference_h, model.mapper.reference_h)
    old = {k: v for k, v in model.state_dict().items() if not k.endswith("reference_h")}
    again.load_state_dict(old)  # a checkpoint from before the reference: loads, the reference unset
    assert not again.mapper.has_reference


@pytest.mark.parametrize("kind", ["sasrec", "nextitnet"])
def test_flops_drop_with_whole_rows_only(kind):
    model = make(kind)
    block, T = model.backbone.blocks[0], model.backbone.maxlen
    n = model.mapper.sizes[0]
    full = torch.ones(3, n)
    (name, shape), *_ = matrices(block)
    per_row = math.prod(shape[1:])
    full[1, :3 * per_row] = 0  # three whole rows of the first matrix
    full[2, torch.arange(0, 3 * per_row, per_row)] = 0  # one weight in each of those rows
    f = model.mapper.flops(block, 0, full, T)
    dense = cost.block_flops(block, T)
    assert f[0] == dense and f[2] == dense
    assert f[1] == dense - 3 * 2 * T * per_row  # by hand: 2 FLOPs per multiply-add, T positions


def test_training_moves_the_masks_never_the_blocks():
    model = make("sasrec").train()
    frozen = [b.flat_shared().clone() for b in model.backbone.blocks]
    heads = [h.weight.detach().clone() for h in model.mapper.heads]
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    seq = seqs(8)
    batch = (seq[:, :-1], seq[:, 1:], torch.ones_like(seq[:, 1:], dtype=torch.bool), seq[:, -5:])
    loss = train_loss(model, batch)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert all(torch.equal(a, b.flat_shared()) for a, b in zip(frozen, model.backbone.blocks))
    assert all(not torch.equal(a, b.weight) for a, b in zip(heads, model.mapper.heads))
    assert model.backbone.item_emb.weight.grad is not None


def test_keep_out_of_range_is_refused():
    bb = Backbone("sasrec", n_items=10, d=8, n_blocks=1, maxlen=4)
    with pytest.raises(ValueError, match="method.keep"):
        Masker(bb.blocks, 4, keep=1.5)


def test_diet_in_the_fleet_ships_masks_and_counts_what_it_reveals(tmp_path):
    from helpers import accounted, simulate

    summary, out = simulate(tmp_path, "diet", "method=diet", "method.code=bits", "sim.backend=inprocess",
                            cache=tmp_path / "cache")
    table = pd.read_parquet(out / "devices.parquet")
    assert accounted(summary) and summary["requests"] > 0
    mask_bytes = 6 * 16 * 16 // 8  # per kept block: SASRec d=16, 1 bit a weight of its six matrices
    after = table[table["answers"] > 1]
    assert len(after) and (after["bytes_model"] % mask_bytes == 0).all()
    assert summary["bytes_down_model"] > 0 and (table["bytes_model"] <= mask_bytes * table["kept_blocks_sum"]).all()
    # coded against the reference masks: the same masks (the same accuracy), fewer bytes; a block's
    # first delivery adds its reference mask, and no coded mask is longer than its bits and a flag
    coded, out_c = simulate(tmp_path, "diet_coded", "method=diet", "sim.backend=inprocess", cache=tmp_path / "cache")
    table_c = pd.read_parquet(out_c / "devices.parquet")
    assert coded["ndcg10"] == summary["ndcg10"] and coded["requests"] == summary["requests"]
    assert (table_c["bytes_model"] <= (2 * mask_bytes + 1) * table_c["kept_blocks_sum"]).all()
    assert coded["bytes_down_model"] < summary["bytes_down_model"]
    # an update is masks only: under 1/32 of the same blocks' weights at fp32
    block_params = 6 * 16 * 16 + 10 * 16
    assert mask_bytes * 32 < 4 * block_params
    # every request after deployment carried its recent items (at most `window`), counted
    assert 0 < summary["items_revealed"] <= 50 * summary["requests"]
    # FLOPs: what the masks leave; never more than the dense blocks
    dense = cost.block_flops(Backbone("sasrec", 10, d=16, n_blocks=1, maxlen=30).blocks[0], 30)
    assert (table["flops"] <= table["scored"] * (dense * 2 + 2 * 16 * 50) + 1e-6).all()
    assert summary["budget_violations"] == 0
