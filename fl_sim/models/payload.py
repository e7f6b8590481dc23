"""Weight payloads at lower precision: what the device receives, round-tripped for evaluation."""

from __future__ import annotations

from typing import Optional

import torch

from fl_sim.models.blocks import LowRank

PRECISIONS = ("fp32", "fp16", "int8")


def roundtrip(t: torch.Tensor, precision: str, batched: bool) -> torch.Tensor:
    """The tensor as the device gets it: fp16 cast, or symmetric int8 with one scale per tensor
    (per sample when `batched`)."""
    if precision == "fp32":
        return t
    if precision == "fp16":
        return t.half().float()
    if precision == "int8":
        dims = tuple(range(1, t.dim())) if batched else tuple(range(t.dim()))
        scale = t.abs().amax(dim=dims, keepdim=True).clamp_min(1e-12) / 127.0
        return (t / scale).round().clamp(-127, 127) * scale
    raise ValueError(f"payload precision must be one of {PRECISIONS}, got {precision!r}")


def shipped_weights(model, params: Optional[list], precision: str) -> Optional[list]:
    """Per-block weights after transfer at `precision` (shared weights when nothing is generated)."""
    if precision == "fp32":
        return params
    blocks = model.backbone.blocks
    if params is None:
        return [{n: roundtrip(t.detach(), precision, False) for n, t in b.shared().items()} for b in blocks]
    out: list = []
    for b, p in zip(blocks, params):
        if p is None:
            out.append(None)
            continue
        shapes = dict(b.shapes)
        dense = {n: t.dense() if isinstance(t, LowRank) else t for n, t in p.items()}
        # a per-sample tensor has one dimension more than the block's own (one scale per sample)
        out.append({n: roundtrip(t, precision, t.dim() > len(shapes[n])) for n, t in dense.items()})
    return out
