"""Prequential scoring: every event ranked, before the device sees it, with the model and the
candidates the device holds at that moment.

A device ranks its cached candidates (or, with `sim.candidates=full`, the whole catalogue) by
the dot product of its model's hidden state with their embeddings; items it interacted with
before the event are left out (the target itself stays); a target outside the candidates is a
miss. The model reads the device's items as SASRec reads a training sequence: each device's
timeline is cut into chunks of `maxlen // 2` events anchored at its first event, and one
causal pass over the chunk's right-aligned sequence (its last `maxlen` items) gives every
event of the chunk its hidden state (the state before the event scores it; the state after it
is the user vector a request sent at that event carries). The chunks depend on the device's
own timeline only, so how the simulation cuts time into rounds changes no score.

A pass computes the hidden states of its whole chunk, future events included; a window reads
only its own events. With a `cache` (one `Context` per device), the rest stays with the device
until a later window of the same chunk under the same model reads it, instead of running the
pass again: the same numbers, computed once per chunk and model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from clients.state import Devices, Fixed
from fl_sim.training import left_pad


@dataclass
class Scored:
    """Per event replayed, grouped by device in the order of `active` (device a's events are
    offset[a]:offset[a+1], in time order). An event's rank (ndcg, hit, entropy) is computed
    when `rank` asks for it: a device that sends a request stops there, and the events after
    it are scored again, with the models it then holds, when it resumes."""

    offset: np.ndarray
    ndcg: np.ndarray
    hit: np.ndarray
    entropy: np.ndarray
    scored: np.ndarray  # bool: ranked (a model was held and something came before the event)
    no_model: np.ndarray  # bool: no model held yet
    flops: np.ndarray  # the held model's FLOPs per inference
    params: np.ndarray
    blocks: np.ndarray  # [n_ev, L] the held model's blocks
    user: np.ndarray  # [n_ev, d] float32 hidden state after the event (zeros without a model)
    switch: np.ndarray  # per active device: events before its pending model is installed (all: none)
    before: np.ndarray  # [n_ev, d] float32 hidden state before the event (what ranks it)
    row: np.ndarray  # the device's row, per event
    event: np.ndarray  # the event's global index
    model: np.ndarray  # object: the held model (its candidates rank the event), per event
    ranked: np.ndarray  # bool: ndcg, hit and entropy computed

    def rank(self, fx: Fixed, idx: np.ndarray, chunk: int = 4096) -> None:
        """Rank events `idx` (output indices) that are scored and not ranked yet, `chunk` at a
        time (each event's candidates' embeddings are gathered while it is ranked: 12.8 kB an
        event at 50 candidates, d=64)."""
        idx = idx[self.scored[idx] & ~self.ranked[idx]]
        for part in np.split(idx, range(chunk, len(idx), chunk)) if len(idx) else []:
            rank, ent = rank_targets(fx, torch.from_numpy(self.before[part]), self.row[part], self.event[part],
                                     [m.candidates for m in self.model[part]])
            self.ndcg[part] = np.where(rank < 10, 1.0 / np.log2(rank + 2.0), 0.0)
            self.hit[part] = rank < 10
            self.entropy[part] = ent
            self.ranked[part] = True


@dataclass
class Context:
    """One device's hidden states over its anchored chunk under one model, from the pass that
    scored events from `c0` on: `hidden[i]` is the state after global event `pos0 + i`, up to
    the chunk's end (`end`, exclusive)."""

    model: object
    c0: int
    pos0: int
    end: int
    hidden: np.ndarray

    def serves(self, model, c0: int, c1: int) -> bool:
        return model is self.model and self.c0 <= c0 and c1 <= self.end


@dataclass
class States:
    """Hidden states of a list of jobs, in one matrix: `flat[base[i] + k]` is the state after
    global event `pos0[i] + k` of job i's device, up to its chunk's end `end[i]` (exclusive)."""

    flat: torch.Tensor
    base: np.ndarray
    pos0: np.ndarray
    end: np.ndarray


def switch_points(fx: Fixed, st: Devices, active: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Per active device, the first event (global index) that its pending model serves; hi if none."""
    out = hi[active].copy()
    for a, j in enumerate(active):
        if st.pending[j] is not None:
            ts = fx.s.ts[lo[j]:hi[j]]
            out[a] = lo[j] + int(np.searchsorted(ts, st.pending[j][1], side="left"))
    return out


def score(fx: Fixed, st: Devices, active: np.ndarray, lo: np.ndarray, hi: np.ndarray,
          cache: dict | None = None, rank: bool = True) -> Scored:
    """Score events lo[j]:hi[j] of each active device j (state is read, not changed). `cache`
    (device row -> Context): chunks already passed are read from it, and what a pass computes
    beyond a window is kept in it. `rank` False: events are ranked when `Scored.rank` asks."""
    L, d = fx.model.backbone.n_blocks, fx.emb.shape[1]
    counts = (hi - lo)[active]
    offset = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n_ev = int(offset[-1])
    out = Scored(offset=offset, ndcg=np.zeros(n_ev), hit=np.zeros(n_ev), entropy=np.zeros(n_ev),
                 scored=np.zeros(n_ev, bool), no_model=np.zeros(n_ev, bool), flops=np.zeros(n_ev),
                 params=np.zeros(n_ev), blocks=np.zeros((n_ev, L), bool), user=np.zeros((n_ev, d), np.float32),
                 switch=switch_points(fx, st, active, lo, hi), before=np.zeros((n_ev, d), np.float32),
                 row=np.zeros(n_ev, np.int64), event=np.zeros(n_ev, np.int64),
                 model=np.empty(n_ev, object), ranked=np.zeros(n_ev, bool))
    groups: dict = {}  # weights kind -> jobs (row, model, first event, end event, output index of first)
    cached: list = []  # jobs whose chunk is in the cache: (row, model, c0, c1, output index, Context)
    for a, j in enumerate(active):
        sp = out.switch[a]
        versions = ((st.held[j], lo[j], sp), (st.pending[j][0] if st.pending[j] is not None else None, sp, hi[j]))
        for model, e0, e1 in versions:
            if e1 <= e0:
                continue
            o = offset[a] + e0 - lo[j]
            if model is None:
                out.no_model[o:o + e1 - e0] = True
                continue
            g = fx.devices[j]
            base = fx.s.indptr[g]
            C = fx.chunk
            for c0 in [e0, *range(base + ((e0 - base) // C + 1) * C, e1, C)]:
                c1 = min(e1, base + ((c0 - base) // C + 1) * C)
                ctx = cache.get(j) if cache is not None else None
                if ctx is not None and ctx.serves(model, c0, c1):
                    cached.append((j, model, c0, c1, o + c0 - e0, ctx))
                    continue
                groups.setdefault(model.weights is None, []).append((j, model, c0, c1, o + c0 - e0))
    batch = int(fx.cfg.sim.batch)
    # Each device keeps the context of its latest job (the one reaching furthest).
    latest: dict = {}
    for j, _, _, c1, *_ in [*cached, *(job for jobs in groups.values() for job in jobs)]:
        latest[j] = max(latest.get(j, c1), c1)
    for jobs in groups.values():
        for part in _batches(fx, jobs, batch):
            states = _pass(fx, part)
            _emit(fx, out, part, states)
            if cache is not None:
                _keep(cache, part, states, latest)
    for b0 in range(0, len(cached), 8 * batch):  # (at most a few MB of states at a time)
        part = cached[b0:b0 + 8 * batch]
        _emit(fx, out, part, _read([ctx for *_, ctx in part]))
    for j, _, _, c1, _, ctx in cached:  # a context read to its chunk's end has nothing more to give
        if c1 == latest[j] and c1 >= ctx.end and cache.get(j) is ctx:
            del cache[j]
    if rank:
        out.rank(fx, np.arange(n_ev))
    return out


def _read(contexts: list) -> States:
    """The states cached contexts hold, as one matrix."""
    n = np.array([len(ctx.hidden) for ctx in contexts])
    return States(torch.from_numpy(np.concatenate([ctx.hidden for ctx in contexts])), np.cumsum(n) - n,
                  np.array([ctx.pos0 for ctx in contexts]), np.array([ctx.end for ctx in contexts]))


def _batches(fx: Fixed, jobs: list, batch: int) -> list[list]:
    """The jobs in batches of at most `batch`, similar lengths together: a
    batch pads every sequence to its longest (padding changes no result, but costs as much as
    items), so a batch also ends where its padding would pass a tenth of its items, plus a few
    hundred positions (measured: a pass of 4 sequences costs about what one of 128 does a
    position)."""
    lengths = np.array([(lambda c: c[1] - c[0])(_context(fx, job[0], job[2])) for job in jobs])
    out, part, items = [], [], 0
    for i in np.argsort(lengths, kind="stable").tolist():
        width = int(lengths[i])  # ascending: the widest so far
        if part and (len(part) == batch or width * (len(part) + 1) > 1.1 * (items + width) + 256):
            out.append(part)
            part, items = [], 0
        part.append(jobs[i])
        items += width
    return out + [part] if part else out


def _keep(cache: dict, jobs: list, states: States, latest: dict) -> None:
    """The context of each passed job that is its device's latest, while events of its chunk
    remain after it: from the state before the job's first event on (a copy, not a view that
    would keep the whole batch's states alive)."""
    for i, (j, model, c0, c1, _) in enumerate(jobs):
        if c1 != latest[j]:
            continue
        pos0, end = int(states.pos0[i]), int(states.end[i])
        if c1 >= end:
            cache.pop(j, None)
            continue
        start = max(pos0, c0 - 1)
        b = int(states.base[i]) + start - pos0
        cache[j] = Context(model, c0, start, end, states.flat[b:b + end - start].numpy().copy())


def _context(fx: Fixed, j: int, c0: int) -> tuple[int, int]:
    """(first, end) global indices of the sequence of the anchored chunk holding event c0."""
    g = fx.devices[j]
    base, end = fx.s.indptr[g], fx.s.indptr[g + 1]
    chunk_end = min(end, base + ((c0 - base) // fx.chunk + 1) * fx.chunk)
    return max(base, chunk_end - fx.model.backbone.maxlen), chunk_end


@torch.no_grad()
def _pass(fx: Fixed, jobs: list) -> States:
    """One causal pass over the jobs' chunks, each with its device's sub-model (a block runs on
    the rows that keep it, in one call: devices of different structures share a pass): the
    hidden states of each job's whole chunk sequence."""
    bb = fx.model.backbone
    T = bb.maxlen
    seqs, firsts = [], []
    for j, _, c0, _, _ in jobs:
        first, chunk_end = _context(fx, j, c0)
        seqs.append(fx.ids[first:chunk_end])
        firsts.append(first)
    seq = left_pad(seqs, T)
    keep = np.stack([m.blocks for _, m, _, _, _ in jobs])
    kept = np.flatnonzero(keep.any(0)).tolist()
    params = None
    if jobs[0][1].weights is not None:
        params = [None] * bb.n_blocks
        mapper = fx.model.mapper
        for k in kept:
            block = bb.blocks[k]
            # (the rows that keep block k, in order)
            stacked = torch.from_numpy(np.stack([m.weights[k] for _, m, _, _, _ in jobs if m.blocks[k]]))
            # The mapper's terms on the shard's one copy of the shared weights, as in offline
            # evaluation (what it does not generate stays one shared matrix for the batch);
            # finetune's own training: whole flat vectors.
            params[k] = mapper.params_from_terms(block, k, stacked) if mapper is not None else block.unflatten(stacked)
    hidden = bb(seq, params=params, blocks=kept, keep=torch.from_numpy(keep))
    width, n = seq.shape[1], np.array([len(q) for q in seqs])
    firsts = np.array(firsts)
    return States(hidden.reshape(-1, hidden.shape[-1]), np.arange(len(jobs)) * width + width - n, firsts, firsts + n)


def _emit(fx: Fixed, out: Scored, jobs: list, states: States) -> None:
    """Write each job's events c0:c1 into `out` (from output index o) from its states: every
    event's user vector (the state after it), and for events with something before them in the
    chunk, the state before it, which ranks it. All jobs at once: one gather per array."""
    j, c0, c1, o = (np.array([job[k] for job in jobs], np.int64) for k in (0, 2, 3, 4))
    models = np.empty(len(jobs), object)
    models[:] = [job[1] for job in jobs]
    blocks = np.stack([m.blocks for m in models])
    n = c1 - c0
    job, k = _spread(n)
    o_all = o[job] + k
    out.user[o_all] = states.flat[torch.from_numpy(states.base[job] + (c0 - states.pos0)[job] + k)].numpy()
    out.blocks[o_all] = blocks[job]
    out.flops[o_all] = np.array([m.flops for m in models])[job]
    out.params[o_all] = fx.base_params + blocks[job] @ fx.block_params
    s0 = np.maximum(c0, states.pos0 + 1)  # events whose previous state is in the chunk
    job, k = _spread(np.maximum(c1 - s0, 0))
    if not len(job):
        return
    o_sc = o[job] + (s0 - c0)[job] + k
    out.before[o_sc] = states.flat[torch.from_numpy(states.base[job] + (s0 - 1 - states.pos0)[job] + k)].numpy()
    out.row[o_sc] = j[job]
    out.event[o_sc] = s0[job] + k
    out.model[o_sc] = models[job]
    out.scored[o_sc] = True


def _spread(n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For counts n: (which count, 0..n-1 within it) of each of the sum(n) items."""
    job = np.repeat(np.arange(len(n)), n)
    return job, np.arange(len(job)) - np.repeat(np.cumsum(n) - n, n)


RANK_GROUP = 16  # events ranked against one gather of their candidates (one device, one model)


def rank_targets(fx: Fixed, h: torch.Tensor, rows: np.ndarray, events: np.ndarray, cand: list) -> tuple:
    """Rank of each event's item among the device's candidates (or the catalogue), items seen
    before the event left out (the target kept); a target outside the candidates ranks last
    (len(candidates): a miss). Also the entropy of the softmax over what is ranked.

    Consecutive events of one device holding the same candidates array share one gather of
    the candidates' embeddings and one search for when the device first saw each of them
    (up to RANK_GROUP events a group): an event then costs a row of a batched product."""
    n_items = fx.s.n_items
    target = fx.s.item[events].astype(np.int64)
    g = fx.devices[rows]
    if fx.n_cand:
        gid, place, first = _runs(rows, cand)
        c_grp = np.stack([cand[i] for i in first])  # [G, N] dataset ids
        e_grp = torch.from_numpy(fx.emb)[torch.from_numpy(c_grp + 1)]  # [G, N, d]
        h_grp = h.new_zeros((len(first), int(place.max()) + 1, h.shape[1]))
        h_grp[torch.from_numpy(gid), torch.from_numpy(place)] = h
        scores = torch.bmm(h_grp, e_grp.transpose(1, 2))[torch.from_numpy(gid), torch.from_numpy(place)]
        key = g[first][:, None] * n_items + c_grp
        at = np.minimum(np.searchsorted(fx.seen_key, key), len(fx.seen_key) - 1)
        seen_at = np.where(fx.seen_key[at] == key, fx.seen_first[at], np.iinfo(np.int64).max)  # [G, N]
        c = c_grp[gid]
        is_target = c == target[:, None]
        seen = (seen_at[gid] < events[:, None]) & ~is_target
        inside = is_target.any(1)
        t_score = (scores * torch.from_numpy(is_target)).sum(1)
        scores = scores.masked_fill(torch.from_numpy(seen), -torch.inf)
        rank = (scores > t_score.unsqueeze(1)).sum(1).numpy()
        rank = np.where(inside, rank, c.shape[1])
    else:
        scores = h @ torch.from_numpy(fx.emb[1:]).T
        lo = np.searchsorted(fx.seen_key, g * n_items)
        hi = np.searchsorted(fx.seen_key, (g + 1) * n_items)
        r = np.repeat(np.arange(len(g)), hi - lo)
        at = np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)]) if len(r) else r
        items = fx.seen_key[at] - g[r] * n_items
        drop = (fx.seen_first[at] < events[r]) & (items != target[r])
        t_score = scores[torch.arange(len(g)), torch.from_numpy(target)]
        scores[torch.from_numpy(r[drop]), torch.from_numpy(items[drop])] = -torch.inf
        rank = (scores > t_score.unsqueeze(1)).sum(1).numpy()
    logp = torch.log_softmax(scores, dim=1)
    p = logp.exp()
    ent = -(p * logp.nan_to_num(0.0, neginf=0.0)).sum(1).numpy()
    return rank, ent


def _runs(rows: np.ndarray, cand: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Events cut into groups: runs of consecutive events of one device with the same
    candidates array, at most RANK_GROUP events each. (each event's group, its place in the
    group, each group's first event)."""
    n = len(rows)
    new = np.ones(n, bool)
    if n > 1:
        new[1:] = (rows[1:] != rows[:-1]) | np.fromiter((a is not b for a, b in zip(cand[1:], cand[:-1])), bool, n - 1)
    run_start = np.maximum.accumulate(np.where(new, np.arange(n), 0))
    new |= (np.arange(n) - run_start) % RANK_GROUP == 0
    first = np.flatnonzero(new)
    gid = np.cumsum(new) - 1
    return gid, np.arange(n) - first[gid], first
