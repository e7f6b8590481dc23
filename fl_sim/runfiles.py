"""The files one simulation run shares between its cloud and its device shards.

`python -m fl_sim.run` writes them once into RUN/.sim/: the resolved config, the device
streams, the pre-trained model and each device's user vector from its history (which the
cloud computes before deployment: fl_sim.pretrain.history_users); every shard (in-process or
in a Ray worker) and the cloud read them from there. The streams are plain .npy arrays,
memory-mapped read-only: the processes of one machine share one copy of them in the page
cache instead of each holding its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from fl_sim.data.streams import DeviceStreams
from fl_sim.models import checkpoint
from fl_sim.models.factory import build_model
from fl_sim.models.recommender import Recommender


@dataclass
class Streams:
    """Per-device timelines in global arrays: device d's events are indptr[d]:indptr[d+1];
    those from split[d] on are its real-time stream."""

    item: np.ndarray
    ts: np.ndarray
    session: np.ndarray
    indptr: np.ndarray
    split: np.ndarray
    n_items: int

    @property
    def n_devices(self) -> int:
        return len(self.split)


def write(folder: Path, cfg: DictConfig, streams: DeviceStreams, model: Recommender, fingerprint: dict,
          users: np.ndarray, training: dict | None = None) -> None:
    """The run's files; `training`: how the model was pre-trained (kept with it, for a resumed run's summary)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    inter = streams.inter
    arrays = {"item": inter.item, "ts": inter.ts, "session": streams.session, "indptr": inter.indptr,
              "split": streams.split, "n_items": np.array(inter.n_items)}
    for name, a in arrays.items():
        np.save(folder / f"stream_{name}.npy", np.asarray(a))
    np.save(folder / "history_users.npy", np.asarray(users, np.float32))
    checkpoint.save(folder / "model.pt", model, fingerprint,
                    extra={k: v for k, v in (training or {}).items() if k != "cached"})


@lru_cache(maxsize=4)
def load_config(folder: str) -> DictConfig:
    return OmegaConf.load(Path(folder) / "config.yaml")


STREAM_ARRAYS = ("item", "ts", "session", "indptr", "split", "n_items")


@lru_cache(maxsize=4)
def load_streams(folder: str) -> Streams:
    """The streams, memory-mapped (read-only: nothing may write into them)."""
    per_event = ("item", "ts", "session")  # mapped; the others (per device, the catalogue's size) are small
    a = {name: np.load(Path(folder) / f"stream_{name}.npy", mmap_mode="r" if name in per_event else None)
         for name in STREAM_ARRAYS}
    return Streams(item=a["item"], ts=a["ts"], session=a["session"], indptr=a["indptr"], split=a["split"],
                   n_items=int(a["n_items"]))


def load_history_users(folder: str) -> np.ndarray:
    """[n_devices, d] each device's user vector from its history, memory-mapped (read-only)."""
    return np.load(Path(folder) / "history_users.npy", mmap_mode="r")


def load_model(folder: str) -> Recommender:
    cfg = load_config(folder)
    model = build_model(cfg.model, cfg.method, load_streams(folder).n_items)
    ck = torch.load(Path(folder) / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(ck["state_dict"])
    return model.eval()


def load_training(folder: str) -> dict:
    """How the run's model was pre-trained (`write`'s `training`). Memory-mapped: the weights
    themselves are not read (`load_model` does that)."""
    ck = torch.load(Path(folder) / "model.pt", map_location="cpu", weights_only=True, mmap=True)
    return json.loads(ck.get("extra", "{}"))


FILES = ("config.yaml", *(f"stream_{name}.npy" for name in STREAM_ARRAYS), "history_users.npy", "model.pt")


def pack(folder: str) -> dict[str, bytes]:
    """The run's files as bytes, for nodes that do not share this machine's disk (sent through
    Ray's object store)."""
    return {name: (Path(folder) / name).read_bytes() for name in FILES}


def unpack(files: dict[str, bytes], folder: str) -> str:
    """Write packed run files into a node-local folder; returns it."""
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        (path / name).write_bytes(files[name])
    return str(path)
