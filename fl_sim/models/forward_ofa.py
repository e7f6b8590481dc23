"""Forward-OFA: on-device structure controller and interest extractor, cloud-side mapper.

- Controller (Eq. 7, device): GRU over recent item embeddings + linear -> beta = log v, [B,L,2].
  Block l runs iff v[l,0] >= v[l,1]. Training: Gumbel-softmax with temperature tau and a
  straight-through estimator (Eq. 4-5); inference: argmax.
- Extractor E' (Eq. 8, device): a GRU whose initial state is built from beta; yields h.
- Mapper (Eq. 9, cloud): L independent linear heads; head k maps h to block k's weights
  (a zero-initialised delta on the block's shared weights). Block k's generated weights get
  gradients only through block k.
- Compact constraint (Eq. 10-12): L_c = sum_k -log alpha_{k,1}, alpha = softmax(beta_k).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fl_sim.models.blocks import Block


class Controller(nn.Module):
    def __init__(self, d: int, hidden: int, n_blocks: int):
        super().__init__()
        self.gru = nn.GRU(d, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 2 * n_blocks)
        self.n_blocks = n_blocks

    def forward(self, recent: torch.Tensor) -> torch.Tensor:
        _, last = self.gru(recent)
        return F.log_softmax(self.head(last[-1]).view(-1, self.n_blocks, 2), dim=-1)


def gumbel_gate(beta: torch.Tensor, tau: float) -> torch.Tensor:
    """Straight-through Gumbel-softmax: forward the hard choice, backward the soft sample. [B,L]"""
    soft = F.softmax((beta + -torch.empty_like(beta).exponential_().log()) / tau, dim=-1)
    hard = F.one_hot(soft.argmax(-1), 2).to(soft.dtype)
    return (hard + soft - soft.detach())[..., 0]


def argmax_gate(beta: torch.Tensor) -> torch.Tensor:
    """Block l runs iff v[l,0] >= v[l,1]."""
    return (beta[..., 0] >= beta[..., 1]).to(beta.dtype)


def compact_loss(beta: torch.Tensor) -> torch.Tensor:
    """sum_k -log alpha_{k,1}, averaged over the batch."""
    return -F.log_softmax(beta, dim=-1)[..., 1].sum(-1).mean()


class Extractor(nn.Module):
    """E': GRU over recent items, initial state from the structure (or zeros without it)."""

    def __init__(self, d: int, hidden: int, n_blocks: int, structural: bool):
        super().__init__()
        self.gru = nn.GRU(d, hidden, batch_first=True)
        self.init = nn.Linear(2 * n_blocks, hidden) if structural else None

    def forward(self, recent: torch.Tensor, beta: Optional[torch.Tensor]) -> torch.Tensor:
        h0 = None
        if self.init is not None:
            h0 = torch.tanh(self.init(F.softmax(beta, -1).flatten(1))).unsqueeze(0).contiguous()
        _, last = self.gru(recent, h0)
        return last[-1]


def generated_names(block: Block, generate: str) -> list[str]:
    """Which of a block's parameters the head generates: all of them, or LN/bias terms only."""
    if generate == "full":
        return [n for n, _ in block.shapes]
    if generate == "affine":
        return [n for n, s in block.shapes if len(s) == 1]
    raise ValueError(f"method.generate must be full or affine, got {generate!r}")


class Mapper(nn.Module):
    """L independent heads H'_k: h -> the parameters of block k (cloud side)."""

    def __init__(self, blocks, hidden: int, generate: str = "full"):
        super().__init__()
        self.names = [generated_names(b, generate) for b in blocks]
        sizes = [sum(math.prod(dict(b.shapes)[n]) for n in names) for b, names in zip(blocks, self.names)]
        self.heads = nn.ModuleList(nn.Linear(hidden, s) for s in sizes)
        for head in self.heads:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def head_params(self) -> int:
        return sum(p.numel() for p in self.heads.parameters())

    @torch.no_grad()
    def block_flat(self, block: Block, k: int, h: torch.Tensor) -> torch.Tensor:
        """Serving: block k's full flat weight vector for each row of h, [B, n_params], in one
        matrix product (the shared weights ride in the bias where every weight is generated)."""
        head = self.heads[k]
        base = block.flat_shared()
        if len(self.names[k]) == len(block.shapes):
            return torch.addmm(base + head.bias, h, head.weight.T)
        out = base.repeat(h.shape[0], 1)
        out[:, self._positions(block, k)] += head(h)
        return out

    def _positions(self, block: Block, k: int) -> torch.Tensor:
        """Where the generated numbers sit in the block's flat vector."""
        pos, idx = 0, []
        for name, shape in block.shapes:
            n = math.prod(shape)
            if name in self.names[k]:
                idx.append(torch.arange(pos, pos + n))
            pos += n
        return torch.cat(idx)

    def block_params(self, block: Block, k: int, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample weights of block k for interests h [B,hidden]: shared weights + generated delta."""
        flat = self.heads[k](h)
        out, pos = {}, 0
        shapes = dict(block.shapes)
        for name, _ in block.shapes:
            base = getattr(block, name)
            if name in self.names[k]:
                n = math.prod(shapes[name])
                out[name] = base + flat[:, pos:pos + n].view(h.shape[0], *shapes[name])
                pos += n
            else:
                out[name] = base.expand(h.shape[0], *base.shape)
        return out
