"""Build each requesting device's sub-model in one batched pass of the mapper.

The device sends (beta, h) and its budget; the cloud keeps the blocks the structure selects,
drops the least-wanted ones (smallest beta[l,0] - beta[l,1]) until the sub-model fits the
budget, runs only those blocks' heads, and returns their weights.

A budget that admits no block still gets a model: the block-free one (item embeddings and the
final LayerNorm), marked `fits=False` when even that exceeds the budget, so the caller can
count it and keep the device on its old model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

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
    weights: list[dict[str, torch.Tensor]] = field(repr=False)  # one dict per kept block
    wanted: int  # blocks the structure selected before the budget
    fits: bool
    flops: int
    params: int  # on-device model parameters
    shipped_params: int  # parameters of the kept blocks (the payload)

    def payload_bytes(self, precision: str = "fp32") -> int:
        n_tensors = sum(len(w) for w in self.weights)
        return cost.payload_bytes(self.shipped_params, n_tensors, precision)


def select_blocks(model: Recommender, gate: Sequence[float], margin: Sequence[float], budget: Budget) -> list[int]:
    bb = model.backbone
    kept = [l for l in range(bb.n_blocks) if gate[l] >= 0.5]
    kept.sort(key=lambda l: -margin[l])
    while kept and (cost.inference_flops(bb, kept) > budget.max_flops
                    or cost.model_params(bb, kept) > budget.max_params):
        kept.pop()
    return sorted(kept)


@torch.no_grad()
def assemble(model: Recommender, beta: Optional[torch.Tensor], gate: torch.Tensor, h: Optional[torch.Tensor],
             budgets: Sequence[Budget]) -> list[SubModel]:
    """Sub-models for N requests: beta [N,L,2] (None for fixed structures), gate [N,L], h [N,H]."""
    bb = model.backbone
    n = gate.shape[0]
    margin = (beta[..., 0] - beta[..., 1]) if beta is not None else gate
    chosen = [select_blocks(model, gate[i].tolist(), margin[i].tolist(), budgets[i]) for i in range(n)]
    weights: list[list[dict]] = [[] for _ in range(n)]
    for k in range(bb.n_blocks):
        rows = [i for i in range(n) if k in chosen[i]]
        if not rows:
            continue
        if model.mapper is not None:
            gen = model.mapper.block_params(bb.blocks[k], k, h[rows])
            for j, i in enumerate(rows):
                weights[i].append({name: t[j] for name, t in gen.items()})
        else:
            shared = {name: t.detach() for name, t in bb.blocks[k].shared().items()}
            for i in rows:
                weights[i].append(shared)
    out = []
    for i in range(n):
        flops, params = cost.inference_flops(bb, chosen[i]), cost.model_params(bb, chosen[i])
        fits = flops <= budgets[i].max_flops and params <= budgets[i].max_params
        out.append(SubModel(blocks=chosen[i], weights=weights[i], wanted=int((gate[i] >= 0.5).sum()), fits=fits,
                            flops=flops, params=params, shipped_params=cost.block_params(bb, chosen[i])))
    return out


@torch.no_grad()
def run_submodel(model: Recommender, sub: SubModel, seq: torch.Tensor) -> torch.Tensor:
    """The device's forward pass with its sub-model: only the kept blocks are computed."""
    params: list = [None] * model.backbone.n_blocks
    for k, w in zip(sub.blocks, sub.weights):
        params[k] = w
    return model.backbone(seq, params=params, blocks=sub.blocks)
