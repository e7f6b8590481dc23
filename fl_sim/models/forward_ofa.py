"""Forward-OFA: on-device structure controller and interest extractor, cloud-side mapper.

- Controller (Eq. 7, device): GRU over recent item embeddings + linear -> beta = log v, [B,L,2].
  Block l runs iff v[l,0] >= v[l,1]. Training: Gumbel-softmax with temperature tau and a
  straight-through estimator (Eq. 4-5); inference: argmax.
- Extractor E' (Eq. 8, device): a GRU whose initial state is built from beta; yields h.
- Mapper (Eq. 9, cloud): L independent linear heads; head k maps h to block k's weights
  (a zero-initialised delta on the block's shared weights: every weight, the LN/bias terms, or
  those plus rank-r factors of each weight matrix). Block k's generated weights get
  gradients only through block k.
- Compact constraint (Eq. 10-12): L_c = sum_k -log alpha_{k,1}, alpha = softmax(beta_k).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from fl_sim.models.blocks import Block, LowRank


def _sequence(recent: torch.Tensor, lengths: Optional[torch.Tensor]):
    """What a GRU reads: the embeddings as given, or, with `lengths`, right-padded rows cut at
    their lengths (packed: each row's last state is the one after its own last item, whatever
    the others' lengths, so rows of different lengths share one call)."""
    if lengths is None:
        return recent
    return pack_padded_sequence(recent, lengths, batch_first=True, enforce_sorted=False)


class Controller(nn.Module):
    def __init__(self, d: int, hidden: int, n_blocks: int):
        super().__init__()
        self.gru = nn.GRU(d, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 2 * n_blocks)
        self.n_blocks = n_blocks

    def forward(self, recent: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        _, last = self.gru(_sequence(recent, lengths))
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

    def forward(self, recent: torch.Tensor, beta: Optional[torch.Tensor],
                lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        h0 = None
        if self.init is not None:
            h0 = torch.tanh(self.init(F.softmax(beta, -1).flatten(1))).unsqueeze(0).contiguous()
        _, last = self.gru(_sequence(recent, lengths), h0)
        return last[-1]


GENERATE = ("full", "affine", "lowrank")


def generated_names(block: Block, generate: str) -> list[str]:
    """Which of a block's parameters the head generates outright: all of them, or the LN/bias
    terms (`affine`, and `lowrank`, which adds rank-r deltas on the weight matrices)."""
    if generate == "full":
        return [n for n, _ in block.shapes]
    if generate in ("affine", "lowrank"):
        return [n for n, s in block.shapes if len(s) == 1]
    raise ValueError(f"method.generate must be one of {', '.join(GENERATE)}, got {generate!r}")


class Mapper(nn.Module):
    """L independent heads H'_k: h -> the parameters of block k (cloud side).

    `generate=lowrank`: besides the LN/bias terms, head k emits factors U [out, r] and
    V [in, r] for each weight matrix of block k; the device's matrix is shared + U V^T. V's
    part of the head's bias starts random and U's at zero (so the delta starts at zero and
    still gets a gradient). U is scaled by 1/hidden: an Adam step moves each head weight by
    about the learning rate, which would move an unscaled U by about lr x hidden x |h|; scaled,
    the generated delta moves per step about as much as a shared weight does.
    """

    def __init__(self, blocks, hidden: int, generate: str = "full", rank: int = 4):
        super().__init__()
        self.names = [generated_names(b, generate) for b in blocks]
        self.rank, self.u_scale = rank, 1.0 / hidden
        self.factored = [[(n, s) for n, s in b.shapes if len(s) > 1] if generate == "lowrank" else []
                         for b in blocks]
        sizes = [sum(math.prod(dict(b.shapes)[n]) for n in names)
                 + sum(rank * (s[0] + math.prod(s[1:])) for _, s in fac)
                 for b, names, fac in zip(blocks, self.names, self.factored)]
        self.heads = nn.ModuleList(nn.Linear(hidden, s) for s in sizes)
        for head in self.heads:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        with torch.no_grad():
            for k, block in enumerate(blocks):
                for sl, fan_in in self._v_slices(block, k):
                    self.heads[k].bias[sl].normal_(0, 1 / math.sqrt(fan_in))

    def _v_slices(self, block: Block, k: int):
        """(slice of V's numbers in head k's output, fan-in) for each factored matrix."""
        pos, factored = 0, dict(self.factored[k])
        for name, shape in block.shapes:
            if name in self.names[k]:
                pos += math.prod(shape)
            elif name in factored:
                o, i = shape[0], math.prod(shape[1:])
                pos += o * self.rank
                yield slice(pos, pos + i * self.rank), i
                pos += i * self.rank

    def head_params(self) -> int:
        return sum(p.numel() for p in self.heads.parameters())

    def terms(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """What head k generates for interests h [B,hidden]: [B, head size]. With the block's
        shared weights this is the whole of a device's block (`params_from_terms`)."""
        return self.heads[k](h)

    @torch.no_grad()
    def block_flat(self, block: Block, k: int, h: torch.Tensor) -> torch.Tensor:
        """Serving: block k's full flat weight vector for each row of h, [B, n_params]."""
        return self.flat_from_terms(block, k, self.terms(k, h))

    @torch.no_grad()
    def flat_from_terms(self, block: Block, k: int, terms: torch.Tensor) -> torch.Tensor:
        """Block k's full flat weight vectors from generated terms [B, head size] and the shared weights."""
        base = block.flat_shared()
        if len(self.names[k]) == len(block.shapes):
            return base + terms
        if self.factored[k]:
            params = self.params_from_terms(block, k, terms)
            dense = [t.dense() if isinstance(t, LowRank) else t.expand(terms.shape[0], *t.shape[-len(s):])
                     for t, (_, s) in zip(params.values(), block.shapes)]
            return torch.cat([t.reshape(terms.shape[0], -1) for t in dense], 1)
        out = base.repeat(terms.shape[0], 1)
        out[:, self._positions(block, k)] += terms
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

    def block_params(self, block: Block, k: int, h: torch.Tensor) -> dict:
        """Weights of block k for interests h [B,hidden]: shared + generated delta, per sample
        ([B, ...]) where generated, LowRank where factored, the shared tensor otherwise."""
        return self.params_from_terms(block, k, self.terms(k, h))

    def params_from_terms(self, block: Block, k: int, flat: torch.Tensor) -> dict:
        """Weights of block k from its generated terms [B, head size] (see block_params): the
        one path by which training, offline evaluation and the fleet's devices build weights."""
        B, r = flat.shape[0], self.rank
        out, pos = {}, 0
        factored = dict(self.factored[k])
        for name, shape in block.shapes:
            base = getattr(block, name)
            if name in self.names[k]:
                n = math.prod(shape)
                out[name] = base + flat[:, pos:pos + n].view(B, *shape)
                pos += n
            elif name in factored:
                o, i = shape[0], math.prod(shape[1:])
                u = flat[:, pos:pos + o * r].view(B, o, r) * self.u_scale
                v = flat[:, pos + o * r:pos + (o + i) * r].view(B, i, r)
                out[name] = LowRank(base, u, v)
                pos += (o + i) * r
            else:
                out[name] = base
        return out
