"""A backbone plus the method's device-side and cloud-side parts, selected by `method=`.

| method | structure | weights |
|---|---|---|
| device_rec | all blocks | shared (one model for everyone) |
| controller_only ("+controller") | learned per device | shared |
| forward_ofa | learned per device | generated from (beta, h) |
| forward_ofa_no_struct | learned per device | generated from h, E' not conditioned on beta |
| duet | all blocks | generated from h |
| first_k / last_k / random_k | fixed k blocks | generated from (structure, h) |
| finetune | all blocks | shared, fine-tuned on the device |
| diet | all blocks | frozen random, masked per device from its recent items (fl_sim/models/diet.py) |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from fl_sim.models.backbone import Backbone
from fl_sim.models.diet import Masker
from fl_sim.models.forward_ofa import Controller, Extractor, Mapper, argmax_gate, compact_loss, gumbel_gate


@dataclass(frozen=True)
class MethodSpec:
    name: str
    structure: str  # all | learned | first_k | last_k | random_k
    mapper: bool
    structural: bool  # E' initial state from beta
    k: int = 3
    tau: float = 5.0
    lam: float = 0.005
    generate: str = "full"
    rank: int = 4  # factor rank for generate=lowrank
    window: int = 50  # recent items read by controller and E'
    keep: float = 0.5  # generate=mask (DIET): share of each weight matrix a device's mask keeps
    code: str = "reference"  # generate=mask (DIET): how a mask travels (diet.CODES)

    @classmethod
    def from_cfg(cls, mcfg) -> "MethodSpec":
        return cls(name=mcfg.name, structure=mcfg.structure, mapper=bool(mcfg.mapper),
                   structural=bool(mcfg.structural), k=int(mcfg.get("k", 3)), tau=float(mcfg.get("tau", 5.0)),
                   lam=float(mcfg.get("lam", 0.0)), generate=mcfg.get("generate", "full"),
                   rank=int(mcfg.get("rank", 4)), window=int(mcfg.get("window", 50)),
                   keep=float(mcfg.get("keep", 0.5)), code=str(mcfg.get("code", "reference")))


class Recommender(nn.Module):
    def __init__(self, backbone: Backbone, spec: MethodSpec, hidden: int = 64):
        super().__init__()
        self.backbone, self.spec = backbone, spec
        L, d = backbone.n_blocks, backbone.d
        if spec.structure in ("first_k", "last_k", "random_k") and not 0 <= spec.k <= L:
            raise ValueError(f"method.k must be in [0, {L}], got {spec.k}")
        self.controller = Controller(d, hidden, L) if spec.structure == "learned" else None
        self.extractor = Extractor(d, hidden, L, spec.structural) if spec.mapper else None
        if spec.mapper and spec.generate == "mask":  # DIET: the blocks stay as initialised
            self.mapper = Masker(backbone.blocks, hidden, spec.keep, spec.code)
            backbone.blocks.requires_grad_(False)
        else:
            self.mapper = Mapper(backbone.blocks, hidden, spec.generate, spec.rank) if spec.mapper else None

    @property
    def reveals_items(self) -> bool:
        """DIET: the cloud runs the extractor, so a request carries the device's recent items."""
        return isinstance(self.mapper, Masker)

    @property
    def upload_h_dim(self) -> int:
        """Size of the interest h a device computes and uploads (0: none)."""
        return 0 if self.extractor is None or self.reveals_items else self.extractor.gru.hidden_size

    # ---- device side -------------------------------------------------------------------
    def fixed_gate(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        L, k, s = self.backbone.n_blocks, self.spec.k, self.spec.structure
        gate = torch.zeros(n, L)
        if s == "all":
            gate[:] = 1
        elif s == "first_k":
            gate[:, :k] = 1
        elif s == "last_k":
            gate[:, L - k:] = 1
        elif s == "random_k":
            idx = torch.rand(n, L, generator=generator).argsort(-1)[:, :k]
            gate.scatter_(1, idx, 1.0)
        return gate

    def encode(self, recent: torch.Tensor, generator: Optional[torch.Generator] = None,
               lengths: Optional[torch.Tensor] = None):
        """Device: from recent items [B,W] (left-padded ids; with `lengths`, right-padded rows
        read up to their lengths, padding never read) to (beta, gate, h).

        beta is None for fixed structures; the fixed gate then conditions E' instead.
        """
        emb = self.backbone.item_emb(recent)
        if self.controller is not None:
            beta = self.controller(emb, lengths)
            gate = gumbel_gate(beta, self.spec.tau) if self.training else argmax_gate(beta)
        else:
            gate = self.fixed_gate(recent.shape[0], generator).to(emb.device)
            beta = None
        h = None
        if self.extractor is not None:
            struct = beta if beta is not None else torch.log(torch.stack([gate, 1 - gate], -1).clamp_min(1e-4))
            h = self.extractor(emb, struct, lengths)
        return beta, gate, h

    # ---- cloud side --------------------------------------------------------------------
    def generate(self, h: Optional[torch.Tensor], blocks=None) -> Optional[list]:
        if self.mapper is None:
            return None
        run = range(self.backbone.n_blocks) if blocks is None else blocks
        params: list = [None] * self.backbone.n_blocks
        for k in run:
            params[k] = self.mapper.block_params(self.backbone.blocks[k], k, h)
        return params

    # ---- training ----------------------------------------------------------------------
    def forward(self, seq: torch.Tensor, recent: torch.Tensor, generator=None,
                lengths: Optional[torch.Tensor] = None):
        """Hidden states of `seq` under the structure and weights derived from `recent` (with
        `lengths`: right-padded rows read to their lengths, as `encode`)."""
        beta, gate, h = self.encode(recent, generator, lengths)
        gate_arg = None if self.spec.structure == "all" else gate
        hidden = self.backbone(seq, gate=gate_arg, params=self.generate(h))
        return hidden, beta, gate

    def regulariser(self, beta: Optional[torch.Tensor]) -> torch.Tensor:
        if beta is None or self.spec.lam == 0:
            return torch.zeros(())
        return self.spec.lam * compact_loss(beta)
