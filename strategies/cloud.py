"""The cloud's answer to a round's requests: one batched pass of the mapper.

For every request the cloud sees (beta, h) and the budget, never items. It assembles each
device's sub-model from the blocks that fit (fl_sim.models.assemble), answers at the end of
the round's batch plus its own latency, and counts what it could not serve.
"""

from __future__ import annotations

import numpy as np
import torch

from fl_sim import protocol, runfiles
from fl_sim.faults import Faults, checksum
from strategies import validate
from fl_sim.models.assemble import assemble_batch
from fl_sim.models.forward_ofa import argmax_gate


class Cloud:
    def __init__(self, run_dir: str):
        self.cfg = runfiles.load_config(run_dir)
        self.model = runfiles.load_model(run_dir)
        self.L = self.model.backbone.n_blocks
        self.latency = float(self.cfg.sim.cloud_latency_s)
        self.h_dim = self.model.extractor.gru.hidden_size if self.model.extractor is not None else 0
        self.n_devices = runfiles.load_streams(run_dir).n_devices
        self.counts = {"answered": 0, "unservable": 0, "bootstrap": 0, "bootstrap_unservable": 0}
        faults = Faults.from_cfg(self.cfg)
        self.capacity = Capacity(faults.cloud_capacity, faults.cloud_queue, self.L, self.h_dim)
        self.refused: dict[str, int] = {}  # malformed requests by reason (strategies/validate.py)
        self._told: list[np.ndarray] = []  # devices to tell their request was not served

    def admit(self, parts: list[dict]) -> dict:
        """The round's requests from every shard as one batch sorted by device (so the batch
        does not depend on sharding), malformed ones refused and counted."""
        good = []
        for part in parts:
            why = validate.check_part(part, self.L, self.h_dim)
            if why is None:
                good.append(part)
                continue
            dev = np.asarray(part.get("device", np.zeros(0)))
            self._refuse(why, max(len(dev) if dev.ndim == 1 else 1, 1), dev if dev.ndim == 1 else None)
        if not good:
            return protocol.empty_requests(self.L, self.h_dim)
        req = protocol.concat(good)
        order = np.argsort(req["device"], kind="stable")
        req = {k: v[order] for k, v in req.items()}
        reason = validate.check_rows(req, self.n_devices)
        for why in np.unique(reason[reason != ""]):
            self._refuse(str(why), int((reason == why).sum()), req["device"][reason == why])
        ok = reason == ""
        return {k: v[ok] for k, v in req.items()}

    def _refuse(self, why: str, n: int, devices) -> None:
        self.refused[why] = self.refused.get(why, 0) + n
        if devices is not None and why not in ("unknown_device", "duplicate"):
            dev = np.asarray(devices, dtype=np.int64)
            self._told.append(dev[(dev >= 0) & (dev < self.n_devices)])

    def _not_served(self, unservable: np.ndarray) -> np.ndarray:
        told = np.concatenate([*self._told, unservable]).astype(np.int64)
        self._told = []
        return told

    def state(self) -> dict:
        return {"counts": self.counts, "refused": self.refused, "told": self._told, "capacity": self.capacity}

    def restore(self, state: dict) -> None:
        self.counts, self.refused, self._told, self.capacity = (state[k] for k in ("counts", "refused", "told",
                                                                                    "capacity"))

    @torch.no_grad()
    def answer(self, req: dict, batch_time: float) -> dict:
        """Deliveries for the requests gathered up to `batch_time` (the round's end), and the
        devices whose request was refused or could not be served (`refused`)."""
        req, refused = self.capacity.take(req)
        if len(refused):
            self._refuse("capacity", len(refused), refused)
        if len(req["device"]) == 0:
            return {**protocol.empty_deliveries(self.L), "refused": self._not_served(np.zeros(0, np.int64))}
        beta = torch.from_numpy(req["beta"])
        h = torch.from_numpy(req["h"]) if req["h"].shape[1] else None
        a = assemble_batch(self.model, beta if self.model.controller is not None else None, argmax_gate(beta), h,
                           req["max_flops"], req["max_params"])
        self.counts["unservable"] += int((~a.fits).sum())
        self.counts["answered"] += int(a.fits.sum())
        self.counts["bootstrap"] += int((a.fits & req["bootstrap"]).sum())
        self.counts["bootstrap_unservable"] += int((~a.fits & req["bootstrap"]).sum())
        keep = np.flatnonzero(a.fits)
        new_index = np.full(len(a.fits), -1)
        new_index[keep] = np.arange(len(keep))
        answer_time = np.where(req["bootstrap"], req["ready_time"],
                               np.maximum(req["ready_time"], batch_time) + self.latency)
        out = {"device": req["device"][keep], "answer_time": answer_time[keep], "blocks": a.keep[keep],
               "payload_bytes": a.payload_bytes[keep].astype(np.int64), "bootstrap": req["bootstrap"][keep],
               "refused": self._not_served(req["device"][~a.fits])}
        per_device: list[list] = [[] for _ in keep]  # each sub-model's weight rows, in block order
        if self.model.mapper is not None:  # shared weights (no mapper) are on the device already
            for k, rows in sorted(a.rows.items()):
                served = a.fits[rows]
                out[f"rows_{k}"] = new_index[rows[served]]
                out[f"flat_{k}"] = a.flat[k][torch.from_numpy(served)].numpy() if not served.all() else a.flat[k].numpy()
                for r, row in zip(out[f"rows_{k}"], out[f"flat_{k}"]):
                    per_device[r].append(row)
        out["checksum"] = np.array([checksum(b, rows) for b, rows in zip(out["blocks"], per_device)], dtype=np.int64)
        return out


class Capacity:
    """The cloud's limit per round (faults.cloud_capacity; None: no limit). A round's batch
    serves the queue first (oldest), then the round's requests in the order they became ready,
    up to `capacity`; the next `queue_limit` wait for a later round, the rest are refused.
    First models (bootstrap) are deployment, outside capacity."""

    def __init__(self, capacity: int | None, queue_limit: int, n_blocks: int, h_dim: int):
        self.capacity, self.limit = capacity, queue_limit
        self.queue = protocol.empty_requests(n_blocks, h_dim)
        self.queued = self.max_queue = 0  # requests that waited at least one round; longest queue

    def take(self, req: dict) -> tuple[dict, np.ndarray]:
        """(the requests this batch serves, the devices refused)."""
        if self.capacity is None:
            return req, np.zeros(0, np.int64)
        boot = req["bootstrap"]
        new = np.flatnonzero(~boot)
        new = new[np.lexsort((req["device"][new], req["ready_time"][new]))]  # first come, first served
        n_queue = len(self.queue["device"])
        waiting = protocol.concat([self.queue, protocol.take(req, new)])
        n, cap, limit = len(waiting["device"]), self.capacity, self.limit
        self.queued += max(0, min(cap + limit, n) - max(cap, n_queue))  # this round's that wait
        self.queue = protocol.take(waiting, slice(cap, cap + limit))
        self.max_queue = max(self.max_queue, len(self.queue["device"]))
        served = protocol.concat([protocol.take(req, boot), protocol.take(waiting, slice(0, cap))])
        return served, waiting["device"][cap + limit:]
