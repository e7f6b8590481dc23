"""The cloud's answer to requests: one batched pass of the mapper plus retrieval.

For every request the cloud sees (beta, h), a user vector and the budget, never items (DIET's
requests are items: the cloud encodes them with its own extractor and answers masks). It
assembles each device's sub-model from the blocks that fit (fl_sim.models.assemble), retrieves
the top `sim.candidates` items for the user vector (items of the history it holds for that
device left out), and answers when its own time allows: the request's arrival, any wait in
its queue (`faults.cloud_capacity`, requests per simulated second), then `sim.cloud_latency_s`.
Nothing here depends on how requests were batched, so a round's length changes no answer.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

from fl_sim import runfiles
from fl_sim.faults import Faults, checksum
from fl_sim.models import cost
from fl_sim.models import diet
from fl_sim.models.assemble import assemble_batch
from fl_sim.models.forward_ofa import argmax_gate
from fl_sim.protocol import ID_BYTES, Deliveries, Requests, candidate_count
from fl_sim.training import encode_each
from strategies import validate

class Cloud:
    def __init__(self, run_dir: str):
        self.cfg = cfg = runfiles.load_config(run_dir)
        self.model = runfiles.load_model(run_dir)
        bb = self.model.backbone
        self.L, self.d = bb.n_blocks, bb.d
        self.latency = float(cfg.sim.cloud_latency_s)
        self.h_dim = self.model.upload_h_dim
        self.window = self.model.spec.window if self.model.reveals_items else 0  # DIET: items per request
        s = runfiles.load_streams(run_dir)
        self.n_devices, self.n_items = s.n_devices, s.n_items
        self.n_cand = candidate_count(cfg, s.n_items)
        self.precision = str(cfg.sim.precision)
        self.payload = cost.Payload(self.model, str(cfg.sim.payload))
        self.items = bb.item_emb.weight[1:].detach()
        # What the cloud holds legitimately: each device's history before T0 (left out of retrieval).
        # (device d's history is s.item[s.indptr[d]:s.split[d]], read from the shared streams)
        self.hist_lo, self.hist_hi, self.stream_item = s.indptr[:-1], s.split, s.item
        # One model for everyone (device_rec, finetune): its weights ship once, with the first answer.
        self.static = self.model.mapper is None and self.model.spec.structure == "all"
        self.counts = {"answered": 0, "unservable": 0, "first": 0, "first_unservable": 0}
        faults = Faults.from_cfg(cfg)
        self.capacity = Capacity(faults.cloud_capacity, faults.cloud_queue)
        self.refused: dict[str, int] = {}  # malformed requests by reason (strategies/validate.py)
        self._told: list[np.ndarray] = []  # devices to tell their request was not served

    def empty_deliveries(self) -> Deliveries:
        return Deliveries.empty(self.L, self.n_cand)

    def empty_requests(self) -> Requests:
        return Requests.empty(self.L, self.h_dim, self.d, self.window)

    def admit(self, parts: list[Requests | dict]) -> Requests:
        """Requests from every shard as one batch sorted by device (so the batch does not depend
        on sharding), malformed ones refused and counted."""
        good = []
        for part in parts:
            arrays = part.arrays() if isinstance(part, Requests) else part
            why = validate.check_part(arrays, self.L, self.h_dim, self.d, self.window)
            if why is None:
                good.append(Requests(**{k: arrays[k] for k in validate.REQUEST_KEYS}))
                continue
            dev = np.asarray(arrays.get("device", np.zeros(0)))
            self._refuse(why, max(len(dev) if dev.ndim == 1 else 1, 1), dev if dev.ndim == 1 else None)
        if not good:
            return self.empty_requests()
        req = Requests.concat(good)
        req = req.take(np.argsort(req.device, kind="stable"))
        reason = validate.check_rows(req.arrays(), self.n_devices, self.n_items)
        for why in np.unique(reason[reason != ""]):
            self._refuse(str(why), int((reason == why).sum()), req.device[reason == why])
        return req.take(reason == "")

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
    def answer(self, req: Requests) -> Deliveries:
        """Deliveries for the requests, and the devices whose request was refused or could not
        be served (`refused`)."""
        start, refused = self.capacity.schedule(req.ready_time, req.first, req.device)
        if refused.any():
            self._refuse("capacity", int(refused.sum()), req.device[refused])
        req, start = req.take(~refused), start[~refused]
        if len(req) == 0:
            out = Deliveries.empty(self.L, self.n_cand)
            out.refused = self._not_served(np.zeros(0, np.int64))
            return out
        beta = torch.from_numpy(req.beta)
        h = torch.from_numpy(req.h) if req.h.shape[1] else None
        if self.model.reveals_items:  # DIET: the cloud encodes the items the device revealed
            h = self.interests(req.items)
        inf = np.full(len(req), np.inf)
        budget_f, budget_p = (inf, inf) if self.static else (req.max_flops, req.max_params)
        a = assemble_batch(self.model, beta if self.model.controller is not None else None, argmax_gate(beta), h,
                           budget_f, budget_p, catalogue=self.n_cand or None)
        fits = a.fits
        self.counts["unservable"] += int((~fits).sum())
        self.counts["answered"] += int(fits.sum())
        self.counts["first"] += int((fits & req.first).sum())
        self.counts["first_unservable"] += int((~fits & req.first).sum())
        keep = np.flatnonzero(fits)
        wanted = argmax_gate(beta).numpy() >= 0.5
        coded = None
        if self.model.reveals_items:  # DIET: each answer's masks as they travel (method.code)
            coded = np.zeros(a.keep.shape, np.int64)
            for k, t in a.terms.items():
                coded[a.rows[k], k] = self.model.mapper.coded_bytes(k, t)
        model_bytes = self.payload.bytes(a.keep, req.holds, coded)
        if self.static:  # the one model (device_rec, finetune) ships once; later answers bring candidates only
            model_bytes = np.where(req.first, model_bytes, 0)
        cand = self.retrieve(req.device[keep], req.user[keep])
        n = cand.shape[1]
        cand_bytes = n * ID_BYTES + cost.payload_bytes(n * self.d, 1, self.precision) if n else 0
        answer_time = np.where(req.first, req.ready_time, start + self.latency)
        out = Deliveries(device=req.device[keep], request_time=req.time[keep], answer_time=answer_time[keep],
                         blocks=a.keep[keep], cut=(wanted & ~a.keep).any(1)[keep], model_bytes=model_bytes[keep],
                         candidate_bytes=np.full(len(keep), cand_bytes, np.int64), candidates=cand,
                         checksum=np.zeros(len(keep), np.int64), first=req.first[keep],
                         weights=[None] * self.L, refused=self._not_served(req.device[~fits]))
        served = torch.from_numpy(fits)
        for k, t in a.terms.items():  # what differs per device (shared weights: none)
            t = t[served[torch.from_numpy(a.rows[k])]] if not fits.all() else t
            out.weights[k] = diet.pack(t) if self.model.reveals_items else t.numpy()  # DIET: 1 bit a weight in memory
        rows = out.weight_rows()
        out.checksum[:] = [checksum(out.blocks[i], rows[i], out.candidates[i]) for i in range(len(out))]
        return out

    def interests(self, items: np.ndarray) -> torch.Tensor:
        """DIET: the extractor over each request's items [r, W] (model ids, 0 pads), each read
        to its own length as devices encode theirs, so a device's masks do not depend on who
        asked with it."""
        return encode_each(self.model, [row[row > 0] for row in items])[2]

    def retrieve(self, device: np.ndarray, user: np.ndarray, chunk: int = 4096) -> np.ndarray:
        """The top-N items for each user vector, items of the device's history left out (in
        chunks of requests: a score matrix over the catalogue for all of them at once would be
        the run's largest allocation at deployment)."""
        if not self.n_cand:
            return np.zeros((len(device), 0), np.int64)
        if len(device) > chunk:
            return np.concatenate([self.retrieve(device[i:i + chunk], user[i:i + chunk], chunk)
                                   for i in range(0, len(device), chunk)])
        scores = torch.from_numpy(user) @ self.items.T
        lo, hi = self.hist_lo[device], self.hist_hi[device]
        rows = np.repeat(np.arange(len(device)), hi - lo)
        starts = np.concatenate([[0], np.cumsum(hi - lo)])[:-1]
        cols = self.stream_item[np.arange(len(rows)) - np.repeat(starts - lo, hi - lo)].astype(np.int64)
        scores[torch.from_numpy(rows), torch.from_numpy(cols)] = -torch.inf
        return torch.topk(scores, self.n_cand, dim=1).indices.numpy().astype(np.int64)


class Capacity:
    """The cloud as one first-come-first-served server answering `rate` requests per simulated
    second (None: no limit). A request starts when it has arrived and the server is free; one
    that would find `limit` requests already waiting is refused (the device is told and may ask
    again). First models (deployment) are outside capacity. Requests are taken in the order of
    their arrival within each batch the cloud receives; across batches, a request that reaches
    the cloud's exchange late is queued behind those already taken (with no limit set, the order
    changes nothing)."""

    def __init__(self, rate: float | None, limit: int):
        self.rate, self.limit = rate, limit
        self.free_at = -np.inf
        self.starts: deque = deque()  # start times of accepted requests still ahead of the newest arrival
        self.queued = self.max_queue = 0  # requests that waited; the longest queue met on arrival

    def schedule(self, ready: np.ndarray, first: np.ndarray, device: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the time each request starts being served, the requests refused)."""
        start = np.asarray(ready, dtype=float).copy()
        refused = np.zeros(len(ready), bool)
        if self.rate is None:
            return start, refused
        for i in np.lexsort((device, ready)):
            if first[i]:
                continue
            while self.starts and self.starts[0] <= ready[i]:
                self.starts.popleft()
            waiting = len(self.starts)
            if self.free_at > ready[i] and waiting >= self.limit:
                refused[i] = True
                continue
            start[i] = max(ready[i], self.free_at)
            self.free_at = start[i] + 1.0 / self.rate
            if start[i] > ready[i]:
                self.queued += 1
                self.starts.append(start[i])
                self.max_queue = max(self.max_queue, waiting + 1)
        return start, refused
