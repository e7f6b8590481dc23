"""What a sub-model costs: FLOPs of one on-device inference, parameters, bytes shipped.

FLOPs count multiply-adds as 2 and include the matrix products, convolutions and attention
(what `torch.utils.flop_counter` counts); normalisations and activations are left out (they
are under 2% here). One inference = one forward pass over a sequence of `maxlen` items and
the scores of the items the device ranks at the last position: the whole catalogue offline,
the cached candidates in the fleet (`catalogue=N`).
"""

from __future__ import annotations

from typing import Iterable, Optional

import numpy as np

from fl_sim.models.backbone import Backbone
from fl_sim.models.blocks import NextItNetBlock, SASRecBlock

BYTES = {"fp32": 4, "fp16": 2, "int8": 1}


def block_flops(block, T: int) -> int:
    if isinstance(block, SASRecBlock):
        d = block.d
        return 12 * T * d * d + 4 * T * T * d  # q,k,v,o + 2-layer FFN; QK^T and AV
    if isinstance(block, NextItNetBlock):
        return 2 * (2 * T * block.d * block.d * block.kernel)
    raise TypeError(type(block))


def inference_flops(backbone: Backbone, blocks: Iterable[int], T: Optional[int] = None,
                    catalogue: Optional[int] = None) -> int:
    T = backbone.maxlen if T is None else T
    n = backbone.n_items if catalogue is None else catalogue
    return sum(block_flops(backbone.blocks[l], T) for l in blocks) + 2 * backbone.d * n


def per_block(backbone: Backbone):
    """(FLOPs per inference, parameters) of each block as float arrays, for vectorised sums."""
    flops = np.array([block_flops(b, backbone.maxlen) for b in backbone.blocks], dtype=np.float64)
    params = np.array([b.n_params() for b in backbone.blocks], dtype=np.float64)
    return flops, params


def block_params(backbone: Backbone, blocks: Iterable[int]) -> int:
    return sum(backbone.blocks[l].n_params() for l in blocks)


def base_params(backbone: Backbone, catalogue: Optional[int] = None) -> int:
    """Parameters every on-device model holds whatever its blocks: the embeddings of the items it
    ranks (the whole catalogue, or `catalogue` cached candidates), positions and the final LN."""
    items = backbone.item_emb.weight.numel() if catalogue is None else catalogue * backbone.d
    n = items + 2 * backbone.d
    return n + (backbone.pos_emb.weight.numel() if backbone.pos_emb is not None else 0)


def model_params(backbone: Backbone, blocks: Iterable[int]) -> int:
    return base_params(backbone) + block_params(backbone, blocks)


def payload_bytes(n_params: int, n_tensors: int, precision: str = "fp32") -> int:
    """Bytes of a weight payload; int8 carries one fp32 scale per tensor."""
    if precision not in BYTES:
        raise ValueError(f"precision must be one of {list(BYTES)}, got {precision!r}")
    return n_params * BYTES[precision] + (4 * n_tensors if precision == "int8" else 0)


def gru_flops(d_in: int, hidden: int, steps: int) -> int:
    return steps * 6 * hidden * (d_in + hidden)


def train_flops(backbone, length: int, steps: int) -> float:
    """On-device fine-tuning: forward and backward (about 3x a forward pass) over every
    position of a sequence of `length`, the catalogue softmax included, `steps` times."""
    fwd = sum(block_flops(b, length) for b in backbone.blocks) + 2 * backbone.d * backbone.n_items * length
    return 3.0 * steps * fwd


class Payload:
    """Bytes of a sub-model's weights as shipped (fp32), per answer.

    `full`: every kept block's whole weights, as the paper ships them. `delta`: what the mapper
    generated for each kept block (its terms), plus a kept block's shared weights where the
    device does not hold them yet. Without a mapper both ship the blocks' shared weights. DIET
    (a mapper with `coded_bytes`): its masks as coded (`method.code`, sizes the cloud passes in),
    plus, the first time in either mode, the frozen shared block and, under code=reference, the
    block's reference mask at 1 bit a weight.
    """

    def __init__(self, model, mode: str = "full"):
        if mode not in ("full", "delta"):
            raise ValueError(f"payload mode must be full or delta, got {mode!r}")
        blocks, mapper = model.backbone.blocks, model.mapper
        self.mode = mode
        self.whole = np.array([b.n_params() for b in blocks], np.int64)
        self.whole_tensors = np.array([len(b.shapes) for b in blocks], np.int64)
        self.terms = np.array([mapper.heads[k].out_features if mapper is not None else 0
                               for k in range(len(blocks))], np.int64)
        self.terms_tensors = np.array([len(mapper.names[k]) + 2 * len(mapper.factored[k]) if mapper is not None
                                       else 0 for k in range(len(blocks))], np.int64)
        self.generated = mapper is not None
        # DIET: what a block's first delivery adds to its shared weights: the reference mask, if coded against it
        self.masks = (np.array([mapper.mask_bytes(k) if mapper.code == "reference" else 0 for k in range(len(blocks))],
                               np.int64) if hasattr(mapper, "coded_bytes") else None)

    def bytes(self, keep, holds, coded=None):
        """keep, holds: [m, L] bool (the answer's blocks; the blocks whose shared weights the
        device holds); DIET: coded [m, L] int64, each kept block's masks as coded. Returns [m] int64."""
        whole = payload_bytes(keep @ self.whole, keep @ self.whole_tensors)
        if self.masks is not None:
            new = keep & ~holds
            return ((coded * keep).sum(1) + new @ self.masks
                    + payload_bytes(new @ self.whole, new @ self.whole_tensors)).astype(np.int64)
        if self.mode == "full" or not self.generated:
            return whole.astype(np.int64)
        new = keep & ~holds
        return (payload_bytes(keep @ self.terms, keep @ self.terms_tensors)
                + payload_bytes(new @ self.whole, new @ self.whole_tensors)).astype(np.int64)
