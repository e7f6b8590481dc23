"""A shard of simulated phones: replays their streams window by window, scores every event
with the model each device holds at that moment, lets the trigger decide who asks the cloud
for a new model, and installs the sub-models the cloud sends back when their download ends.

Everything a device does here uses only what that device has: its own items, its model, its
resources (fl_sim.devices). What goes to the cloud is (beta, h) and the budget.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate

from clients.download import COUNTS, download
from clients.triggers import DeviceView
from fl_sim import faults, protocol, runfiles
from fl_sim.faults import Faults
from fl_sim.devices import build_fleet
from fl_sim.devices.budget import budgets
from fl_sim.models import cost
from fl_sim.models.finetune import finetune_blocks
from fl_sim.training import left_pad

FLOAT_BYTES = 4


class Shard:
    def __init__(self, run_dir: str | Path, shard: int, n_shards: int):
        self.run_dir, self.index = str(run_dir), shard
        self.booted = False
        cfg = self.cfg = runfiles.load_config(self.run_dir)
        self.s = runfiles.load_streams(self.run_dir)
        self.model = runfiles.load_model(self.run_dir)
        bb = self.model.backbone
        self.L, self.T, self.W = bb.n_blocks, bb.maxlen, self.model.spec.window
        self.devices = np.arange(shard, self.s.n_devices, n_shards)
        n = len(self.devices)
        self.fleet = build_fleet(cfg.devices, self.s.n_devices, cfg.seed)
        self.trigger = instantiate(cfg.trigger)
        self.trigger.reset(n, cfg.seed)
        self.ids = self.s.item.astype(np.int64) + 1  # model ids
        self.emb = bb.item_emb.weight.detach().numpy()
        # finetune: no requests; the trigger decides when a device fine-tunes the cloud's model
        # on its own recent items, on its own compute.
        self.local_training = cfg.method.name == "finetune"
        self.shared = self.model.mapper is None and not self.local_training
        # One model for everyone (device_rec): asking again would bring the same model.
        self.static = self.shared and self.model.spec.structure == "all"
        self.block_flops, self.block_params = cost.per_block(bb)
        # What each device holds: kept blocks, their weights ({block: flat} or None = shared).
        self.blocks = np.zeros((n, self.L), dtype=bool)
        self.weights: list = [None] * n
        self.has_model = np.zeros(n, dtype=bool)
        self.arrived = np.zeros(n)
        self.pending_at = np.full(n, np.inf)
        self.pending: list = [None] * n
        self.outstanding = np.zeros(n, dtype=bool)
        self.pos = self.s.split[self.devices].copy()  # next stream event
        self.end = self.s.indptr[self.devices + 1]
        # Trigger inputs.
        self.events_since = np.zeros(n)
        self.sessions_since = np.zeros(n)
        self.interest = np.zeros((n, self.emb.shape[1]))
        self.interest_at_request = np.zeros_like(self.interest)
        self.entropy = np.zeros(n)
        self.hit_rate = np.zeros(n)
        self.signal_n = np.zeros(n)  # scored events so far (for the averages' start)
        self.last_session = np.full(n, -1)
        # Per-device accounting.
        self.acc = {k: np.zeros(n) for k in ("events", "scored", "no_context", "ndcg", "hit", "flops", "params",
                                             "requests", "bytes_up", "bytes_down", "offline_deferred",
                                             "no_model", "budget_violations", "over_budget_events",
                                             "request_flops", "bytes_first", "train_flops", "local_updates",
                                             "not_served", "bytes_wasted", *COUNTS)}
        # Ranking over the full catalogue, or over each session's cached candidates.
        self.num_candidates = int(cfg.sim.candidates) if cfg.sim.candidates != "full" else 0
        self.cand = np.full((n, max(self.num_candidates, 1)), -1, dtype=np.int64)
        self.block_events = np.zeros((n, self.L))  # scored events with block k in the model held
        self.ema = float(cfg.sim.ema)
        self.sent_budget = np.full((n, 2), np.inf)  # (FLOPs, params) of each device's last request
        self.downloads = np.zeros(n, dtype=np.int64)  # deliveries received so far (keys fault draws)
        self.faults = Faults.from_cfg(cfg)

    # ---- checkpoints (fl_sim.resume): everything a round changes ------------------------
    FIXED = frozenset({"run_dir", "index", "cfg", "s", "model", "L", "T", "W", "devices", "fleet", "ids", "emb",
                       "local_training", "shared", "static", "block_flops", "block_params", "num_candidates",
                       "ema", "faults"})

    def save(self, path: str) -> None:
        state = {k: v for k, v in vars(self).items() if k not in self.FIXED and not k.startswith("_")}
        torch.save(state, path)

    def restore(self, path: str) -> None:
        from fl_sim.resume import load_state

        vars(self).update(load_state(path))

    # ---- bootstrap: the first model of every device ------------------------------------
    def bootstrap(self, t0: float) -> dict:
        """Interest from each device's history; every device requests its first model at t0
        (methods with shared weights install the shared model instead)."""
        n = len(self.devices)
        self.booted = True
        for j, g in enumerate(self.devices):
            recent = self.ids[max(self.s.indptr[g], self.s.split[g] - self.W):self.s.split[g]]
            if len(recent):
                self.interest[j] = self.emb[recent].mean(0)
        self.interest_at_request[:] = self.interest
        if self.static or self.local_training:
            self.blocks[:] = True
            self.has_model[:] = True
            self.acc["bytes_down"] += self._model_bytes(self.blocks)
            self.acc["bytes_first"] += self._model_bytes(self.blocks)
            if self.local_training:  # the first fine-tuning, on the history, before deployment
                self._local_update(np.arange(n), np.full(n, t0), self.s.split[self.devices], before_start=True)
            return self._no_requests()
        # What every device installs once besides its blocks: embeddings, final LayerNorm, and the
        # on-device controller and extractor.
        on_device = [m for m in (self.model.controller, self.model.extractor) if m is not None]
        extra = cost.base_params(self.model.backbone) + sum(p.numel() for m in on_device for p in m.parameters())
        self.acc["bytes_down"] += extra * FLOAT_BYTES
        self.acc["bytes_first"] += extra * FLOAT_BYTES
        return self._requests(np.arange(n), np.full(n, t0), ends=self.s.split[self.devices], bootstrap=True)

    # ---- one round ---------------------------------------------------------------------
    def step(self, t0: float, t1: float, deliveries: dict) -> tuple[dict, dict]:
        self._receive(deliveries)
        lo = self.pos.copy()
        hi = self._events_before(t1)
        self.pos = hi
        count = hi - lo
        self.acc["events"] += count
        active = np.flatnonzero(count > 0)
        if len(active) == 0:
            return self._no_requests(), self._round_metrics(count, np.zeros(0), np.zeros(0))
        ndcg, hit, ent, ctx = self._score(active, lo, hi)
        req_j, req_t, req_end = self._trigger_loop(active, lo, hi, ndcg, hit, ent, ctx)
        if self.local_training:
            self._local_update(req_j, req_t, req_end)
            requests = self._no_requests()
        else:
            requests = self._requests(req_j, req_t, req_end) if len(req_j) else self._no_requests()
        return requests, self._round_metrics(count, ndcg[ctx], hit[ctx])

    def _local_update(self, js: np.ndarray, t: np.ndarray, ends: np.ndarray, before_start: bool = False) -> None:
        """Fine-tune the cloud's model on each device's items before `ends`; the result is
        installed when the device's compute has done the work (at once before deployment)."""
        if len(js) == 0:
            return
        spec = self.cfg.method
        bb = self.model.backbone
        g = self.devices[js]
        seqs = [self.ids[max(self.s.indptr[gi], e - self.T - 1):e] for gi, e in zip(g, ends)]
        trainable = np.array([len(s) >= 2 for s in seqs])
        flops = np.array([cost.train_flops(bb, len(s) - 1, int(spec.steps)) if ok else 0.0
                          for s, ok in zip(seqs, trainable)])
        self.acc["train_flops"][js] += flops
        self.acc["local_updates"][js] += 0 if before_start else trainable
        rate = self.fleet.compute[g] * self.fleet.free_compute(g, t)
        done = t if before_start else t + flops / np.maximum(rate, 1.0)
        all_blocks = np.ones(self.L, dtype=bool)
        chunk = 64
        for c0 in range(0, len(js), chunk):
            part = np.flatnonzero(trainable[c0:c0 + chunk]) + c0
            if len(part) == 0:
                continue
            flats = finetune_blocks(bb, [seqs[i] for i in part], int(spec.steps), float(spec.lr))
            for r, i in enumerate(part):
                j = js[i]
                self.pending[j] = (all_blocks, {k: flats[k][r] for k in range(self.L)})
                self.pending_at[j] = done[i]
                self.outstanding[j] = True
                if before_start:
                    self._install(j)

    def _events_before(self, t: float) -> np.ndarray:
        hi = self.pos.copy()
        for j in np.flatnonzero(self.pos < self.end):
            seg = self.s.ts[self.pos[j]:self.end[j]]
            hi[j] = self.pos[j] + np.searchsorted(seg, t, side="left")
        return hi

    def _receive(self, d: dict) -> None:
        """Sub-models from the cloud: each starts downloading at its answer time
        (clients/download.py); the device verifies the checksum of what arrives."""
        refused = np.searchsorted(self.devices, d.get("refused", np.zeros(0, np.int64)))
        self.outstanding[refused] = False  # not served: the device may ask again
        self.acc["not_served"][refused] += 1
        if len(d["device"]) == 0:
            return
        local = np.searchsorted(self.devices, d["device"])
        g, boot, size = d["device"], d["bootstrap"], d["payload_bytes"]
        flats: list[dict] = [dict() for _ in range(len(g))]
        for k in range(self.L):
            if f"rows_{k}" in d:
                for r, row in zip(d[f"rows_{k}"], torch.from_numpy(d[f"flat_{k}"])):
                    flats[r][k] = row

        def intact(i: int, outcome: int, where: float) -> bool:
            rows = [flats[i][k].numpy() for k in sorted(flats[i])]
            if outcome in (faults.CORRUPTED, faults.TRUNCATED):
                received = faults.damage(faults.payload(d["blocks"][i], rows), outcome, where)
                return zlib.crc32(received) == int(d["checksum"][i])
            return faults.checksum(d["blocks"][i], rows) == int(d["checksum"][i])

        # The first model is installed before deployment starts (no transfer simulated).
        arrive, spent = d["answer_time"].astype(float), size.astype(float)
        for i in np.flatnonzero(boot):
            if not intact(i, faults.OK, 0.0):
                arrive[i] = np.inf
        net = np.flatnonzero(~boot)
        dl = download(self.fleet, self.faults, g[net], d["answer_time"][net], size[net], self.downloads[local[net]],
                      intact=lambda i, o, w: intact(net[i], o, w))
        arrive[net], spent[net] = dl.arrive, dl.spent
        self.downloads[local] += 1
        for key, counts in dl.counts.items():
            np.add.at(self.acc[key], local[net], counts)
        bb = self.model.backbone
        flops = cost.inference_flops(bb, []) + d["blocks"] @ self.block_flops
        params = cost.base_params(bb) + d["blocks"] @ self.block_params
        over = (flops > self.sent_budget[local, 0]) | (params > self.sent_budget[local, 1])
        self.acc["budget_violations"][local] += over  # checked by the device, against what it asked
        # A request stays outstanding until its sub-model is installed (`_install`): a device whose
        # model is still on its way does not ask again, so a delivery never replaces another.
        for i, j in enumerate(local):
            self.acc["bytes_down"][j] += spent[i]
            if boot[i]:
                self.acc["bytes_first"][j] += spent[i]
            if arrive[i] == np.inf:  # gave up on this delivery: the device may ask again
                self.outstanding[j] = False
                self.acc["not_served"][j] += 1
                self.acc["downloads_failed"][j] += boot[i]  # (counted by download() otherwise)
                self.acc["bytes_wasted"][j] += spent[i]
                continue
            self.acc["bytes_wasted"][j] += spent[i] - size[i]
            if self.pending[j] is not None:
                raise RuntimeError(f"device {self.devices[j]}: a delivery would replace one not yet installed")
            self.pending_at[j] = arrive[i]
            self.pending[j] = (d["blocks"][i].copy(), flats[i])
            if boot[i]:
                self._install(j)

    def _install(self, j: int) -> None:
        blocks, flats = self.pending[j]
        self.blocks[j], self.weights[j] = blocks, flats
        self.arrived[j] = self.pending_at[j]
        self.has_model[j] = True
        self.outstanding[j] = False
        self.pending_at[j], self.pending[j] = np.inf, None

    # ---- prequential scoring -----------------------------------------------------------
    def _score(self, active, lo, hi):
        """Rank every event's item with the model held at that moment (one causal pass per
        device and model version). Returns per-event arrays over the window's events in
        (device, time) order and a mask of events that could be scored."""
        n_ev = int((hi - lo)[active].sum())
        offset = np.concatenate([[0], np.cumsum((hi - lo)[active])])
        chunk = max(1, self.T // 2)
        jobs = []  # (j, blocks, weights, first event, end event, output position)
        self._no_model = np.zeros(n_ev, dtype=bool)

        def add(j, s0, s1, out):
            if s1 <= s0:
                return
            if not self.has_model[j]:
                self._no_model[out:out + s1 - s0] = True
                return
            for c0 in range(s0, s1, chunk):
                jobs.append((j, self.blocks[j].copy(), self.weights[j], c0, min(s1, c0 + chunk), out + c0 - s0))

        for a, j in enumerate(active):
            split_at = lo[j]
            if self.pending_at[j] < np.inf:
                ts = self.s.ts[lo[j]:hi[j]]
                split_at = lo[j] + int(np.searchsorted(ts, self.pending_at[j], side="left"))
                if split_at < hi[j]:  # the download ends before the window's last event
                    add(j, lo[j], split_at, offset[a])
                    self._install(j)
                else:
                    split_at = lo[j]
            add(j, split_at, hi[j], offset[a] + split_at - lo[j])
        ndcg, hit, ent = np.zeros(n_ev), np.zeros(n_ev), np.zeros(n_ev)
        ctx = np.zeros(n_ev, dtype=bool)
        flops_used, params_used = np.zeros(n_ev), np.zeros(n_ev)
        self._blocks_used = np.zeros((n_ev, self.L), dtype=bool)
        batch = int(self.cfg.sim.batch)
        for b0 in range(0, len(jobs), batch):
            self._score_batch(jobs[b0:b0 + batch], ndcg, hit, ent, ctx, flops_used, params_used)
        self._flops_used, self._params_used = flops_used, params_used
        return ndcg, hit, ent, ctx

    @torch.no_grad()
    def _score_batch(self, jobs, ndcg, hit, ent, ctx, flops_used, params_used):
        bb = self.model.backbone
        seqs, targets = [], []
        for b, (j, blocks, weights, e0, e1, out) in enumerate(jobs):
            g = self.devices[j]
            first = max(self.s.indptr[g], e1 - 1 - self.T)
            seqs.append(self.ids[first:e1 - 1])
            for e in range(e0, e1):
                if e - 1 < first:  # nothing before it: cannot be scored
                    continue
                targets.append((b, e - 1 - first, int(self.s.item[e]), out + e - e0, j, e))
        if not targets:
            return
        seq = left_pad(seqs, self.T)
        T_eff = seq.shape[1]
        pad = [T_eff - len(s) for s in seqs]
        blocks = np.stack([jb[1] for jb in jobs])
        gate = torch.from_numpy(blocks.astype(np.float32))
        params = None
        if not self.shared:
            params = []
            for k, block in enumerate(bb.blocks):
                rows = [jb[2].get(k) if jb[2] is not None else None for jb in jobs]
                if all(r is None for r in rows):
                    params.append(None)
                    continue
                zero = torch.zeros(block.n_params())
                params.append(block.unflatten(torch.stack([r if r is not None else zero for r in rows])))
        gate_arg = None if blocks.all() and self.shared else gate
        hidden = bb(seq, gate=gate_arg, params=params)
        b_idx = torch.tensor([t[0] for t in targets])
        p_idx = torch.tensor([t[1] + pad[t[0]] for t in targets])
        scores = bb.scores(hidden[b_idx, p_idx])
        tgt = torch.tensor([t[2] for t in targets])
        out = np.array([t[3] for t in targets])
        if self.num_candidates:
            rank = self._rank_in_session_candidates(scores, tgt, np.array([t[4] for t in targets]),
                                                    np.array([t[5] for t in targets]))
        else:
            rank = (scores > scores[torch.arange(len(tgt)), tgt].unsqueeze(1)).sum(1).numpy()
        logp = torch.log_softmax(scores, dim=1)
        ent[out] = -(logp.exp() * logp).sum(1).numpy()
        ndcg[out] = np.where(rank < 10, 1.0 / np.log2(rank + 2.0), 0.0)
        hit[out] = rank < 10
        ctx[out] = True
        kept = blocks[np.array([t[0] for t in targets])]
        self._blocks_used[out] = kept
        flops_used[out] = cost.inference_flops(bb, []) + kept @ self.block_flops
        params_used[out] = cost.base_params(bb) + kept @ self.block_params

    def _rank_in_session_candidates(self, scores, tgt, j, e) -> np.ndarray:
        """Rank among the session's cached candidates: at a session's first event the device
        caches the top `num_candidates` items of the model it holds then, and ranks every event
        of the session among them with the model it holds at that event. A target outside the
        cache is a miss. (A device without a cache yet starts one at its next scored event.)"""
        n, C = len(tgt), self.num_candidates
        g = self.devices[j]
        starts = (e == self.s.split[g]) | (self.s.session[e] != self.s.session[np.maximum(e - 1, 0)])
        idx = np.arange(n)
        first_of_device = np.r_[True, j[1:] != j[:-1]]  # a device's targets are consecutive, in time order
        starts |= first_of_device & (self.cand[j, 0] < 0)
        top = torch.topk(scores[torch.from_numpy(np.flatnonzero(starts))], C, dim=1).indices
        slot = np.cumsum(starts) - 1  # the row of `top` of the latest start at or before each target
        device_first = np.maximum.accumulate(np.where(first_of_device, idx, 0))
        latest = np.maximum.accumulate(np.where(starts, idx, -1))
        own = latest >= device_first  # a start of the same device earlier in this batch
        cand = torch.from_numpy(self.cand[j])
        if own.any():
            cand[torch.from_numpy(own)] = top[torch.from_numpy(slot[own])]
        target_score = scores[torch.arange(n), tgt].unsqueeze(1)
        rank = (scores.gather(1, cand) > target_score).sum(1).numpy()
        inside = (cand == tgt.unsqueeze(1)).any(1).numpy()
        s_idx = np.flatnonzero(starts)  # keep each device's latest cache for its later events
        _, from_end = np.unique(j[s_idx][::-1], return_index=True)
        pick = len(s_idx) - 1 - from_end
        self.cand[j[s_idx[pick]]] = top.numpy()[pick]
        return np.where(inside, rank, C)

    # ---- triggers ----------------------------------------------------------------------
    def _trigger_loop(self, active, lo, hi, ndcg, hit, ent, ctx):
        offset = np.concatenate([[0], np.cumsum((hi - lo)[active])])
        req_j, req_t, req_end = [], [], []
        ema = self.ema
        lat, mem = float(self.cfg.devices.latency_s), float(self.cfg.devices.memory_share)
        for k in range(int((hi - lo)[active].max())):
            sel = (hi - lo)[active] > k
            js, out = active[sel], offset[:-1][sel] + k
            e = lo[js] + k
            g = self.devices[js]
            t = self.s.ts[e]
            scored = ctx[out]
            acc = self.acc
            acc["ndcg"][js] += ndcg[out]
            acc["hit"][js] += hit[out]
            acc["scored"][js] += scored
            acc["no_model"][js] += self._no_model[out]
            acc["no_context"][js] += ~scored & ~self._no_model[out]
            acc["flops"][js] += np.where(scored, self._flops_used[out], 0)
            acc["params"][js] += np.where(scored, self._params_used[out], 0)
            self.block_events[js] += scored[:, None] & self._blocks_used[out]
            new_session = self.s.session[e] != self.last_session[js]
            self.last_session[js] = self.s.session[e]
            self.events_since[js] += 1
            self.sessions_since[js] += new_session
            self.interest[js] = (1 - ema) * self.interest[js] + ema * self.emb[self.ids[e]]
            # Moving averages of the prediction signals; a plain mean over the first 1/ema events so
            # that a device's first values are not biased towards zero.
            self.signal_n[js] += scored
            w = np.where(scored, np.maximum(ema, 1.0 / np.maximum(self.signal_n[js], 1)), 0.0)
            self.entropy[js] = (1 - w) * self.entropy[js] + w * ent[out]
            self.hit_rate[js] = (1 - w) * self.hit_rate[js] + w * hit[out]
            max_f, max_p = budgets(self.fleet, g, t, lat, mem)
            acc["over_budget_events"][js] += scored & (self._flops_used[out] > max_f)
            view = DeviceView(device=g, index=js, now=t, events_since_request=self.events_since[js],
                              sessions_since_request=self.sessions_since[js], new_session=new_session,
                              interest=self.interest[js], interest_at_request=self.interest_at_request[js],
                              entropy=self.entropy[js], hit_rate=self.hit_rate[js],
                              bytes_spent=acc["bytes_up"][js] + acc["bytes_down"][js],
                              link_bps=self.fleet.down_bps(g, t), max_flops=max_f, max_params=max_p,
                              model_age_s=t - self.arrived[js], days=t / 86_400.0)
            want = np.asarray(self.trigger.decide(view), dtype=bool) & ~self.outstanding[js]
            if self.static:
                want[:] = False
            online = self.fleet.online(g, t)
            acc["offline_deferred"][js] += want & ~online
            send = want & online
            self.trigger.requested(send, view)
            if send.any():
                sj = js[send]
                self.outstanding[sj] = True
                self.events_since[sj] = 0
                self.sessions_since[sj] = 0
                self.interest_at_request[sj] = self.interest[sj]
                req_j.append(sj)
                req_t.append(t[send])
                req_end.append(e[send] + 1)
        if not req_j:
            return np.zeros(0, dtype=int), np.zeros(0), np.zeros(0, dtype=int)
        return np.concatenate(req_j), np.concatenate(req_t), np.concatenate(req_end)

    # ---- requests ----------------------------------------------------------------------
    @torch.no_grad()
    def _requests(self, js: np.ndarray, t: np.ndarray, ends: np.ndarray, bootstrap: bool = False) -> dict:
        g = self.devices[js]
        recent = [self.ids[max(self.s.indptr[gi], e - self.W):e] for gi, e in zip(g, ends)]
        beta, gate, h = self.model.encode(left_pad(recent, self.W), torch.Generator().manual_seed(int(self.cfg.seed)))
        H = self._h_dim()
        beta_np = beta.numpy() if beta is not None else np.stack([gate.numpy(), 1 - gate.numpy()], -1)
        h_np = h.numpy() if h is not None else np.zeros((len(js), 0), dtype=np.float32)
        max_f, max_p = budgets(self.fleet, g, t, float(self.cfg.devices.latency_s), float(self.cfg.devices.memory_share))
        up_bytes = (beta_np[0].size + h_np.shape[1] + 2) * FLOAT_BYTES
        upload = np.zeros(len(js)) if bootstrap else self.fleet.transfer_time(g, t, up_bytes, uplink=True)
        self.acc["bytes_up"][js] += up_bytes
        if bootstrap:
            self.acc["bytes_first"][js] += up_bytes
        self.acc["requests"][js] += 0 if bootstrap else 1
        self.acc["request_flops"][js] += self._encode_flops(H)
        self.outstanding[js] = True
        self.sent_budget[js, 0], self.sent_budget[js, 1] = max_f, max_p
        return {"device": g.astype(np.int64), "time": np.asarray(t, dtype=float), "ready_time": t + upload, "beta": beta_np.astype(np.float32),
                "h": h_np.astype(np.float32), "max_flops": max_f, "max_params": max_p,
                "bootstrap": np.full(len(js), bootstrap)}

    def _h_dim(self) -> int:
        return self.model.extractor.gru.hidden_size if self.model.extractor is not None else 0

    def _encode_flops(self, hidden: int) -> float:
        d = self.model.backbone.d
        flops = cost.gru_flops(d, self.model.controller.gru.hidden_size, self.W) if self.model.controller else 0
        return flops + (cost.gru_flops(d, hidden, self.W) if hidden else 0)

    def _no_requests(self) -> dict:
        return protocol.empty_requests(self.L, self._h_dim())

    def _model_bytes(self, blocks: np.ndarray) -> np.ndarray:
        bb = self.model.backbone
        return (cost.base_params(bb) + blocks @ self.block_params) * FLOAT_BYTES

    def _round_metrics(self, count, ndcg, hit) -> dict:
        return {"events": float(count.sum()), "scored": float(len(ndcg)), "ndcg_sum": float(ndcg.sum()),
                "hit_sum": float(hit.sum())}

    def device_table(self) -> dict:
        """Per-device totals, for the run's tables (sent with the last round's reply)."""
        out = {"device": self.devices.astype(np.int64)}
        out.update({k: v.copy() for k, v in self.acc.items()})
        out.update({f"block_{k}": self.block_events[:, k].copy() for k in range(self.L)})
        return out
