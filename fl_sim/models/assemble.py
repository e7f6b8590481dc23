"""Build each requesting device's sub-model in one batched pass of the mapper.

The device sends (beta, h) and its budget; the cloud keeps the blocks the structure selects,
drops the least wanted ones (smallest beta[l,0] - beta[l,1]) until the sub-model fits the
budget, and runs each kept block's head once for all devices that keep it (one matrix
product). What differs per device is what the heads generate (`Assembly.terms`); with the
blocks' shared weights they make each device's blocks (`SubModel.flat`, the full vectors).

A budget that admits no block still gets a model: the block-free one (item embeddings and the
final LayerNorm), marked `fits=False` when even that exceeds the budget, so the caller can
count it and keep the device on its old model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from fl_sim.models import cost
from fl_sim.models.recommender import Recommender


@dataclass(frozen=True)
class Budget:
    max_flops: float = math.inf  # per inference
    max_params: float = math.inf  # on-device model parameters (memory)


@dataclass
class SubModel:
    blocks: list[int]
    flat: list[torch.Tensor] = field(repr=False)  # one flat weight vector per kept block
    wanted: int  # blocks the structure selected before the budget
    fits: bool
    flops: int
    params: int  # on-device model parameters
    shipped_params: int  # parameters of the kept blocks (the payload)

    def weights(self, model: Recommender) -> list[dict[str, torch.Tensor]]:
        """Named weights per kept block (views into the flat vectors)."""
        return [model.backbone.blocks[k].unflatten(v.unsqueeze(0), batched=False) for k, v in zip(self.blocks, self.flat)]

    def payload_bytes(self, model: Recommender, precision: str = "fp32") -> int:
        n_tensors = sum(len(model.backbone.blocks[k].shapes) for k in self.blocks)
        return cost.payload_bytes(self.shipped_params, n_tensors, precision)


def select_blocks(model: Recommender, gate: np.ndarray, margin: np.ndarray, max_flops: np.ndarray,
                  max_params: np.ndarray, catalogue: Optional[int] = None) -> np.ndarray:
    """Keep mask [N,L]: the gated blocks, most wanted first, as many as fit both budgets."""
    bb = model.backbone
    L = bb.n_blocks
    f, p = cost.per_block(bb)
    base_f, base_p = cost.inference_flops(bb, [], catalogue=catalogue), cost.base_params(bb, catalogue)
    on = gate >= 0.5
    order = np.argsort(np.where(on, -margin, np.inf), axis=1, kind="stable")  # wanted first
    on_sorted = np.take_along_axis(on, order, 1)
    cum_f = base_f + np.cumsum(f[order] * on_sorted, axis=1)
    cum_p = base_p + np.cumsum(p[order] * on_sorted, axis=1)
    ok = on_sorted & (cum_f <= max_flops[:, None]) & (cum_p <= max_params[:, None])
    n_keep = np.where(ok.all(axis=1), L, np.argmin(ok, axis=1))  # longest fitting prefix
    keep_sorted = np.arange(L)[None, :] < n_keep[:, None]
    keep = np.zeros_like(on)
    np.put_along_axis(keep, order, keep_sorted, 1)
    return keep


@dataclass
class Assembly:
    """A batch of sub-models, by block: keep [N,L]; for block k, rows[k] (the requests keeping
    it) and terms[k] [len(rows[k]), T_k] what the mapper generated for them (no entry without a
    mapper: the shared weights); per request its cost."""

    keep: np.ndarray
    rows: dict[int, np.ndarray]
    terms: dict[int, torch.Tensor]
    wanted: np.ndarray
    fits: np.ndarray
    flops: np.ndarray
    params: np.ndarray
    shipped_params: np.ndarray


@torch.no_grad()
def assemble_batch(model: Recommender, beta: Optional[torch.Tensor], gate: torch.Tensor, h: Optional[torch.Tensor],
                   max_flops: np.ndarray, max_params: np.ndarray, catalogue: Optional[int] = None) -> Assembly:
    """N requests at once: beta [N,L,2] (None for fixed structures), gate [N,L], h [N,H]; one
    matrix product per block for every request keeping it. `catalogue`: the items the device
    ranks (None: the whole catalogue), which count in its FLOPs and parameters."""
    bb = model.backbone
    margin = (beta[..., 0] - beta[..., 1]) if beta is not None else gate
    max_f, max_p = np.asarray(max_flops, dtype=np.float64), np.asarray(max_params, dtype=np.float64)
    keep = select_blocks(model, gate.numpy(), margin.numpy(), max_f, max_p, catalogue)
    rows, terms = {}, {}
    for k in range(bb.n_blocks):
        r = np.flatnonzero(keep[:, k])
        if not len(r):
            continue
        rows[k] = r
        if model.mapper is not None:
            terms[k] = model.mapper.terms(k, h[torch.from_numpy(r)])
    f, p = cost.per_block(bb)
    flops = cost.inference_flops(bb, [], catalogue=catalogue) + keep @ f
    shipped = keep @ p
    params = cost.base_params(bb, catalogue) + shipped
    return Assembly(keep=keep, rows=rows, terms=terms, wanted=(gate.numpy() >= 0.5).sum(1),
                    fits=(flops <= max_f) & (params <= max_p), flops=flops, params=params,
                    shipped_params=shipped)


@torch.no_grad()
def assemble(model: Recommender, beta: Optional[torch.Tensor], gate: torch.Tensor, h: Optional[torch.Tensor],
             budgets: Sequence[Budget], catalogue: Optional[int] = None) -> list[SubModel]:
    """Sub-models for N requests, one object each (see assemble_batch for the batched form)."""
    a = assemble_batch(model, beta, gate, h, np.array([b.max_flops for b in budgets], dtype=np.float64),
                       np.array([b.max_params for b in budgets], dtype=np.float64), catalogue=catalogue)
    flat: list[list[torch.Tensor]] = [[] for _ in range(gate.shape[0])]
    for k, r in a.rows.items():
        block = model.backbone.blocks[k]
        full = model.mapper.flat_from_terms(block, k, a.terms[k]) if k in a.terms \
            else block.flat_shared().expand(len(r), -1)
        for j, i in enumerate(r.tolist()):
            flat[i].append(full[j])
    return [SubModel(blocks=np.flatnonzero(a.keep[i]).tolist(), flat=flat[i], wanted=int(a.wanted[i]),
                     fits=bool(a.fits[i]), flops=int(a.flops[i]), params=int(a.params[i]),
                     shipped_params=int(a.shipped_params[i])) for i in range(gate.shape[0])]


@torch.no_grad()
def run_submodel(model: Recommender, sub: SubModel, seq: torch.Tensor) -> torch.Tensor:
    """The device's forward pass with its sub-model: only the kept blocks are computed."""
    params: list = [None] * model.backbone.n_blocks
    for k, w in zip(sub.blocks, sub.weights(model)):
        params[k] = w
    return model.backbone(seq, params=params, blocks=sub.blocks)
