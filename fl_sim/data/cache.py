"""A cache of processed datasets, keyed by the input file's content and the options."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

from fl_sim.data.interactions import Interactions

CACHE_VERSION = 1  # bump when processing changes what a cached file holds


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def cache_key(path: Path, options: dict) -> str:
    payload = json.dumps({"file": file_digest(path), "options": options, "v": CACHE_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def load(cache_dir: Path, key: str) -> Optional[tuple[Interactions, dict]]:
    path = Path(cache_dir).expanduser() / "processed" / f"{key}.npz"
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            inter = Interactions(user=z["user"], item=z["item"], ts=z["ts"], has_timestamps=meta["has_timestamps"],
                                 user_ids=z["user_ids"], item_ids=z["item_ids"])
    except Exception:  # an unreadable cache entry is recomputed, never trusted
        return None
    return inter, meta["raw"]


def store(cache_dir: Path, key: str, inter: Interactions, raw: dict) -> None:
    folder = Path(cache_dir).expanduser() / "processed"
    folder.mkdir(parents=True, exist_ok=True)
    meta = json.dumps({"has_timestamps": inter.has_timestamps, "raw": raw})
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".npz.tmp")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, user=inter.user, item=inter.item, ts=inter.ts, user_ids=inter.user_ids,
                 item_ids=inter.item_ids, meta=np.array(meta))
    os.replace(tmp, folder / f"{key}.npz")
