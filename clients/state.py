"""What a shard of phones is: what it knows and never changes (`Fixed`), and what each of its
devices holds and has counted so far (`Devices`). The steps of a shard's exchange
(clients/inbox.py, scoring.py, replay.py, outbox.py) take these and return what the next
step needs; checkpoints save `Devices` and the trigger.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from omegaconf import DictConfig

from clients.download import COUNTS
from fl_sim import runfiles
from fl_sim.devices import build_fleet
from fl_sim.devices.fleet import Fleet
from fl_sim.faults import Faults
from fl_sim.models import cost
from fl_sim.models.recommender import Recommender
from fl_sim.protocol import candidate_count
from fl_sim.runfiles import Streams

ACCOUNTS = ("events", "scored", "no_context", "no_model", "ndcg", "hit", "flops", "params", "requests",
            "bytes_up", "bytes_down", "bytes_model", "bytes_candidates", "bytes_first", "offline_deferred",
            "budget_violations", "over_budget_events", "request_flops", "train_flops", "local_updates",
            "not_served", "bytes_wasted", "answers", "budget_cut", "kept_blocks_sum", "answer_flops_sum",
            "installs", "waiting", "items_revealed", *COUNTS)


class ModelIds:
    """Model ids of stream events (dataset id + 1), read from the shared streams on demand
    rather than held as a copy of every event."""

    def __init__(self, item: np.ndarray):
        self.item = item

    def __getitem__(self, index) -> np.ndarray:
        return np.asarray(self.item[index], dtype=np.int64) + 1


@dataclass
class Fixed:
    """A shard's fixed knowledge: its devices, their streams and phones, the model's code."""

    cfg: DictConfig
    s: Streams
    model: Recommender
    devices: np.ndarray  # global ids of this shard's devices (rows of every state array)
    fleet: Fleet
    ids: ModelIds  # model ids of stream events (dataset id + 1)
    emb: np.ndarray  # [n_items + 1, d] item embeddings by model id (the device's own items, and candidates)
    n_cand: int  # candidates per answer (0: the whole catalogue)
    block_flops: np.ndarray
    block_params: np.ndarray
    base_flops: float  # an inference with no block (the scores of what the device ranks)
    base_params: float
    seen_key: np.ndarray  # sorted device * n_items + item of every interaction of the shard's devices
    seen_first: np.ndarray  # the global event index of its first occurrence
    faults: Faults
    static: bool  # one model for everyone: requests bring candidates only
    local_training: bool  # finetune: the device trains its own model when its trigger fires
    chunk: int  # events scored per causal pass (anchored at each device's first event)
    history_users: np.ndarray  # [n_devices, d] by global id: the cloud's user vector from each history (mapped)


def load_fixed(run_dir: str, shard: int, n_shards: int) -> Fixed:
    cfg = runfiles.load_config(run_dir)
    s = runfiles.load_streams(run_dir)
    model = runfiles.load_model(run_dir)
    bb = model.backbone
    devices = np.arange(shard, s.n_devices, n_shards)
    n_cand = candidate_count(cfg, s.n_items)
    block_flops, block_params = cost.per_block(bb)
    keys, first = [], []
    for g in devices:
        a, b = s.indptr[g], s.indptr[g + 1]
        k, i = np.unique(s.item[a:b].astype(np.int64), return_index=True)
        keys.append(g * s.n_items + k)
        first.append(a + i)
    key = np.concatenate(keys) if keys else np.zeros(0, np.int64)
    order = np.argsort(key)
    local_training = cfg.method.name == "finetune"
    return Fixed(cfg=cfg, s=s, model=model, devices=devices, fleet=build_fleet(cfg.devices, s.n_devices, cfg.seed),
                 ids=ModelIds(s.item), emb=bb.item_emb.weight.detach().numpy(), n_cand=n_cand,
                 block_flops=block_flops, block_params=block_params,
                 base_flops=float(cost.inference_flops(bb, [], catalogue=n_cand or None)),
                 base_params=float(cost.base_params(bb, n_cand or None)),
                 seen_key=key[order], seen_first=(np.concatenate(first) if first else np.zeros(0, np.int64))[order],
                 faults=Faults.from_cfg(cfg), static=model.mapper is None and model.spec.structure == "all",
                 local_training=local_training, chunk=max(1, bb.maxlen // 2),
                 history_users=runfiles.load_history_users(run_dir))


@dataclass
class Model:
    """One device's model and candidates: kept blocks; per kept block what differs from the
    block's shared weights, which the shard holds once (the mapper's generated terms, or for
    `finetune` the device's own trained flat vector; DIET: its packed masks; None: the shared
    weights); candidate item ids (empty: the whole catalogue)."""

    blocks: np.ndarray
    weights: dict | None
    candidates: np.ndarray
    flops: float = math.nan  # per inference, as the device computed it on receipt (DIET: under its masks)


def pack_models(models: list) -> dict:
    """Models (or None) as a few arrays, for checkpoints: pickling one small object per device
    is what made a checkpoint of many devices slow."""
    have = np.array([m is not None for m in models], bool)
    ms = [m for m in models if m is not None]
    out = {"n": len(models), "have": have, "blocks": np.array([m.blocks for m in ms], bool),
           "shared": np.array([m.weights is None for m in ms], bool),
           "cand_len": np.array([len(m.candidates) for m in ms], np.int64),
           "flops": np.array([m.flops for m in ms], np.float64),
           "candidates": np.concatenate([m.candidates for m in ms]) if ms else np.zeros(0, np.int64), "terms": {}}
    for k in sorted({k for m in ms if m.weights is not None for k in m.weights}):
        rows = [i for i, m in enumerate(ms) if m.weights is not None and k in m.weights]
        out["terms"][k] = (np.array(rows, np.int64), np.stack([ms[i].weights[k] for i in rows]))
    return out


def unpack_models(packed: dict) -> list:
    """The inverse of pack_models (each model with arrays of its own)."""
    n_models = len(packed["shared"])
    weights = [None if shared else {} for shared in packed["shared"]]
    for k, (rows, stacked) in packed["terms"].items():
        for r, w in zip(rows.tolist(), stacked):
            weights[r][k] = w.copy()
    ends = np.cumsum(packed["cand_len"])
    ms = [Model(blocks=packed["blocks"][i].copy(), weights=weights[i],
                candidates=packed["candidates"][ends[i] - packed["cand_len"][i]:ends[i]].copy(),
                flops=float(packed["flops"][i]))
          for i in range(n_models)]
    out: list = [None] * packed["n"]
    for slot, m in zip(np.flatnonzero(packed["have"]).tolist(), ms):
        out[slot] = m
    return out


@dataclass
class Devices:
    """Every device of the shard, one row each."""

    pos: np.ndarray  # next stream event to replay (global index)
    end: np.ndarray  # one past the device's last event
    hi: np.ndarray  # one past its last event in the current window
    parked: np.ndarray  # waiting for the cloud's answer to a request sent in this window
    outstanding: np.ndarray  # a request not yet installed nor refused: the device does not ask again
    held: list  # Model or None, per device
    arrived: np.ndarray  # when the held model was installed
    pending: list  # (Model, install time) of an answer still downloading, or None
    local: list  # finetune: (weights, ready time) of a fine-tuning running on the device, or None
    request_time: np.ndarray  # when the outstanding request was sent
    sent_budget: np.ndarray  # [n, 2] (FLOPs, params) of the last request
    downloads: np.ndarray  # deliveries received so far (keys fault draws)
    events_since: np.ndarray
    sessions_since: np.ndarray
    last_session: np.ndarray
    interest: np.ndarray  # [n, d]
    interest_at_request: np.ndarray
    entropy: np.ndarray
    hit_rate: np.ndarray
    signal_n: np.ndarray
    block_events: np.ndarray  # [n, L] scored events with block k in the model held
    holds: np.ndarray  # [n, L] bool: the block's shared weights have been delivered
    acc: dict = field(default_factory=dict)  # per-device totals, keys ACCOUNTS
    installs: list = field(default_factory=list)  # (device, request time, install time) arrays per receipt

    def __getstate__(self) -> dict:  # checkpoints: models as arrays (pack_models)
        state = dict(self.__dict__)
        state["held"] = pack_models(self.held)
        state["pending"] = (pack_models([p[0] if p is not None else None for p in self.pending]),
                            np.array([p[1] if p is not None else np.nan for p in self.pending]))
        return state

    def __setstate__(self, state: dict) -> None:
        models, at = state["pending"]
        state["held"] = unpack_models(state["held"])
        state["pending"] = [(m, float(t)) if m is not None else None for m, t in zip(unpack_models(models), at)]
        self.__dict__.update(state)

    @classmethod
    def new(cls, fx: Fixed) -> "Devices":
        n, L, d = len(fx.devices), fx.model.backbone.n_blocks, fx.emb.shape[1]
        start = fx.s.split[fx.devices].copy()
        return cls(pos=start, end=fx.s.indptr[fx.devices + 1].copy(), hi=start.copy(), parked=np.zeros(n, bool),
                   outstanding=np.zeros(n, bool), held=[None] * n, arrived=np.zeros(n), pending=[None] * n,
                   local=[None] * n, request_time=np.zeros(n), sent_budget=np.full((n, 2), np.inf),
                   downloads=np.zeros(n, np.int64), events_since=np.zeros(n), sessions_since=np.zeros(n),
                   last_session=np.full(n, -1), interest=np.zeros((n, d)), interest_at_request=np.zeros((n, d)),
                   entropy=np.zeros(n), hit_rate=np.zeros(n), signal_n=np.zeros(n), block_events=np.zeros((n, L)),
                   holds=np.zeros((n, L), bool),
                   acc={k: np.zeros(n) for k in ACCOUNTS})
