"""Building a device's request: the only place a `Requests` message is made.

A request carries what the device may reveal: the structure beta and interest h its on-device
controller and extractor compute from its last `window` items, the user vector of the model it
holds (for the cloud's retrieval), its budget now, and which blocks' shared weights it holds;
never item ids, except for DIET, whose request is those items (counted in `items_revealed`).
Its upload takes the time its link needs at that moment. A device's first request (deployment) is built from its
history, which the cloud already holds: its user vector comes from the cloud's shared model.

For `finetune` the trigger's request also starts the device's own fine-tuning on its last
items, on its own compute (installed with the candidates of that request, when both are ready).
"""

from __future__ import annotations

import numpy as np
import torch

from clients.state import Devices, Fixed
from fl_sim.devices import counter_rng
from fl_sim.devices.budget import device_budgets
from fl_sim.models import cost
from fl_sim.models.finetune import finetune_blocks
from fl_sim.protocol import ID_BYTES, Requests
from fl_sim.training import encode_each, left_pad

FLOAT_BYTES = 4
_NOISE = 210  # counter_rng streams of the upload defence (210: devices, 211: the attacker's training uploads)


@torch.no_grad()
def build(fx: Fixed, st: Devices, rows: np.ndarray, ends: np.ndarray, t: np.ndarray, user: np.ndarray,
          first: bool = False) -> Requests:
    """Requests of devices `rows`, each knowing its items before global index `ends`."""
    model = fx.model
    g = fx.devices[rows]
    W = model.spec.window
    recent = recent_items(fx, g, ends)
    L = model.backbone.n_blocks
    if model.reveals_items:  # DIET: the items themselves (the cloud encodes them); no structure to send
        beta_np, h_np = np.zeros((len(rows), L, 2), np.float32), np.zeros((len(rows), 0), np.float32)
        items = np.zeros((len(rows), W), np.int64)
        n_items = np.array([len(r) for r in recent], np.int64)
        for i, r in enumerate(recent):
            items[i, W - len(r):] = r
        up_bytes = n_items * ID_BYTES + (user.shape[1] + 2) * FLOAT_BYTES + (L + 7) // 8
        if not first:  # (at deployment they come from the history the cloud holds)
            st.acc["items_revealed"][rows] += n_items
    else:
        beta_np, h_np = upload_vectors(model, recent, g, ends, int(fx.cfg.seed))
        h_np = defend(h_np, g, ends, float(fx.cfg.privacy.h_noise), int(fx.cfg.seed))
        items = np.zeros((len(rows), 0), np.int64)
        up_bytes = (L * 2 + h_np.shape[1] + user.shape[1] + 2) * FLOAT_BYTES + (L + 7) // 8  # + holds, 1 bit a block
    max_f, max_p = device_budgets(fx.fleet, fx.cfg.devices, g, t)
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
                    beta=beta_np, h=h_np, user=user.astype(np.float32),
                    max_flops=np.asarray(max_f, float), max_params=np.asarray(max_p, float),
                    first=np.full(len(rows), first), holds=st.holds[rows].copy(), items=items)


def recent_items(fx: Fixed, g: np.ndarray, ends: np.ndarray) -> list:
    """Each device's last `window` items (model ids) before global index `ends`: what its
    controller and extractor read when it asks."""
    W, s = fx.model.spec.window, fx.s
    return [fx.ids[max(s.indptr[gi], e - W):e] for gi, e in zip(g, ends)]


@torch.no_grad()
def upload_vectors(model, recent: list, g: np.ndarray, ends: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(beta [n, L, 2], h [n, H]) a device computes from its recent items (model ids) before
    global index `ends`: what its request uploads before any defence. Fixed structures send
    their gate as log-probabilities; H = 0 without a mapper. The cloud's privacy attack
    (fl_sim.privacy) computes its training uploads here too."""
    beta, gate, h = _encode(model, recent, g, ends, seed)
    if beta is None:
        gate_np = gate.numpy()
        beta_np = np.log(np.clip(np.stack([gate_np, 1 - gate_np], -1), 1e-4, 1.0))
    else:
        beta_np = beta.numpy()
    h_np = h.numpy() if h is not None else np.zeros((len(recent), 0), np.float32)
    return beta_np.astype(np.float32), h_np.astype(np.float32)


def defend(h: np.ndarray, g: np.ndarray, ends: np.ndarray, sigma: float, seed: int, stream: int = 0) -> np.ndarray:
    """h as uploaded under the Gaussian defence (`privacy.h_noise`): plus sigma * N(0, 1) per
    dimension, drawn from counter-based numbers keyed by the device, its position and the
    dimension (the same noise whichever shard or batch sends it). `stream` 1: the attacker's
    own draws, for its training uploads."""
    if sigma <= 0 or h.shape[1] == 0:
        return h
    H = h.shape[1]
    slot = (np.asarray(ends, np.int64)[:, None] * H + np.arange(H)) * 2
    dev = np.asarray(g, np.int64)[:, None]
    u1 = counter_rng.uniform(seed, _NOISE + stream, dev, slot)
    u2 = counter_rng.uniform(seed, _NOISE + stream, dev, slot + 1)
    z = np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)  # Box-Muller; 1 - u1 in (0, 1]
    return (h + sigma * z).astype(np.float32)


def _encode(model, recent: list, g: np.ndarray, ends: np.ndarray, seed: int):
    """(beta, gate, h) on the device. A random structure (random_k) draws from a generator keyed
    by the device and its position, so the draw does not depend on who else asked with it."""
    W = model.spec.window
    if model.controller is None and model.spec.structure == "random_k":
        parts = [model.encode(left_pad([r], W), torch.Generator().manual_seed(seed * 1_000_003
                                                                             + int(gi) * 7919 + int(e)))
                 for r, gi, e in zip(recent, g, ends)]
        beta = None
        gate = torch.cat([p[1] for p in parts])
        h = torch.cat([p[2] for p in parts]) if parts[0][2] is not None else None
        return beta, gate, h
    return encode_each(model, recent)


def _encode_flops(fx: Fixed) -> float:
    model, W, d = fx.model, fx.model.spec.window, fx.model.backbone.d
    flops = cost.gru_flops(d, model.controller.gru.hidden_size, W) if model.controller is not None else 0
    return flops + (cost.gru_flops(d, model.upload_h_dim, W) if model.upload_h_dim else 0)


def first_user_vectors(fx: Fixed, rows: np.ndarray) -> np.ndarray:
    """The cloud's shared model over each device's history (which the cloud holds): computed by
    the cloud before deployment (fl_sim.pretrain.history_users), read from the run's files."""
    return np.asarray(fx.history_users[fx.devices[rows]], np.float32)


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
