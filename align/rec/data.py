"""What the recommender trains and evaluates on, read once: the catalogue's ids, the validated
interaction log split in time, the aligned item vectors in catalogue order, and the
(history -> next item) training examples.

Items are integer codes in catalogue order everywhere below; a user's history is their item
codes in time order. Every array of histories is left-padded with -1 to ``history`` columns, so
the newest item is always the last column.

With ``head.fusion: learned`` the item tower fuses the modality vectors itself, so it reads them
all: ``item_features`` lays an item's row out as [M modality vectors of width D (M*D) | M masks |
popularity], the modalities in the embeddings folder's order (recorded in ``items.json``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from align.errors import ConfigError, RunError
from align.index.vectors import ItemEmbeddings, load_item_embeddings
from align.rec.config import RecConfig
from align.rec.interactions import BadRows, Interactions, merge_logs, read_catalogue_ids, read_interactions
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
    # head.fusion learned only (else empty / None): what the head fuses, modalities in this order
    modalities: Tuple[str, ...] = ()
    modality_vectors: Optional[torch.Tensor] = None  # (N, M, D) float32, zero rows where masked out
    modality_masks: Optional[torch.Tensor] = None  # (N, M) bool, the item has that modality

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


def item_features(content: torch.Tensor, counts: np.ndarray, scale: float, popularity: bool,
                  modality_vectors: Optional[torch.Tensor] = None,
                  modality_masks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """What the head's item tower reads: the aligned vector (N, Dc), plus with ``popularity`` a
    last column log(1 + training count) / scale (0 for an item nobody touched): (N, Dc + 1).

    With ``modality_vectors`` (N, M, D) and ``modality_masks`` (N, M) (learned fusion) the
    tower fuses them itself and ``content`` is not read: (N, M*D + M [+ 1])."""
    if modality_vectors is not None:
        if modality_masks is None:
            raise ValueError("modality_vectors need their modality_masks")
        content = torch.cat([modality_vectors.flatten(1), modality_masks.float()], dim=1)  # (N, M*D + M)
    if not popularity:
        return content
    column = torch.from_numpy(np.log1p(counts.astype(np.float64)) / scale).float()[:, None]  # (N, 1)
    return torch.cat([content, column], dim=1)


def stack_modalities(embeddings: ItemEmbeddings, rows: torch.Tensor,
                     order: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(vectors (n, M, D) float32, masks (n, M) bool) of the items at ``rows``, modalities in ``order``."""
    vectors = torch.stack([embeddings.vectors[m][rows].float() for m in order], dim=1)
    masks = torch.stack([embeddings.masks[m][rows].bool() for m in order], dim=1)
    return vectors * masks.unsqueeze(-1), masks  # a masked-out row is zero whatever the file holds


def learned_modalities(embeddings: ItemEmbeddings, folder: str) -> Tuple[str, ...]:
    """The modalities a learned fusion weighs: the folder's, in its order; fewer than two leave
    nothing to weigh (a ``ConfigError`` naming the keys)."""
    names = tuple(embeddings.modalities)
    if len(names) < 2:
        raise ConfigError(f"head.fusion: learned weighs two or more modalities, and data.items ({folder}) holds "
                          f"{', '.join(names) or 'none'}; embed with a multi-modal checkpoint or set head.fusion=given")
    return names


def item_rows(embeddings: ItemEmbeddings, folder: str, item_ids: List[str]) -> torch.Tensor:
    """(N,) the folder's row of each of ``item_ids``; an item the folder lacks is a ``RunError``
    naming a few of them and the fix."""
    row_of = embeddings.row_of()
    missing = [i for i in item_ids if i not in row_of]
    if missing:
        raise RunError(f"{folder}: {len(missing)} catalogue items have no embedding (e.g. {', '.join(missing[:5])}); "
                       f"run `align embed --append` on the manifests that hold them")
    return torch.tensor([row_of[i] for i in item_ids], dtype=torch.long)


def item_content(folder: str, item_ids: List[str], modality: str,
                 embeddings: Optional[ItemEmbeddings] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(content (N, Dc) float32, present (N,) bool) of ``item_ids`` from an ``align embed`` folder;
    an item the folder lacks is a ``RunError`` naming a few of them and the fix."""
    embeddings = embeddings if embeddings is not None else load_item_embeddings(folder)
    if modality not in embeddings.vectors:
        raise RunError(f"{folder}: no {modality!r} vectors (it has {', '.join(sorted(embeddings.vectors))}); "
                       "set head.modality to one of those")
    rows = item_rows(embeddings, folder, item_ids)
    return embeddings.vectors[modality][rows].float(), embeddings.masks[modality][rows].bool()


def load_rec_data(config: RecConfig, events: Optional[str] = None, cutoff: Optional[float] = None) -> RecData:
    """Catalogue ids, the validated log (bad rows counted, over the threshold refused), its split
    and the item vectors, as ``config.data`` names them.

    With ``events`` (a newer log in the same columns), the two logs are merged and split at
    ``cutoff``, the time the head's training stopped: what a head saw trains, the rest tests.
    ``bad`` then counts the rows dropped from ``events``."""
    data = config.data
    embeddings = load_item_embeddings(data.items)  # first: a learned fusion needs >= 2 modalities
    learned = config.head.fusion == "learned"
    modalities = learned_modalities(embeddings, data.items) if learned else ()
    item_ids = read_catalogue_ids(data.catalogue, data.id_column)
    interactions, bad = read_interactions(data.interactions, item_ids, data.columns, data.max_bad_fraction)
    if bad.n_bad:
        log.warning("%s", bad.report())
    if len(interactions) == 0:
        raise RunError(f"{data.interactions}: no usable interactions")
    if events is not None:
        return _with_events(config, embeddings, modalities, item_ids, interactions, events, cutoff)
    if data.split == "temporal":
        split = temporal_split(interactions, data.cutoff, data.test_quantile, data.cold_user_max)
    elif data.split == "none":  # cut just after the newest event: every row trains
        split = temporal_split(interactions, float(np.nextafter(interactions.times.max(), np.inf)),
                               cold_user_max=data.cold_user_max)
    else:
        split = leave_last_out(interactions, data.cold_user_max)
    if len(split.train) == 0 or (len(split.test) == 0 and data.split != "none"):
        raise RunError(f"{data.interactions}: the {data.split} split left {len(split.train)} training and "
                       f"{len(split.test)} test interactions; both must be non-empty (data.cutoff, data.test_quantile; "
                       "data.split=none trains on every row and holds nothing out; `align rec-eval --events NEWER_LOG` "
                       "evaluates a head on the events after its cut-off)")
    return _rec_data(config, embeddings, modalities, item_ids, split, bad)


def _with_events(config: RecConfig, embeddings: ItemEmbeddings, modalities: Tuple[str, ...], item_ids: List[str],
                 old: Interactions, events: str, cutoff: Optional[float]) -> RecData:
    """``load_rec_data`` for a head evaluated on a newer log: both logs merged (a row in both
    counts once), train before ``cutoff`` and test from it."""
    data = config.data
    if cutoff is None:
        raise ConfigError(f"--events: the head was trained with data.split={data.split}, which has no cut-off "
                          "time to tell the events it saw from new ones; evaluate it without --events")
    new, bad = read_interactions(events, item_ids, data.columns, data.max_bad_fraction)
    if bad.n_bad:
        log.warning("%s", bad.report())
    merged, _ = merge_logs(old, new)
    split = temporal_split(merged, cutoff, cold_user_max=data.cold_user_max)
    if len(split.test) == 0:
        newest = float(new.times.max()) if len(new) else float("nan")
        raise RunError(f"{events}: no event at or after the head's cut-off (time {cutoff!r}; the newest here is "
                       f"{newest!r}): nothing the head has not seen to evaluate on")
    return _rec_data(config, embeddings, modalities, item_ids, split, bad)


def _rec_data(config: RecConfig, embeddings: ItemEmbeddings, modalities: Tuple[str, ...], item_ids: List[str],
              split: Split, bad: BadRows) -> RecData:
    """``RecData`` of a split: the item vectors as ``config.head`` reads them."""
    data = config.data
    content, present = item_content(data.items, item_ids, config.head.modality, embeddings)
    vectors = masks = None
    if modalities:
        vectors, masks = stack_modalities(embeddings, item_rows(embeddings, data.items, item_ids), modalities)
    return RecData(item_ids=item_ids, content=content, has_content=present, split=split, bad=bad,
                   modalities=modalities, modality_vectors=vectors, modality_masks=masks)


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
