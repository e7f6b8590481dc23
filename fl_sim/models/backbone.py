"""Sequential recommenders made of L skippable residual blocks (Eq. 2): SASRec and NextItNet.

Item ids inside the model are dataset ids + 1 (0 pads). Input and output share the item
embedding table; scores are dot products with it over the full catalogue.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from fl_sim.models.blocks import Block, NextItNetBlock, SASRecBlock, dropout


class Backbone(nn.Module):
    def __init__(self, kind: str, n_items: int, d: int = 64, n_blocks: int = 6, maxlen: int = 200,
                 heads: int = 1, dropout: float = 0.2, kernel: int = 3, dilations: Sequence[int] = (1, 2, 4, 8)):
        super().__init__()
        if kind not in ("sasrec", "nextitnet"):
            raise ValueError(f"model.kind must be sasrec or nextitnet, got {kind!r}")
        self.kind, self.n_items, self.d, self.maxlen = kind, n_items, d, maxlen
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=0)
        nn.init.normal_(self.item_emb.weight, std=d ** -0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        self.pos_emb = nn.Embedding(maxlen, d) if kind == "sasrec" else None
        if kind == "sasrec":
            blocks = [SASRecBlock(d, heads, dropout) for _ in range(n_blocks)]
        else:
            blocks = [NextItNetBlock(d, dilations[i % len(dilations)], kernel, dropout) for i in range(n_blocks)]
        self.blocks: Sequence[Block] = nn.ModuleList(blocks)
        self.ln_f = nn.LayerNorm(d, eps=1e-8)
        self.dropout = dropout

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def embed(self, seq: torch.Tensor) -> torch.Tensor:
        """seq [B,T], left-padded with 0, T <= maxlen."""
        x = self.item_emb(seq) * math.sqrt(self.d)
        if self.pos_emb is not None:  # right-aligned: the latest item always has position maxlen-1
            T = seq.shape[1]
            x = x + self.pos_emb(torch.arange(self.maxlen - T, self.maxlen, device=seq.device))
        x = dropout(x, self.dropout, self.training)
        return x * (seq > 0).unsqueeze(-1)

    def forward(self, seq: torch.Tensor, gate: Optional[torch.Tensor] = None,
                params: Optional[Sequence[Optional[dict]]] = None,
                blocks: Optional[Sequence[int]] = None, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Hidden states [B,T,d].

        gate [B,L] in {0,1} (may carry straight-through gradients): h = g F(h) + (1-g) h.
        params[l]: per-sample weights for block l (None: shared). blocks: run only these
        (a sub-model); all others are skipped without being computed. keep [B,L] bool: each
        row its own sub-model; block l runs on the rows that keep it, in one call, and the
        others pass it unchanged (params[l] then holds weights for those rows alone, in order).
        """
        if seq.shape[1] > self.maxlen:
            seq = seq[:, -self.maxlen:]
        x = self.embed(seq)
        valid = (seq > 0).unsqueeze(-1).to(x.dtype)
        ctx = {"valid": valid}
        if self.kind == "sasrec":
            T = seq.shape[1]
            causal = torch.ones(T, T, dtype=torch.bool, device=seq.device).tril()
            # each position reads the items up to itself; padding reads only itself (no empty rows)
            if bool((seq > 0).all()):  # no padding: one [T,T] mask for the batch (the same result, faster)
                ctx["attn_mask"] = causal
            else:
                ctx["attn_mask"] = (causal & ((seq > 0).unsqueeze(1) | torch.eye(T, dtype=torch.bool))).unsqueeze(1)
        run = range(self.n_blocks) if blocks is None else blocks
        for l in run:
            p = params[l] if params is not None else None
            if keep is not None and not bool(keep[:, l].all()):  # only some rows run block l
                rows = keep[:, l].nonzero().squeeze(1)
                if len(rows):
                    x = x.index_copy(0, rows, self.blocks[l](x[rows], _rows(ctx, rows), p) * valid[rows])
                continue
            y = self.blocks[l](x, ctx, p)
            if gate is not None:
                g = gate[:, l].view(-1, 1, 1)
                y = g * y + (1 - g) * x
            x = y * valid
        return self.ln_f(x)

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """Scores of every catalogue item (dataset ids 0..n-1) for hidden states h [..., d]."""
        return h @ self.item_emb.weight[1:].T


def _rows(ctx: dict, rows: torch.Tensor) -> dict:
    """A block's context (validity, attention mask) for some rows of its batch."""
    return {k: v[rows] if v.dim() > 2 else v for k, v in ctx.items()}
