"""The cloud's answer to a round's requests: one batched pass of the mapper.

For every request the cloud sees (beta, h) and the budget, never items. It assembles each
device's sub-model from the blocks that fit (fl_sim.models.assemble), answers at the end of
the round's batch plus its own latency, and counts what it could not serve.
"""

from __future__ import annotations

import numpy as np
import torch

from fl_sim import protocol, runfiles
from fl_sim.models.assemble import assemble_batch
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
        if len(req["device"]) == 0:
            return protocol.empty_deliveries(self.L)
        beta = torch.from_numpy(req["beta"])
        h = torch.from_numpy(req["h"]) if req["h"].shape[1] else None
        a = assemble_batch(self.model, beta if self.model.controller is not None else None, argmax_gate(beta), h,
                           req["max_flops"], req["max_params"])
        self.counts["unservable"] += int((~a.fits).sum())
        self.counts["answered"] += int(a.fits.sum())
        self.counts["bootstrap"] += int((a.fits & req["bootstrap"]).sum())
        keep = np.flatnonzero(a.fits)
        new_index = np.full(len(a.fits), -1)
        new_index[keep] = np.arange(len(keep))
        answer_time = np.where(req["bootstrap"], req["ready_time"],
                               np.maximum(req["ready_time"], batch_time) + self.latency)
        out = {"device": req["device"][keep], "answer_time": answer_time[keep], "blocks": a.keep[keep],
               "payload_bytes": a.payload_bytes[keep].astype(np.int64), "bootstrap": req["bootstrap"][keep]}
        if self.model.mapper is not None:  # shared weights (no mapper) are on the device already
            for k, rows in a.rows.items():
                served = a.fits[rows]
                out[f"rows_{k}"] = new_index[rows[served]]
                out[f"flat_{k}"] = a.flat[k][torch.from_numpy(served)].numpy() if not served.all() else a.flat[k].numpy()
        return out
