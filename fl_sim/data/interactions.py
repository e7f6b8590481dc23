"""The processed interaction log: dense ids, grouped by user, chronological within a user."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd


@dataclass
class Interactions:
    """Rows sorted by (user, time), stable on ties; ids are dense from 0.

    `ts` is unix seconds when `has_timestamps`, otherwise the position in the user's sequence.
    `user_ids[u]` / `item_ids[i]` give the raw ids of dense user u / item i.
    Synthetic data also carries its ground truth: `item_topic` and `shifts`
    (one row per interest shift: device, time, slot, old_topic, new_topic).
    """

    user: np.ndarray
    item: np.ndarray
    ts: np.ndarray
    has_timestamps: bool
    user_ids: np.ndarray
    item_ids: np.ndarray
    item_topic: Optional[np.ndarray] = None
    shifts: Optional[pd.DataFrame] = None
    indptr: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        counts = np.bincount(self.user, minlength=len(self.user_ids))
        self.indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def __len__(self) -> int:
        return len(self.item)

    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)

    def sequence(self, u: int) -> np.ndarray:
        return self.item[self.indptr[u]: self.indptr[u + 1]]

    def counts(self) -> dict:
        return {"users": self.n_users, "items": self.n_items, "interactions": len(self)}
