"""A device's inbox: the cloud's answers arrive, download over the device's link as it varies
(clients/download.py), are verified against their checksum, and wait to be installed at the
moment the download ends. A refusal frees the device to ask again.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

from clients.download import download
from clients.replay import install
from clients.state import Devices, Fixed, Model
from fl_sim import faults
from fl_sim.protocol import Deliveries


def receive(fx: Fixed, st: Devices, d: Deliveries) -> None:
    refused = np.searchsorted(fx.devices, d.refused)
    st.outstanding[refused] = False  # not served: the device may ask again
    st.parked[refused] = False
    st.acc["not_served"][refused] += 1
    if len(d) == 0:
        return
    local = np.searchsorted(fx.devices, d.device)
    rows = d.weight_rows()
    size = (d.model_bytes + d.candidate_bytes).astype(float)

    def intact(i: int, outcome: int, where: float) -> bool:
        if outcome in (faults.CORRUPTED, faults.TRUNCATED):
            received = faults.damage(faults.payload(d.blocks[i], rows[i], d.candidates[i]), outcome, where)
            return zlib.crc32(received) == int(d.checksum[i])
        return faults.checksum(d.blocks[i], rows[i], d.candidates[i]) == int(d.checksum[i])

    # The first model is installed before deployment starts (no transfer simulated).
    arrive, spent = d.answer_time.astype(float), size.copy()
    for i in np.flatnonzero(d.first):
        if not intact(i, faults.OK, 0.0):
            arrive[i] = np.inf
    net = np.flatnonzero(~d.first)
    dl = download(fx.fleet, fx.faults, d.device[net], d.answer_time[net], size[net], st.downloads[local[net]],
                  intact=lambda i, o, w: intact(net[i], o, w))
    arrive[net], spent[net] = dl.arrive, dl.spent
    st.downloads[local] += 1
    acc = st.acc
    for key, counts in dl.counts.items():
        np.add.at(acc[key], local[net], counts)
    flops = fx.base_flops + (masked_flops(fx, d) if fx.model.reveals_items else d.blocks @ fx.block_flops)
    params = fx.base_params + d.blocks @ fx.block_params
    if not fx.static:  # checked by the device, against what it asked (one model for all ignores budgets)
        acc["budget_violations"][local] += (flops > st.sent_budget[local, 0]) | (params > st.sent_budget[local, 1])
    acc["answers"][local] += 1
    acc["budget_cut"][local] += d.cut
    acc["kept_blocks_sum"][local] += d.blocks.sum(1)
    acc["answer_flops_sum"][local] += flops
    got = np.isfinite(arrive)
    log = []
    for i, j in enumerate(local):
        st.parked[j] = False
        acc["bytes_down"][j] += spent[i]
        if d.first[i]:
            acc["bytes_first"][j] += spent[i]
        if not got[i]:  # gave up on this delivery: the device may ask again
            st.outstanding[j] = False
            acc["not_served"][j] += 1
            acc["downloads_failed"][j] += d.first[i]  # (counted by download() otherwise)
            acc["bytes_wasted"][j] += spent[i]
            st.local[j] = None
            continue
        acc["bytes_wasted"][j] += spent[i] - size[i]
        st.holds[j] |= d.blocks[i]
        if not d.first[i]:  # after deployment (the first delivery is in bytes_first)
            acc["bytes_model"][j] += d.model_bytes[i]
            acc["bytes_candidates"][j] += d.candidate_bytes[i]
        if st.pending[j] is not None:
            raise RuntimeError(f"device {fx.devices[j]}: a delivery would replace one not yet installed")
        at = arrive[i]
        # Copies: a view would keep the whole batch of deliveries (or Ray's object) alive.
        weights = {k: w.copy() for k, w in zip(np.flatnonzero(d.blocks[i]).tolist(), rows[i])} if rows[i] else None
        if fx.static:  # the one model does not change; finetune's own training may have
            held = st.held[j]
            weights = held.weights if held is not None else None
            if st.local[j] is not None:
                weights, ready = st.local[j]
                at = max(at, ready)
                st.local[j] = None
        st.pending[j] = (Model(blocks=d.blocks[i].copy(), weights=weights, candidates=d.candidates[i].copy(),
                               flops=float(flops[i])), at)
        if d.first[i]:
            install(st, j)
        else:
            log.append((fx.devices[j], d.request_time[i], at))
    if log:
        st.installs.append(np.array(log, dtype=np.float64))



def masked_flops(fx: Fixed, d: Deliveries) -> np.ndarray:
    """DIET: each delivery's block FLOPs under its masks (whole masked rows are not computed)."""
    out = np.zeros(len(d))
    bb, masker = fx.model.backbone, fx.model.mapper
    for k, w in enumerate(d.weights):
        if w is not None and len(w):
            out[np.flatnonzero(d.blocks[:, k])] += masker.flops(bb.blocks[k], k, torch.from_numpy(w), bb.maxlen)
    return out
