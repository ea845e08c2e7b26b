"""What the recommender trains and evaluates on, read once: the catalogue's ids, the validated
interaction log split in time, the aligned item vectors in catalogue order, and the
(history -> next item) training examples.

Items are integer codes in catalogue order everywhere below; a user's history is their item
codes in time order. Every array of histories is left-padded with -1 to ``history`` columns, so
the newest item is always the last column.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
import torch

from align.errors import RunError
from align.index.embed import load_item_embeddings
from align.rec.config import RecConfig
from align.rec.interactions import BadRows, Interactions, read_catalogue_ids, read_interactions
from align.rec.split import Split, leave_last_out, temporal_split, time_order, user_histories

log = logging.getLogger("align.rec")


@dataclass
class RecData:
    """The split log and the item side, aligned by item code."""

    item_ids: List[str]  # catalogue ids; item code = position
    content: torch.Tensor  # (N, Dc) float32 aligned vectors (zero rows for items without the modality)
    has_content: torch.Tensor  # (N,) bool
    split: Split
    bad: BadRows

    @property
    def train_counts(self) -> np.ndarray:
        """(N,) training interactions per item (popularity)."""
        return np.bincount(self.split.train.items, minlength=len(self.item_ids))

    @property
    def id_rows(self) -> torch.Tensor:
        """(N,) int64: the ID-table row of each item, -1 for items without training interactions."""
        warm = torch.from_numpy(self.train_counts > 0)
        return torch.where(warm, torch.arange(len(self.item_ids)), torch.full((len(self.item_ids),), -1))


def popularity_scale(counts: np.ndarray) -> float:
    """The divisor that maps log(1 + training count) into [0, 1] for this training log."""
    return float(np.log1p(max(int(counts.max(initial=0)), 1)))


def item_features(content: torch.Tensor, counts: np.ndarray, scale: float, popularity: bool) -> torch.Tensor:
    """What the head's item tower reads: the aligned vector (N, Dc), plus with ``popularity`` a
    last column log(1 + training count) / scale (0 for an item nobody touched): (N, Dc + 1)."""
    if not popularity:
        return content
    column = torch.from_numpy(np.log1p(counts.astype(np.float64)) / scale).float()[:, None]  # (N, 1)
    return torch.cat([content, column], dim=1)


def item_content(folder: str, item_ids: List[str], modality: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(content (N, Dc) float32, present (N,) bool) of ``item_ids`` from an ``align embed`` folder;
    an item the folder lacks is a ``RunError`` naming a few of them and the fix."""
    embeddings = load_item_embeddings(folder)
    if modality not in embeddings.vectors:
        raise RunError(f"{folder}: no {modality!r} vectors (it has {', '.join(sorted(embeddings.vectors))}); "
                       "set head.modality to one of those")
    row_of = embeddings.row_of()
    missing = [i for i in item_ids if i not in row_of]
    if missing:
        raise RunError(f"{folder}: {len(missing)} catalogue items have no embedding (e.g. {', '.join(missing[:5])}); "
                       f"run `align embed --append` on the manifests that hold them")
    rows = torch.tensor([row_of[i] for i in item_ids], dtype=torch.long)
    return embeddings.vectors[modality][rows].float(), embeddings.masks[modality][rows].bool()


def load_rec_data(config: RecConfig) -> RecData:
    """Catalogue ids, the validated log (bad rows counted, over the threshold refused), its split
    and the item vectors, as ``config.data`` names them."""
    data = config.data
    item_ids = read_catalogue_ids(data.catalogue, data.id_column)
    interactions, bad = read_interactions(data.interactions, item_ids, data.columns, data.max_bad_fraction)
    if bad.n_bad:
        log.warning("%s", bad.report())
    if data.split == "temporal":
        split = temporal_split(interactions, data.cutoff, data.test_quantile, data.cold_user_max)
    else:
        split = leave_last_out(interactions, data.cold_user_max)
    if len(split.train) == 0 or len(split.test) == 0:
        raise RunError(f"{data.interactions}: the {data.split} split left {len(split.train)} training and "
                       f"{len(split.test)} test interactions; both must be non-empty (data.cutoff, data.test_quantile)")
    content, present = item_content(data.items, item_ids, config.head.modality)
    return RecData(item_ids=item_ids, content=content, has_content=present, split=split, bad=bad)


def training_examples(train: Interactions, history: int) -> Tuple[np.ndarray, np.ndarray]:
    """Every training interaction as (the user's previous ``history`` items, this item).

    Returns (histories (E, history) int64 left-padded with -1, targets (E,) int64). The first
    interaction of a user has an empty history: the head learns the "no history" user too.
    """
    order = time_order(train)
    users, items = train.users[order], train.items[order]
    first = np.r_[True, users[1:] != users[:-1]]
    start = np.maximum.accumulate(np.where(first, np.arange(len(users)), 0))  # (E,) first row of the user
    columns = np.arange(len(users))[:, None] - history + np.arange(history)[None, :]  # (E, L) rows before each
    histories = np.where(columns >= start[:, None], items[np.clip(columns, 0, None)], -1)
    return histories.astype(np.int64), items.astype(np.int64)


def last_items(inter: Interactions, history: int) -> np.ndarray:
    """(U, history) int64: each user's newest ``history`` items of ``inter``, left-padded with -1
    (all -1 for a user without interactions)."""
    order = time_order(inter)
    users, items = inter.users[order], inter.items[order]
    out = np.full((len(inter.user_ids), history), -1, dtype=np.int64)
    if len(users) == 0:
        return out
    last = np.r_[users[1:] != users[:-1], True]
    ends = np.flatnonzero(last)  # last row of each user present
    starts = np.r_[0, ends[:-1] + 1]
    columns = ends[:, None] - history + 1 + np.arange(history)[None, :]  # (U', L)
    out[users[ends]] = np.where(columns >= starts[:, None], items[np.clip(columns, 0, None)], -1)
    return out


def seen_items(inter: Interactions) -> List[np.ndarray]:
    """Per user code, the distinct items they interacted with in ``inter``."""
    return [np.unique(items) for items in user_histories(inter)]
