"""The cloud's answer to a round's requests: one batched pass of the mapper.

For every request the cloud sees (beta, h) and the budget, never items. It assembles each
device's sub-model from the blocks that fit (fl_sim.models.assemble), answers at the end of
the round's batch plus its own latency, and counts what it could not serve.
"""

from __future__ import annotations

import numpy as np
import torch

from fl_sim import protocol, runfiles
from fl_sim.models.assemble import Budget, assemble
from fl_sim.models.forward_ofa import argmax_gate


class Cloud:
    def __init__(self, run_dir: str):
        self.cfg = runfiles.load_config(run_dir)
        self.model = runfiles.load_model(run_dir)
        self.L = self.model.backbone.n_blocks
        self.latency = float(self.cfg.sim.cloud_latency_s)
        self.counts = {"answered": 0, "unservable": 0, "bootstrap": 0}

    @torch.no_grad()
    def answer(self, req: dict, batch_time: float) -> dict:
        """Deliveries for the requests gathered up to `batch_time` (the round's end)."""
        n = len(req["device"])
        if n == 0:
            return protocol.empty_deliveries(self.L)
        beta = torch.from_numpy(req["beta"])
        gate = argmax_gate(beta)
        h = torch.from_numpy(req["h"]) if req["h"].shape[1] else None
        budgets = [Budget(f, p) for f, p in zip(req["max_flops"], req["max_params"])]
        subs = assemble(self.model, beta if self.model.controller is not None else None, gate, h, budgets)
        fits = np.array([s.fits for s in subs])
        self.counts["unservable"] += int((~fits).sum())
        self.counts["answered"] += int(fits.sum())
        self.counts["bootstrap"] += int((fits & req["bootstrap"]).sum())
        keep = np.flatnonzero(fits)
        answer_time = np.where(req["bootstrap"], req["ready_time"],
                               np.maximum(req["ready_time"], batch_time) + self.latency)
        blocks = np.zeros((len(keep), self.L), dtype=bool)
        for i, s in enumerate(keep):
            blocks[i, subs[s].blocks] = True
        out = {"device": req["device"][keep], "answer_time": answer_time[keep], "blocks": blocks,
               "payload_bytes": np.array([subs[s].payload_bytes(self.model) for s in keep], dtype=np.int64),
               "bootstrap": req["bootstrap"][keep]}
        for k in range(self.L):
            rows = np.flatnonzero(blocks[:, k])
            if len(rows) and self.model.mapper is not None:
                pos = [subs[keep[r]].blocks.index(k) for r in rows]
                out[f"rows_{k}"] = rows
                out[f"flat_{k}"] = torch.stack([subs[keep[r]].flat[p] for r, p in zip(rows, pos)]).numpy()
        return out
