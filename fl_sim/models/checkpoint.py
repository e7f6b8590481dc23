"""Checkpoints that know what made them: a model from another config or code version is refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from fl_sim import __version__
from fl_sim.errors import FlSimError

FORMAT = 1  # bump when the saved layout or a model's parameters change meaning
_NOT_CONTENT = ("path", "download", "cache", "gap_users")  # where the data lives, not what it is


class CheckpointError(FlSimError):
    pass


def fingerprint(cfg: DictConfig, n_items: int) -> dict:
    dataset = {k: v for k, v in OmegaConf.to_container(cfg.dataset, resolve=True).items() if k not in _NOT_CONTENT}
    method = OmegaConf.to_container(cfg.method, resolve=True)
    if method.get("generate") != "lowrank":
        method.pop("rank", None)  # shapes nothing then; earlier checkpoints stay valid
    method.pop("code", None)  # DIET: how masks travel, not what they are
    return {"format": FORMAT, "version": __version__, "n_items": n_items, "seed": cfg.seed, "dataset": dataset,
            "streams": OmegaConf.to_container(cfg.streams, resolve=True),
            "model": OmegaConf.to_container(cfg.model, resolve=True),
            "method": method,
            "train": {k: v for k, v in OmegaConf.to_container(cfg.train, resolve=True).items() if k != "checkpoint"}}


def digest(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def save(path: Path, model: torch.nn.Module, fp: dict, extra: dict | None = None) -> None:
    tmp = Path(path).with_suffix(".tmp")
    torch.save({"fingerprint": json.dumps(fp, sort_keys=True), "digest": digest(fp),
                "state_dict": model.state_dict(), "extra": json.dumps(extra or {})}, tmp)
    tmp.replace(path)


def load(path: Path, model: torch.nn.Module, fp: dict) -> dict:
    """Load weights into `model` if the checkpoint was made by the same config and code version."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        saved = json.loads(ck["fingerprint"])
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no checkpoint there") from None
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable fl-sim checkpoint ({exc})") from None
    if saved != fp:
        diff = sorted(k for k in set(saved) | set(fp) if saved.get(k) != fp.get(k))
        raise CheckpointError(
            f"{path} was made by another config or code version (differs in: {', '.join(diff)}); "
            "retrain or use the config it was made with")
    model.load_state_dict(ck["state_dict"])
    return json.loads(ck["extra"])
