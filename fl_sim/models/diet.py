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
matrices, in `shapes` order), at 1 bit a weight (`pack`: uint8 bytes, 8 weights each).

What travels (`method.code`): `bits`, the packed mask as DIET ships it; or `reference` (the
default), the mask coded against the block's reference mask, the one the masker gives the mean
interest of the users it was trained on (`reference_h`, set when training ends): the XOR of the
two, deflated (zlib), or the packed mask itself where that is shorter (`encode`, one flag byte
says which; `decode` inverts it exactly). Devices' masks differ from the reference in a few
per cent of their weights, so the coded mask is several times smaller; the device receives
each block's reference mask once, with the frozen block.
`params_from_terms` turns a mask (float or packed) into the block's weights on the shared
frozen ones, the path training, offline evaluation and the fleet's devices share. The LayerNorm
and bias terms stay the shared frozen ones.
"""

from __future__ import annotations

import math
import zlib

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


RAW, DEFLATED = 0, 1  # encode's flag byte
CODES = ("reference", "bits")


def encode(packed: np.ndarray, reference: np.ndarray) -> bytes:
    """One device's packed mask [n / 8] uint8 against the block's packed reference mask: a flag
    byte, then the deflated XOR of the two, or the packed mask where that is shorter."""
    z = zlib.compress(np.bitwise_xor(packed, reference).tobytes(), 9)
    return bytes([DEFLATED]) + z if len(z) < packed.size else bytes([RAW]) + packed.tobytes()


def decode(blob: bytes, reference: np.ndarray) -> np.ndarray:
    """`encode`'s inverse: the packed mask [n / 8] uint8."""
    if blob[:1] == bytes([DEFLATED]):
        return np.bitwise_xor(np.frombuffer(zlib.decompress(blob[1:]), np.uint8), reference)
    if blob[:1] == bytes([RAW]):
        return np.frombuffer(blob[1:], np.uint8).copy()
    raise ValueError(f"not a DIET mask: flag byte {blob[:1]!r}")


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """[B, ceil(n / 8)] uint8 -> [B, n] float 0/1 (np.packbits order: high bit first)."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(1)[:, :n].float()


class Masker(nn.Module):
    """DIET's cloud-side mask generator: L heads, head k maps interests h [B, hidden] to block
    k's masks. Exposes the mapper interface the fleet uses (`names`, `factored`, `terms`,
    `params_from_terms`, `flat_from_terms`, `head_params`)."""

    def __init__(self, blocks, hidden: int, keep: float = 0.5, code: str = "reference"):
        super().__init__()
        if not 0 < keep <= 1:
            raise ValueError(f"method.keep must be in (0, 1], got {keep}")
        if code not in CODES:
            raise ValueError(f"method.code must be one of {list(CODES)}, got {code!r}")
        self.keep, self.code = keep, code
        # the interest whose masks are every block's reference (NaN until training sets it)
        self.register_buffer("reference_h", torch.full((hidden,), math.nan))
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

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints from before the reference: left unset (NaN), set again from the data
        state_dict.setdefault(prefix + "reference_h", torch.full_like(self.reference_h, math.nan))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def has_reference(self) -> bool:
        return not bool(torch.isnan(self.reference_h).any())

    @torch.no_grad()
    def reference(self, k: int) -> np.ndarray:
        """Block k's packed reference mask [n / 8] uint8: its masks for `reference_h`."""
        if not self.has_reference:
            raise ValueError("DIET's reference interest is unset: train the model (fit sets it) or "
                             "call training.set_reference")
        return pack(self.terms(k, self.reference_h.unsqueeze(0)))[0]

    def mask_bytes(self, k: int) -> int:
        """Bytes of block k's masks at 1 bit a weight (method.code=bits; the reference mask too)."""
        return (self.sizes[k] + 7) // 8

    def coded_bytes(self, k: int, masks: torch.Tensor) -> np.ndarray:
        """Bytes on the wire of block k's masks [B, n] (0/1, or packed uint8), under `code`."""
        if self.code == "bits":
            return np.full(masks.shape[0], self.mask_bytes(k), np.int64)
        packed = masks.numpy() if masks.dtype == torch.uint8 else pack(masks)
        ref = self.reference(k)
        return np.array([len(encode(p, ref)) for p in packed], np.int64)

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
