"""From a raw table to Interactions: rating threshold, iterative k-core, id remapping, ordering."""

from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd

from fl_sim.data.interactions import Interactions
from fl_sim.errors import DataError


def raw_counts(frame: pd.DataFrame) -> dict:
    return {"users": int(frame["user"].nunique()), "items": int(frame["item"].nunique()),
            "interactions": int(len(frame))}


def threshold(frame: pd.DataFrame, min_rating: Optional[float]) -> pd.DataFrame:
    """Keep positive feedback only: rating >= min_rating (None keeps everything)."""
    if min_rating is None:
        return frame
    if "rating" not in frame:
        raise DataError(f"dataset.min_rating={min_rating} is set but this dataset has no ratings")
    kept = frame[frame["rating"].to_numpy() >= min_rating]
    if kept.empty:
        raise DataError(f"the rating threshold dataset.min_rating={min_rating} removed every interaction")
    return kept


def kcore_mask(user: np.ndarray, item: np.ndarray, min_user: int, min_item: int) -> np.ndarray:
    """Rows of the largest sub-log where every user has >= min_user and every item >= min_item rows.

    `user` and `item` must be dense codes. Iterates until nothing changes.
    """
    keep = np.ones(len(user), dtype=bool)
    n_users = int(user.max()) + 1 if len(user) else 0
    n_items = int(item.max()) + 1 if len(item) else 0
    while True:
        u_count = np.bincount(user[keep], minlength=n_users)
        i_count = np.bincount(item[keep], minlength=n_items)
        new_keep = keep & (u_count[user] >= min_user) & (i_count[item] >= min_item)
        if new_keep.sum() == keep.sum():
            return new_keep
        keep = new_keep


def to_interactions(frame: pd.DataFrame, min_user: int = 0, min_item: int = 0) -> Interactions:
    """k-core filter, remap ids densely (in sorted raw-id order), sort by (user, time), stable on ties.

    Row order in `frame` is the file order; it breaks ties between equal timestamps, and it is
    the time order for order-only formats.
    """
    user_raw, user_code = np.unique(frame["user"].to_numpy(), return_inverse=True)
    item_raw, item_code = np.unique(frame["item"].to_numpy(), return_inverse=True)
    keep = kcore_mask(user_code, item_code, min_user, min_item)
    if not keep.any():
        raise DataError(
            f"the k-core filter (dataset.min_user_interactions={min_user}, "
            f"dataset.min_item_interactions={min_item}) removed every interaction"
        )
    has_ts = "ts" in frame
    user_kept, user_code = np.unique(user_code[keep], return_inverse=True)
    item_kept, item_code = np.unique(item_code[keep], return_inverse=True)
    ts = frame["ts"].to_numpy()[keep] if has_ts else np.zeros(int(keep.sum()))
    order = np.lexsort((ts, user_code))  # lexsort is stable: file order breaks ties
    user_code, item_code, ts = user_code[order], item_code[order], ts[order]
    if not has_ts:  # the position in the user's sequence
        starts = np.concatenate([[0], np.flatnonzero(np.diff(user_code)) + 1])
        ts = np.arange(len(user_code)) - np.repeat(starts, np.diff(np.append(starts, len(user_code))))
    return Interactions(
        user=user_code.astype(np.int32), item=item_code.astype(np.int32), ts=ts.astype(np.float64),
        has_timestamps=has_ts, user_ids=user_raw[user_kept], item_ids=item_raw[item_kept],
    )
