"""Building a device's request: the only place a `Requests` message is made.

A request carries what the device may reveal: the structure beta and interest h its on-device
controller and extractor compute from its last `window` items, the user vector of the model it
holds (for the cloud's retrieval), its budget now, and which blocks' shared weights it holds;
never item ids. Its upload takes the
time its link needs at that moment. A device's first request (deployment) is built from its
history, which the cloud already holds: its user vector comes from the cloud's shared model.

For `finetune` the trigger's request also starts the device's own fine-tuning on its last
items, on its own compute (installed with the candidates of that request, when both are ready).
"""

from __future__ import annotations

import numpy as np
import torch

from clients.state import Devices, Fixed
from fl_sim.devices.budget import device_budgets
from fl_sim.models import cost
from fl_sim.models.finetune import finetune_blocks
from fl_sim.protocol import Requests
from fl_sim.training import left_pad

FLOAT_BYTES = 4


@torch.no_grad()
def build(fx: Fixed, st: Devices, rows: np.ndarray, ends: np.ndarray, t: np.ndarray, user: np.ndarray,
          first: bool = False) -> Requests:
    """Requests of devices `rows`, each knowing its items before global index `ends`."""
    model, s = fx.model, fx.s
    g = fx.devices[rows]
    W = model.spec.window
    recent = [fx.ids[max(s.indptr[gi], e - W):e] for gi, e in zip(g, ends)]
    beta, gate, h = _encode(fx, recent, g, ends)
    L = model.backbone.n_blocks
    beta_np = beta.numpy() if beta is not None else np.log(np.clip(np.stack([gate.numpy(), 1 - gate.numpy()], -1),
                                                                   1e-4, 1.0))
    h_np = h.numpy() if h is not None else np.zeros((len(rows), 0), np.float32)
    max_f, max_p = device_budgets(fx.fleet, fx.cfg.devices, g, t)
    up_bytes = (L * 2 + h_np.shape[1] + user.shape[1] + 2) * FLOAT_BYTES + (L + 7) // 8  # + holds, 1 bit a block
    upload = np.zeros(len(rows)) if first else fx.fleet.transfer_time(g, t, up_bytes, uplink=True)
    acc = st.acc
    acc["bytes_up"][rows] += up_bytes
    if first:
        acc["bytes_first"][rows] += up_bytes
    else:
        acc["requests"][rows] += 1
    acc["request_flops"][rows] += _encode_flops(fx)
    st.outstanding[rows] = True
    st.parked[rows] = True
    st.request_time[rows] = t
    st.sent_budget[rows, 0], st.sent_budget[rows, 1] = max_f, max_p
    if fx.local_training:
        _start_local_training(fx, st, rows, ends, t, first)
    return Requests(device=g.astype(np.int64), time=np.asarray(t, float), ready_time=t + upload,
                    beta=beta_np.astype(np.float32), h=h_np.astype(np.float32), user=user.astype(np.float32),
                    max_flops=np.asarray(max_f, float), max_params=np.asarray(max_p, float),
                    first=np.full(len(rows), first), holds=st.holds[rows].copy())


def _encode(fx: Fixed, recent: list, g: np.ndarray, ends: np.ndarray):
    """(beta, gate, h) on the device. A random structure (random_k) draws from a generator keyed
    by the device and its position, so the draw does not depend on who else asked with it."""
    model, W = fx.model, fx.model.spec.window
    if model.controller is None and model.spec.structure == "random_k":
        parts = [model.encode(left_pad([r], W), torch.Generator().manual_seed(int(fx.cfg.seed) * 1_000_003
                                                                             + int(gi) * 7919 + int(e)))
                 for r, gi, e in zip(recent, g, ends)]
        beta = None
        gate = torch.cat([p[1] for p in parts])
        h = torch.cat([p[2] for p in parts]) if parts[0][2] is not None else None
        return beta, gate, h
    # In chunks: every device asks at deployment, and one pass over all of a shard's devices
    # would hold their controller's and extractor's activations at once.
    chunk = 4096
    parts = [model.encode(left_pad(recent[c:c + chunk], W)) for c in range(0, max(len(recent), 1), chunk)]
    beta, gate, h = (None if parts[0][i] is None else torch.cat([p[i] for p in parts]) for i in range(3))
    return beta, gate, h


def _encode_flops(fx: Fixed) -> float:
    model, W, d = fx.model, fx.model.spec.window, fx.model.backbone.d
    flops = cost.gru_flops(d, model.controller.gru.hidden_size, W) if model.controller is not None else 0
    return flops + (cost.gru_flops(d, model.extractor.gru.hidden_size, W) if model.extractor is not None else 0)


@torch.no_grad()
def first_user_vectors(fx: Fixed, rows: np.ndarray) -> np.ndarray:
    """The cloud's shared model over each device's history (which the cloud holds)."""
    bb, s = fx.model.backbone, fx.s
    g = fx.devices[rows]
    out = np.zeros((len(rows), bb.d), np.float32)
    batch = int(fx.cfg.sim.batch)
    lengths = np.minimum(s.split[g] - s.indptr[g], bb.maxlen)
    order = np.argsort(lengths, kind="stable")  # similar lengths together: less padding
    order = order[lengths[order] > 0]
    for b0 in range(0, len(order), batch):
        part = order[b0:b0 + batch]
        seqs = [fx.ids[s.split[gi] - n:s.split[gi]] for gi, n in zip(g[part], lengths[part])]
        out[part] = bb(left_pad(seqs, bb.maxlen))[:, -1].numpy()
    return out


def _start_local_training(fx: Fixed, st: Devices, rows: np.ndarray, ends: np.ndarray, t: np.ndarray,
                          first: bool) -> None:
    """finetune: each device fine-tunes the cloud's blocks on its own items before `ends`; ready
    when its compute has done the work (at once before deployment)."""
    spec, bb, s = fx.cfg.method, fx.model.backbone, fx.s
    g = fx.devices[rows]
    seqs = [fx.ids[max(s.indptr[gi], e - bb.maxlen - 1):e] for gi, e in zip(g, ends)]
    trainable = np.array([len(q) >= 2 for q in seqs])
    flops = np.array([cost.train_flops(bb, len(q) - 1, int(spec.steps)) if ok else 0.0
                      for q, ok in zip(seqs, trainable)])
    st.acc["train_flops"][rows] += flops
    st.acc["local_updates"][rows] += 0 if first else trainable
    rate = fx.fleet.compute[g] * fx.fleet.free_compute(g, t)
    ready = t if first else t + flops / np.maximum(rate, 1.0)
    chunk = 64
    for c0 in range(0, len(rows), chunk):
        part = np.flatnonzero(trainable[c0:c0 + chunk]) + c0
        if len(part) == 0:
            continue
        with torch.enable_grad():
            flats = finetune_blocks(bb, [seqs[i] for i in part], int(spec.steps), float(spec.lr))
        for r, i in enumerate(part):
            st.local[rows[i]] = ({k: flats[k][r].numpy() for k in range(bb.n_blocks)}, float(ready[i]))
