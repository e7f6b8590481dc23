"""DIET (Fu et al., KDD 2024): per-device binary masks over one frozen random backbone.

Every device holds the same backbone blocks, randomly initialised and never trained. The cloud
reads a device's recent items (DIET's request reveals them), encodes them with its extractor
(a GRU, `forward_ofa.Extractor` without a structure), and head k of the `Masker` maps that
interest to scores over every weight of block k's weight matrices plus one score per row:

    c[o, i] = sigmoid(s[o, i]) * R * softmax(r)[o]        (R rows in the matrix)

The mask keeps the top `keep` share of c in each matrix. The row factor is DIET's filter-level
importance: a row whose softmax weight is small loses all its weights, so its output need not
be computed and the FLOPs fall. Training passes gradients straight through the hard mask to c
(straight-through estimator). What the trainable parts are: item and position embeddings,
the final LayerNorm, the extractor and the masker's heads; never a block's weights.

The masks are what differs per device: `terms(k, h)` is block k's mask (0/1 per weight of its
matrices, in `shapes` order), shipped at 1 bit a weight (`pack`: uint8 bytes, 8 weights each).
`params_from_terms` turns a mask (float or packed) into the block's weights on the shared
frozen ones, the path training, offline evaluation and the fleet's devices share. The LayerNorm
and bias terms stay the shared frozen ones.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from fl_sim.models.blocks import Block
from fl_sim.models.cost import block_flops


def matrices(block: Block) -> list[tuple[str, tuple[int, ...]]]:
    """The block's maskable parameters: its weight matrices (convolution kernels included)."""
    return [(n, s) for n, s in block.shapes if len(s) > 1]


def pack(mask: torch.Tensor | np.ndarray) -> np.ndarray:
    """[B, n] 0/1 -> [B, ceil(n / 8)] uint8 (what travels: 1 bit a weight)."""
    m = mask.detach().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    return np.packbits(m.astype(bool), axis=1)


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """[B, ceil(n / 8)] uint8 -> [B, n] float 0/1 (np.packbits order: high bit first)."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(1)[:, :n].float()


class Masker(nn.Module):
    """DIET's cloud-side mask generator: L heads, head k maps interests h [B, hidden] to block
    k's masks. Exposes the mapper interface the fleet uses (`names`, `factored`, `terms`,
    `params_from_terms`, `flat_from_terms`, `head_params`)."""

    def __init__(self, blocks, hidden: int, keep: float = 0.5):
        super().__init__()
        if not 0 < keep <= 1:
            raise ValueError(f"method.keep must be in (0, 1], got {keep}")
        self.keep = keep
        self.shapes = [matrices(b) for b in blocks]
        self.names = [[n for n, _ in s] for s in self.shapes]
        self.factored = [[] for _ in blocks]
        self.sizes = [sum(math.prod(s) for _, s in shapes) for shapes in self.shapes]
        rows = [sum(s[0] for _, s in shapes) for shapes in self.shapes]
        self.heads = nn.ModuleList(nn.Linear(hidden, n + r) for n, r in zip(self.sizes, rows))
        with torch.no_grad():
            for head, block, n in zip(self.heads, blocks, self.sizes):
                nn.init.normal_(head.weight, std=0.01)
                head.bias.zero_()
                # start from magnitude pruning: each weight's score its |w| over the matrix's mean |w|
                pos = 0
                for name, shape in matrices(block):
                    w = getattr(block, name).detach().abs().reshape(-1)
                    head.bias[pos:pos + w.numel()] = w / w.mean() - 1
                    pos += w.numel()

    def head_params(self) -> int:
        return sum(p.numel() for p in self.heads.parameters())

    def terms(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """Block k's masks for interests h: [B, n] with 1 where a weight is kept (in training
        the hard mask carries the straight-through gradient of the scores)."""
        shapes = self.shapes[k]
        rows = [s[0] for _, s in shapes]
        # split, not sliced: a slice's gradient would fill a zero tensor of the head's whole output
        parts = torch.split(self.heads[k](h), [math.prod(s) for _, s in shapes] + rows, dim=1)
        masks = []
        for s, r, R in zip(parts[:len(shapes)], parts[len(shapes):], rows):
            c = (torch.sigmoid(s).view(h.shape[0], R, -1) * (torch.softmax(r, dim=1) * R).unsqueeze(-1)).flatten(1)
            n_keep = max(1, round(self.keep * c.shape[1]))
            with torch.no_grad():
                kth = torch.topk(c, n_keep, dim=1, sorted=False).values.min(dim=1, keepdim=True).values
                hard = (c >= kth).to(c.dtype)
            masks.append(hard + (c - c.detach()) if c.requires_grad else hard)
        return torch.cat(masks, 1)

    def block_params(self, block: Block, k: int, h: torch.Tensor) -> dict:
        """Block k's weights under the masks generated for interests h [B, hidden]."""
        return self.params_from_terms(block, k, self.terms(k, h))

    def _mask(self, k: int, terms: torch.Tensor) -> torch.Tensor:
        return unpack(terms, self.sizes[k]) if terms.dtype == torch.uint8 else terms

    def params_from_terms(self, block: Block, k: int, terms: torch.Tensor) -> dict:
        """Block k's weights under masks [B, n] (or packed [B, n / 8] uint8): each matrix the
        shared frozen one times the device's mask; the rest the shared terms."""
        mask = self._mask(k, terms)
        B = mask.shape[0]
        out = {name: getattr(block, name) for name, _ in block.shapes}
        parts = torch.split(mask, [math.prod(s) for _, s in self.shapes[k]], dim=1)
        for (name, shape), m in zip(self.shapes[k], parts):
            out[name] = out[name] * m.view(B, *shape)
        return out

    @torch.no_grad()
    def flat_from_terms(self, block: Block, k: int, terms: torch.Tensor) -> torch.Tensor:
        """Block k's full flat weight vectors (shared frozen weights with the masked ones zeroed)."""
        mask = self._mask(k, terms)
        out = block.flat_shared().repeat(mask.shape[0], 1)
        pos, idx = 0, []
        masked = dict(self.shapes[k])
        for name, shape in block.shapes:
            n = math.prod(shape)
            if name in masked:
                idx.append(torch.arange(pos, pos + n))
            pos += n
        out[:, torch.cat(idx)] *= mask
        return out

    def mask_bytes(self, k: int) -> int:
        """Bytes of block k's masks on the wire: 1 bit a weight."""
        return (self.sizes[k] + 7) // 8

    def flops(self, block: Block, k: int, terms: torch.Tensor, T: int) -> np.ndarray:
        """FLOPs of block k per inference under each row's masks [B, n]: a matrix row whose
        weights are all masked is not computed (its output is the frozen bias); attention's
        products and partly masked rows cost what they cost dense."""
        mask = self._mask(k, terms)
        dense = block_flops(block, T)
        total = torch.full((mask.shape[0],), float(dense), dtype=torch.float64)
        pos = 0
        for _, shape in self.shapes[k]:
            R, per_row = shape[0], math.prod(shape[1:])
            live = mask[:, pos:pos + R * per_row].view(-1, R, per_row).amax(-1).sum(-1).double()
            total -= 2.0 * T * per_row * (R - live)
            pos += R * per_row
        return total.numpy()
