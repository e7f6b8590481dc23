"""Central training and offline evaluation (leave-last-out, full ranking or 100 sampled negatives).

No leakage: a method whose structure or weights depend on the device's recent items computes
them from a prefix of the training sequence and is trained only on the targets after it, as
a device that only knows its past. Evaluation reads the items before the target.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from fl_sim.data import Interactions, leave_last_out
from fl_sim.models import cost
from fl_sim.models.diet import Masker
from fl_sim.models.payload import shipped_weights
from fl_sim.models.recommender import Recommender


def left_pad(seqs: list[np.ndarray], T: int) -> torch.Tensor:
    """[B, t] left-padded with 0, t = the longest sequence (at most T; longer ones keep their end)."""
    T = max(1, min(T, max((len(s) for s in seqs), default=1)))
    out = np.zeros((len(seqs), T), dtype=np.int64)
    for i, s in enumerate(seqs):
        s = s[-T:]
        if len(s):
            out[i, T - len(s):] = s
    return torch.from_numpy(out)


def right_pad(seqs: list, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [n, t] right-padded with 0, lengths [n]): each sequence's last `width` items; an
    empty one reads the padding item once, as a one-item sequence."""
    lengths = np.array([max(1, min(len(q), width)) for q in seqs], np.int64)
    ids = np.zeros((len(seqs), int(lengths.max()) if len(seqs) else 1), np.int64)
    for i, q in enumerate(seqs):
        q = q[-width:]
        ids[i, :len(q)] = q
    return torch.from_numpy(ids), torch.from_numpy(lengths)


@torch.no_grad()
def encode_each(model: Recommender, recent: list, chunk: int = 4096) -> tuple:
    """`model.encode` of windows of any lengths (model ids), each read to its own length and
    never its padding (packed), so a row's (beta, gate, h) does not depend on the others in its
    call (up to float rounding in the batched products). In chunks: at deployment every device
    asks, and one call over all of them would hold all their activations at once."""
    W = model.spec.window
    if not recent:
        return model.encode(torch.zeros((0, 1), dtype=torch.long))
    parts = [model.encode(ids, lengths=lengths)
             for ids, lengths in (right_pad(recent[c0:c0 + chunk], W) for c0 in range(0, len(recent), chunk))]
    return tuple(torch.cat(p) if p[0] is not None else None for p in zip(*parts))


class OfflineData:
    """Per-user sequences (model ids = dataset ids + 1) and the leave-last-out targets."""

    def __init__(self, inter: Interactions):
        self.inter = inter
        self.split = leave_last_out(inter)
        self.n_items = inter.n_items
        self.ids = inter.item.astype(np.int64) + 1

    def history(self, j: int, stage: str) -> np.ndarray:
        """Items before the target of evaluated user j for stage train | valid | test."""
        u = self.split.users[j]
        end = {"train": self.split.train_end, "valid": self.split.valid, "test": self.split.test}[stage][j]
        return self.ids[self.inter.indptr[u]:end]

    def target(self, j: int, stage: str) -> int:
        return int(self.ids[{"valid": self.split.valid, "test": self.split.test}[stage][j]])

    def __len__(self) -> int:
        return len(self.split.users)


def needs_prefix(model: Recommender) -> bool:
    return model.controller is not None or model.mapper is not None


def make_batch(data: OfflineData, users: np.ndarray, model: Recommender, rng: np.random.Generator):
    T, W = model.backbone.maxlen, model.spec.window
    xs, ys, ms, rs = [], [], [], []
    prefix = needs_prefix(model)
    for j in users:
        s = data.history(j, "train")[-(T + 1):]
        if len(s) < 2:
            continue
        x, y = s[:-1], s[1:]
        if prefix:
            c = int(rng.integers(1, len(x) + 1))  # the device knows x[:c]; it is scored on y[c-1:]
            rs.append(x[:c][-W:])
            ms.append((np.arange(len(x)) >= c - 1).astype(np.int64))
        else:
            rs.append(x[-W:])
            ms.append(np.ones(len(x), dtype=np.int64))
        xs.append(x)
        ys.append(y)
    return left_pad(xs, T), left_pad(ys, T), left_pad(ms, T).bool(), left_pad(rs, W)


def train_loss(model: Recommender, batch, ce_positions: int = 0, rng: Optional[np.random.Generator] = None):
    """Full-catalogue cross-entropy on the supervised positions plus the method's regulariser.

    ce_positions > 0 scores a random subset of that many positions per sequence (the softmax
    over the catalogue dominates the cost; the subset keeps the loss unbiased).
    """
    seq, target, mask, recent = batch
    hidden, beta, _ = model(seq, recent)
    keep = mask & (target > 0)
    if ce_positions and keep.shape[1] > ce_positions:
        noise = torch.from_numpy((rng or np.random.default_rng()).random(keep.shape)).float()
        noise[~keep] = 2.0
        kth = noise.kthvalue(ce_positions, dim=1, keepdim=True).values
        keep &= noise <= kth
    logits = model.backbone.scores(hidden[keep])
    return F.cross_entropy(logits, target[keep] - 1) + model.regulariser(beta)


@dataclass
class EvalResult:
    ndcg10: float
    hit10: float
    users: int
    per_user_ndcg: np.ndarray = field(repr=False)
    gates: np.ndarray = field(repr=False)  # [users, L] 1 where the user's model runs block l
    kept_blocks: np.ndarray = field(repr=False)  # [users] blocks each user's model runs
    block_usage: np.ndarray = field(repr=False)  # [L] share of users running each block
    flops: float = 0.0  # mean per inference
    params: float = 0.0  # mean on-device model parameters
    shipped_params: float = 0.0  # mean parameters of the blocks sent


@torch.no_grad()
def evaluate(model: Recommender, data: OfflineData, stage: str, protocol: str = "full", batch: int = 256,
             exclude_seen: bool = True, seed: int = 0, users: Optional[np.ndarray] = None,
             payload: str = "fp32") -> EvalResult:
    model.eval()
    T, W, n = model.backbone.maxlen, model.spec.window, data.n_items
    rng = np.random.default_rng([seed, 7])
    gen = torch.Generator().manual_seed(seed)
    users = np.arange(len(data)) if users is None else np.asarray(users)
    # Batches of similar length (a user's result does not depend on its batch: padding is masked).
    by_len = np.argsort(data.split.test[users] - data.inter.indptr[data.split.users[users]], kind="stable")
    ndcg, hit, gates, masked_flops = [], [], [], []
    for start in range(0, len(users), batch):
        js = users[by_len[start:start + batch]]
        hist = [data.history(j, stage) for j in js]
        tgt = torch.tensor([data.target(j, stage) - 1 for j in js])
        beta, gate, h = model.encode(left_pad(hist, W), gen)
        if isinstance(model.mapper, Masker):  # DIET: its masks once, for the weights and what they leave to compute
            bb = model.backbone
            masks = [model.mapper.terms(k, h) for k in range(bb.n_blocks)]
            generated = [model.mapper.params_from_terms(b, k, m) for k, (b, m) in enumerate(zip(bb.blocks, masks))]
            masked_flops.append(cost.inference_flops(bb, []) + sum(
                model.mapper.flops(b, k, m, T) for k, (b, m) in enumerate(zip(bb.blocks, masks))))
        else:
            generated = model.generate(h)
        params = shipped_weights(model, generated, payload)
        gate_arg = None if model.spec.structure == "all" else gate
        hidden = model.backbone(left_pad(hist, T), gate=gate_arg, params=params)[:, -1]
        scores = model.backbone.scores(hidden)
        if protocol == "full":
            if exclude_seen:
                rows = np.repeat(np.arange(len(js)), [len(s) for s in hist])
                cols = np.concatenate(hist) - 1
                target_score = scores[torch.arange(len(js)), tgt].clone()
                scores[torch.from_numpy(rows), torch.from_numpy(cols)] = -math.inf
                scores[torch.arange(len(js)), tgt] = target_score
            rank = (scores > scores[torch.arange(len(js)), tgt].unsqueeze(1)).sum(1)
        elif protocol == "sampled100":
            negs = [_negatives(rng, n, s - 1, t.item(), 100) for s, t in zip(hist, tgt)]
            cand = torch.cat([tgt.unsqueeze(1), torch.from_numpy(np.stack(negs))], 1)
            s = scores.gather(1, cand)
            rank = (s[:, 1:] > s[:, :1]).sum(1)
        else:
            raise ValueError(f"eval.protocol must be full or sampled100, got {protocol!r}")
        ndcg.append(torch.where(rank < 10, 1.0 / torch.log2(rank.double() + 2), 0.0))
        hit.append((rank < 10).double())
        gates.append(gate)
    back = np.argsort(by_len)  # per-user arrays in the order of `users`
    gate = torch.cat(gates).numpy()[back]
    ndcg_u, hit_u = torch.cat(ndcg).numpy()[back], torch.cat(hit).numpy()[back]
    kept = gate.sum(1).astype(int)
    bb = model.backbone
    per_user = [np.flatnonzero(g) for g in gate]
    return EvalResult(
        ndcg10=float(ndcg_u.mean()), hit10=float(hit_u.mean()), users=len(users), per_user_ndcg=ndcg_u,
        gates=gate, kept_blocks=kept, block_usage=gate.mean(0),
        flops=float(np.mean(np.concatenate(masked_flops)) if masked_flops
                    else np.mean([cost.inference_flops(bb, b) for b in per_user])),
        params=float(np.mean([cost.model_params(bb, b) for b in per_user])),
        shipped_params=float(np.mean([cost.block_params(bb, b) for b in per_user])),
    )


def _negatives(rng: np.random.Generator, n: int, seen: np.ndarray, target: int, k: int) -> np.ndarray:
    banned = set(seen.tolist()) | {target}
    out: list[int] = []
    while len(out) < k:
        for c in rng.integers(0, n, 2 * k).tolist():
            if c not in banned:
                out.append(c)
                banned.add(c)
                if len(out) == k:
                    break
    return np.array(out)


def length_buckets(data: OfflineData, batch: int, rng: np.random.Generator, pool: int = 50) -> list[np.ndarray]:
    """Shuffled batches of users with similar sequence lengths (less padding, same gradients)."""
    order = rng.permutation(len(data))
    lengths = data.split.train_end[order] - data.inter.indptr[data.split.users[order]]
    batches = []
    for s in range(0, len(order), batch * pool):
        chunk = order[s:s + batch * pool][np.argsort(lengths[s:s + batch * pool], kind="stable")]
        batches.extend(chunk[i:i + batch] for i in range(0, len(chunk), batch))
    return [batches[i] for i in rng.permutation(len(batches))]


@dataclass
class FitResult:
    epochs: int
    best_epoch: int
    best_valid: float
    train_s: float
    history: list[dict]
    stopped: str
    sequences: int = 0  # training sequences seen (0: not recorded, as in checkpoints made before it was)


def fit(model: Recommender, data: OfflineData, lr: float = 1e-3, batch: int = 128, max_epochs: int = 200,
        patience: int = 5, max_minutes: float | None = 30.0, eval_every: int = 1, seed: int = 0,
        weight_decay: float = 0.0, ce_positions: int = 0, lr_decay: float = 1.0, decay_patience: int = 2,
        max_sequences: int | None = None, progress=None) -> FitResult:
    """Adam, early stopping on validation NDCG@10; restores the best weights.

    Bounds: `max_epochs`; `max_sequences`, the training sequences seen, in whole epochs (one
    sequence per user and epoch; the next epoch runs only if it fits, and a first epoch longer
    than the bound stops at the batch that reaches it), which bounds the work whatever the
    machine; `max_minutes` (None: none), a wall-clock cap, which makes the model depend on how
    fast the machine ran that day.

    lr_decay < 1: the learning rate is multiplied by it once more than `decay_patience` validations
    in a row bring no better NDCG@10 (torch's ReduceLROnPlateau; early stopping still counts from
    the best).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 5])
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    plateau = (torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=lr_decay, patience=decay_patience,
                                                          threshold=0.0) if lr_decay < 1.0 else None)
    start = time.perf_counter()
    best, best_state, best_epoch, bad, history = -1.0, None, 0, 0, []
    stopped = "max_epochs"
    epoch = seen = 0
    for epoch in range(1, max_epochs + 1):
        model.train()
        losses = []
        for users in length_buckets(data, batch, rng):
            loss = train_loss(model, make_batch(data, users, model, rng), ce_positions, rng)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            seen += len(users)
            if max_sequences is not None and seen >= max_sequences:  # a first epoch longer than the bound
                break
        row = {"epoch": epoch, "loss": float(np.mean(losses)), "sequences": seen,
               "elapsed_s": time.perf_counter() - start}
        if epoch % eval_every == 0:
            val = evaluate(model, data, "valid", seed=seed)
            row.update(valid_ndcg10=val.ndcg10, valid_hit10=val.hit10, kept_blocks=float(val.kept_blocks.mean()),
                       lr=opt.param_groups[0]["lr"])
            if plateau is not None:
                plateau.step(val.ndcg10)
            if val.ndcg10 > best:
                best, best_epoch, bad = val.ndcg10, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad += 1
        history.append(row)
        if progress:
            progress(row)
        if bad >= patience:
            stopped = "early_stopping"
            break
        if max_sequences is not None and seen + len(data) > max_sequences:  # the next epoch would not fit
            stopped = "max_sequences"
            break
        if max_minutes is not None and time.perf_counter() - start > max_minutes * 60:
            stopped = "time_limit"
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    if model.reveals_items:
        set_reference(model, data)
    return FitResult(epochs=epoch, best_epoch=best_epoch, best_valid=best, train_s=time.perf_counter() - start,
                     history=history, stopped=stopped, sequences=seen)


@torch.no_grad()
def set_reference(model: Recommender, data: OfflineData, batch: int = 1024) -> None:
    """DIET: the interest whose masks are every block's reference mask (diet.encode): the mean of
    the extractor's output over the users' training windows (their items before validation)."""
    model.eval()
    W = model.spec.window
    h = [model.encode(left_pad([data.history(j, "valid") for j in range(s, min(s + batch, len(data)))], W))[2]
         for s in range(0, len(data), batch)]
    model.mapper.reference_h.copy_(torch.cat(h).mean(0))


@torch.no_grad()
def update_bytes(model: Recommender, data: OfflineData, stage: str, batch: int = 256) -> np.ndarray:
    """DIET: the bytes on the wire of each user's masks at `stage` (every block, under
    method.code), [users]."""
    model.eval()
    W, out = model.spec.window, []
    for s in range(0, len(data), batch):
        h = model.encode(left_pad([data.history(j, stage) for j in range(s, min(s + batch, len(data)))], W))[2]
        out.append(sum(model.mapper.coded_bytes(k, model.mapper.terms(k, h)) for k in range(model.backbone.n_blocks)))
    return np.concatenate(out)


def finetune_evaluate(model: Recommender, data: OfflineData, stage: str, steps: int, lr: float,
                      protocol: str = "full", exclude_seen: bool = True, seed: int = 0,
                      users: Optional[np.ndarray] = None) -> tuple[EvalResult, float]:
    """Each device fine-tunes the cloud model on its own items before the target, then is scored.

    Returns the evaluation and the mean on-device training FLOPs per user (forward and backward,
    about 3x a forward pass over every position, including the catalogue softmax).
    """
    users = np.arange(len(data)) if users is None else np.asarray(users)
    base = copy.deepcopy(model.state_dict())
    bb = model.backbone
    per_user, gates, train_flops = [], [], []
    for j in users:
        model.load_state_dict(base)
        hist = data.history(j, stage)[-(bb.maxlen + 1):]
        if steps > 0 and len(hist) >= 2:
            model.train()
            opt = torch.optim.Adam(bb.parameters(), lr=lr)
            seq, target = left_pad([hist[:-1]], bb.maxlen), left_pad([hist[1:]], bb.maxlen)
            for _ in range(steps):
                hidden = bb(seq)
                keep = target > 0
                loss = F.cross_entropy(bb.scores(hidden[keep]), target[keep] - 1)
                opt.zero_grad()
                loss.backward()
                opt.step()
            train_flops.append(cost.train_flops(bb, len(hist) - 1, steps))
        else:
            train_flops.append(0)
        res = evaluate(model, data, stage, protocol=protocol, exclude_seen=exclude_seen, seed=seed + int(j),
                       users=np.array([j]))
        per_user.append(res.per_user_ndcg[0])
        gates.append(res.gates[0])
    model.load_state_dict(base)
    ndcg = np.array(per_user)
    gate = np.stack(gates)
    full = list(range(bb.n_blocks))
    return EvalResult(ndcg10=float(ndcg.mean()), hit10=float((ndcg > 0).mean()), users=len(users),
                      per_user_ndcg=ndcg, gates=gate, kept_blocks=gate.sum(1).astype(int),
                      block_usage=gate.mean(0), flops=float(cost.inference_flops(bb, full)),
                      params=float(cost.model_params(bb, full)),
                      shipped_params=float(cost.block_params(bb, full))), float(np.mean(train_flops))
