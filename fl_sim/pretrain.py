"""The cloud's model before deployment: trained centrally on the history it holds (never on
the devices' real-time streams), cached by a hash of everything that affects it (the config and
the code that builds the data and trains the model); and what that model makes of each device's
history (its user vector at deployment), cached with it."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from fl_sim.data import DeviceStreams, Interactions
from fl_sim.models import checkpoint
from fl_sim.models.factory import build_model
from fl_sim.models.recommender import Recommender
from fl_sim.training import OfflineData, fit, left_pad, set_reference


def history_only(streams: DeviceStreams) -> Interactions:
    inter = streams.inter
    keep = ~streams.stream_mask
    return Interactions(user=inter.user[keep], item=inter.item[keep], ts=inter.ts[keep],
                        has_timestamps=inter.has_timestamps, user_ids=inter.user_ids, item_ids=inter.item_ids)


@functools.cache
def code_digest() -> str:
    """A digest of the sources that decide the pre-trained model: the data (loading, synthetic
    generation, streams), the models and the training loop. A change to any of them trains
    again rather than serving a model the current code would not make."""
    root = Path(__file__).parent
    files = sorted([root / "training.py", root / "pretrain.py", *(root / "models").glob("*.py"),
                    *(root / "data").glob("*.py")])
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def fingerprint(cfg: DictConfig, n_items: int) -> dict:
    fp = checkpoint.fingerprint(cfg, n_items)
    fp["num_clients"] = cfg.num_clients
    fp["pretrain"] = OmegaConf.to_container(cfg.sim.pretrain, resolve=True)
    fp["code"] = code_digest()
    return fp


def pretrained_path(cfg: DictConfig, streams: DeviceStreams) -> Path:
    """Where the cloud's pre-trained model for this config is cached."""
    digest = checkpoint.digest(fingerprint(cfg, streams.inter.n_items))
    return Path(cfg.cache_dir).expanduser() / "pretrained" / f"{digest}.pt"


def pretrained(cfg: DictConfig, streams: DeviceStreams, progress=None) -> tuple[Recommender, dict, dict]:
    """The trained model, its fingerprint, and how it was trained: {"cached": from the cache,
    "epochs", "best_epoch" (the weights kept), "sequences" (trained on), "stopped" (early_stopping,
    max_sequences, max_epochs or time_limit)}."""
    n_items = streams.inter.n_items
    fp = fingerprint(cfg, n_items)
    path = pretrained_path(cfg, streams)
    torch.manual_seed(cfg.seed)  # the initial weights: torch's own seed differs in every process
    model = build_model(cfg.model, cfg.method, n_items)
    if path.exists():
        try:
            record = checkpoint.load(path, model, fp)
            if model.reveals_items and not model.mapper.has_reference:  # DIET, cached before the reference
                set_reference(model, OfflineData(history_only(streams)))
            return model.eval(), fp, {"cached": True, **record}
        except checkpoint.CheckpointError:
            pass  # stale or damaged: train again
    data = OfflineData(history_only(streams))
    if len(data) == 0:
        raise checkpoint.CheckpointError("no device has 3 or more history events to pre-train on")
    p = cfg.sim.pretrain
    result = fit(model, data, lr=cfg.train.lr, batch=cfg.train.batch, max_epochs=p.max_epochs, patience=p.patience,
                 max_minutes=p.max_minutes, max_sequences=p.max_sequences, seed=cfg.seed,
                 ce_positions=cfg.train.ce_positions, progress=progress)
    record = {"epochs": result.epochs, "best_epoch": result.best_epoch, "stopped": result.stopped,
              "sequences": result.sequences}
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.save(path, model, fp, extra=record)
    return model.eval(), fp, {"cached": False, **record}


@torch.no_grad()
def history_users(model: Recommender, item: np.ndarray, indptr: np.ndarray, split: np.ndarray,
                  batch: int = 128) -> np.ndarray:
    """[n_devices, d] the cloud's shared model over each device's history (its last `maxlen`
    items before the stream; zeros without history): the user vector the cloud retrieves each
    device's first candidates with. The cloud holds the histories, so it computes these before
    deployment, once for the whole fleet; a device's row depends on its own items only."""
    bb = model.backbone
    out = np.zeros((len(split), bb.d), np.float32)
    lengths = np.minimum(split - indptr[:-1], bb.maxlen)
    order = np.argsort(lengths, kind="stable")  # similar lengths together: less padding
    order = order[lengths[order] > 0]
    for b0 in range(0, len(order), batch):
        part = order[b0:b0 + batch]
        seqs = [np.asarray(item[split[g] - k:split[g]], np.int64) + 1 for g, k in zip(part, lengths[part])]
        out[part] = bb(left_pad(seqs, bb.maxlen))[:, -1].numpy()
    return out


def deployment_users(cfg: DictConfig, streams: DeviceStreams, model: Recommender) -> tuple[np.ndarray, bool]:
    """`history_users` for this run's pre-trained model, and whether they came from the cache:
    they are kept next to the cached model, valid while its file is the one they were computed
    from (a digest of its bytes)."""
    path = pretrained_path(cfg, streams)
    users_path = path.with_suffix(".users.npz")
    source = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None
    if source is not None and users_path.exists():
        try:
            with np.load(users_path) as z:
                if str(z["source"]) == source and z["users"].shape == (len(streams.split), model.backbone.d):
                    return z["users"], True
        except Exception:  # damaged: compute again
            pass
    inter = streams.inter
    users = history_users(model, inter.item, inter.indptr, streams.split, int(cfg.sim.batch))
    if source is not None:
        tmp = users_path.with_name(f"{users_path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, users=users, source=np.array(source))
        tmp.replace(users_path)
    return users, False


def stream_times(streams: DeviceStreams) -> np.ndarray:
    return streams.inter.ts[streams.stream_mask]
