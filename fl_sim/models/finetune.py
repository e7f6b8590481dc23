"""On-device fine-tuning, for a batch of devices at once.

Each device starts from the cloud's blocks and takes `steps` Adam steps on its own recent
items (next-item cross-entropy over the catalogue). The blocks take per-device weights, so one
batched pass trains every device of the batch and no device's gradient touches another's:
Adam is element-wise, so Adam on the stacked [devices, weights] tensor is each device's own.
Item embeddings stay the cloud's (a per-device copy of the catalogue's embeddings is not
simulated). No dropout, so results do not depend on how devices are batched.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fl_sim.training import left_pad


def finetune_blocks(backbone, sequences: list[np.ndarray], steps: int, lr: float) -> list[torch.Tensor]:
    """Per-block weights [devices, P_k] after fine-tuning on each device's item ids (model ids,
    1-based, oldest first; the last maxlen + 1 are used)."""
    T = backbone.maxlen
    seqs = [np.asarray(s)[-(T + 1):] for s in sequences]
    inputs, targets = left_pad([s[:-1] for s in seqs], T), left_pad([s[1:] for s in seqs], T)
    n = len(seqs)
    flats = [b.flat_shared().detach().repeat(n, 1).requires_grad_() for b in backbone.blocks]
    opt = torch.optim.Adam(flats, lr=lr)
    was_training = backbone.training
    frozen = [(p, p.requires_grad) for p in backbone.parameters()]
    backbone.eval()
    for p, _ in frozen:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            keep = targets > 0
            rows = torch.arange(n).unsqueeze(1).expand_as(targets)[keep]
            per_device = torch.zeros(n).index_add_(0, rows, torch.ones(len(rows))).clamp(min=1)
            for _ in range(steps):
                params = [b.unflatten(f) for b, f in zip(backbone.blocks, flats)]
                hidden = backbone(inputs, params=params)
                loss_tok = F.cross_entropy(backbone.scores(hidden[keep]), targets[keep] - 1, reduction="none")
                loss = (torch.zeros(n).index_add_(0, rows, loss_tok) / per_device).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        backbone.train(was_training)
    return [f.detach() for f in flats]
