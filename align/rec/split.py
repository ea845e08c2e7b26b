"""Train/test splits of an interaction log that never let the test leak into training.

* ``temporal_split``: everything before a cutoff time trains, everything at or after it tests:
  the honest split for a shop (the model is judged on the future, new items and new users
  included). ``cold_items`` / ``cold_users`` mark who the training part barely knows, so metrics
  can be reported separately for them.
* ``leave_last_out``: each user's last interaction tests, the rest trains: the classic
  next-item protocol (it mixes time periods across users, so prefer the temporal split when
  the log has real times).

Both keep the id lists of the input, so codes mean the same in train, test and the catalogue.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from align.rec.interactions import Interactions


@dataclass
class Split:
    """A train/test split of one log.

    Attributes:
        train, test: the two parts (same ``user_ids`` / ``item_ids`` as the input).
        cold_items: (n_items,) bool, items with no training interaction.
        cold_users: (n_users,) bool, users with at most ``cold_user_max`` training interactions.
        cutoff: the time boundary of a temporal split (train < cutoff <= test); None otherwise.
    """

    train: Interactions
    test: Interactions
    cold_items: np.ndarray
    cold_users: np.ndarray
    cutoff: Optional[float]


def _split(inter: Interactions, test_mask: np.ndarray, cold_user_max: int, cutoff: Optional[float]) -> Split:
    """Rows where ``test_mask`` holds test, the others train; cold items/users from the train part."""
    train = inter.subset(~test_mask)
    return Split(
        train=train, test=inter.subset(test_mask),
        cold_items=np.bincount(train.items, minlength=inter.n_items) == 0,
        cold_users=np.bincount(train.users, minlength=inter.n_users) <= cold_user_max,
        cutoff=cutoff,
    )


def temporal_split(inter: Interactions, cutoff: Optional[float] = None, test_quantile: float = 0.2,
                   cold_user_max: int = 2) -> Split:
    """Train = rows with ``times < cutoff``, test = rows with ``times >= cutoff``.

    ``cutoff`` defaults to the ``1 - test_quantile`` quantile of the times (so about
    ``test_quantile`` of the rows test; fewer when many rows share the cutoff time).
    """
    if cutoff is None:
        if not 0.0 < test_quantile < 1.0:
            raise ValueError(f"temporal_split: test_quantile = {test_quantile} must be in (0, 1)")
        if len(inter) == 0:
            raise ValueError("temporal_split: the log is empty; give a cutoff or a non-empty log")
        cutoff = float(np.quantile(inter.times, 1.0 - test_quantile))
    return _split(inter, inter.times >= cutoff, cold_user_max, float(cutoff))


def time_order(inter: Interactions) -> np.ndarray:
    """Row indices sorted by user, then time, then row order (a stable tie-break)."""
    return np.lexsort((np.arange(len(inter)), inter.times, inter.users))


def leave_last_out(inter: Interactions, cold_user_max: int = 2) -> Split:
    """Each user's last interaction (by time; of equal times, the later row) tests, the rest
    trains. A user with one interaction keeps it in test and has an empty training history
    (and so counts as a cold user)."""
    order = time_order(inter)
    users = inter.users[order]
    last = np.r_[users[1:] != users[:-1], True] if len(order) else np.zeros(0, dtype=bool)
    test_mask = np.zeros(len(inter), dtype=bool)
    test_mask[order[last]] = True
    return _split(inter, test_mask, cold_user_max, None)


def user_histories(inter: Interactions) -> List[np.ndarray]:
    """Item codes of every user (index = user code, ``len(user_ids)`` entries, empty for users
    without rows), in time order; equal times keep row order."""
    order = time_order(inter)
    counts = np.bincount(inter.users, minlength=inter.n_users)
    return np.split(inter.items[order], np.cumsum(counts)[:-1])
