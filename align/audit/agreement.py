"""How well each item's modalities agree, which one is wrong when they do not, and which items sit
far from every other product.

**Views.** An item's views are its photo, its sound and its text; when the checkpoint joins several
text columns (title and description), each column is a view of its own (align/audit/vectors.py),
so that a wrong title can be told from a wrong photo. Each view is a unit vector of the model.

**Similarity and rank.** For every pair of views (a, b) and every item having both, the cosine of
its own a and b, and its ranks both ways: ``rank_a_b`` counts the *other products'* b-views that lie
closer to the item's a than its own b (0: its own is the best match). Other products are the items
whose text differs: the demo catalogue has up to 13 renders of one product under identical text,
and those are as right for the item's photo as its own.

**Catalogue-relative scores.** Cosines depend on the checkpoint (one model's matching pairs sit at
0.85, another's at 0.3), so none is compared with a fixed number. Each pair's cosines are turned
into robust z-scores over the catalogue: z = (cos - median) / (1.4826 MAD), the median and MAD of
that pair's cosines over all items; most items are right, so the median is what agreement looks
like in this catalogue with this model, and the MAD how much it varies. A view's disagreement is the
mean of its z-scores against the item's other views: a wrong photo disagrees with the title, the
description and the sound alike, while each of those still agrees with the others.

**Flags.**

* ``mismatch``: the item's lowest view score is at or below ``-mismatch_z`` (default 4.5), counted
  from its look-alikes' median when at least three items share its text and they score low alike
  (median at or below half the threshold): then the model, not the listing, has trouble with that
  product (the demo model with "small green solid circle": all its titles sit at about -4.7), and
  audit.json lists it among the ``blind_spots``. The view with the lowest score is named as the
  wrong one when the item has three views or more; with two views the pair is reported. 4.5 MADs
  lie beyond anything a normal bulk produces (p < 1e-5 one-sided); real tails are heavier: on the
  demo catalogue the correct items' 0.1% quantile is -4.2, while nine in ten planted faults lie
  below -6 (benchmarks/audit_faults.py).
* ``outlier``: an item far from every other product: per modality (photo, text, sound), the cosine
  of its vector to the nearest other product's, as a robust z over the catalogue; the item's score
  is the mean over its modalities, flagged at or below ``-outlier_z`` (default 6; the demo's correct
  items stay above -3.9). Modality by modality, because an item without a photo sits apart from
  the others in any mix of modalities, and only on items whose views agree and whose files could
  be read: a mismatched item is reported as a mismatch.

A MAD below ``MIN_SCALE`` (a catalogue of identical items) is raised to it, so that rounding noise
never becomes a flag.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

MIN_SCALE = 1e-3  # smallest robust scale of a cosine (MAD * 1.4826)
MIN_GROUP = 3  # look-alikes (items of one text) that make a product's own baseline
MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation


@dataclass(frozen=True)
class AgreementThresholds:
    """Catalogue-relative thresholds (module docstring): robust z-scores, not cosines."""

    mismatch_z: float = field(default=4.5, metadata={"help": "mismatch when an item's worst view agrees with its "
                                                             "other views at robust z <= -this"})
    outlier_z: float = field(default=6.0, metadata={"help": "outlier when an item's nearness to other products is at "
                                                            "robust z <= -this"})


@dataclass
class View:
    """One view of the items: (N, D) unit ``vectors`` and the (N,) bool ``mask`` of items having it."""

    vectors: torch.Tensor
    mask: torch.Tensor


@dataclass
class PairStats:
    """Own-pair similarity of two views over the items having both (module docstring).

    Attributes:
        rows: (n,) the items' catalogue rows.
        similarity: (n,) cosine of the item's own a and b.
        rank_ab, rank_ba: (n,) other products' b (a) closer to the item's a (b) than its own.
        z: (n,) robust z-score of ``similarity`` over the n items.
        median, scale: the centre and robust scale the z-scores use.
    """

    rows: np.ndarray
    similarity: np.ndarray
    rank_ab: np.ndarray
    rank_ba: np.ndarray
    z: np.ndarray
    median: float
    scale: float

    def at(self, count: int, values: np.ndarray) -> np.ndarray:
        """``values`` (n,) spread over ``count`` catalogue rows, NaN where the item lacks a view."""
        out = np.full(count, np.nan)
        out[self.rows] = values
        return out


def robust_z(values: np.ndarray) -> Tuple[np.ndarray, float, float]:
    """(z-scores, median, scale): (values - median) / max(1.4826 MAD, MIN_SCALE)."""
    if len(values) == 0:
        return np.zeros(0), float("nan"), float("nan")
    median = float(np.median(values))
    scale = max(MAD_TO_SIGMA * float(np.median(np.abs(values - median))), MIN_SCALE)
    return (values - median) / scale, median, scale


def text_groups(texts: Sequence[Optional[str]]) -> np.ndarray:
    """(N,) int64: items with the same text (case and spacing ignored) share a number; an item
    without text has one of its own."""
    numbers: Dict[str, int] = {}
    out = np.empty(len(texts), dtype=np.int64)
    for row, text in enumerate(texts):
        key = " ".join(text.lower().split()) if text else f"\0{row}"
        out[row] = numbers.setdefault(key, len(numbers))
    return out


def _ranks(queries: torch.Tensor, own: torch.Tensor, keys: torch.Tensor, query_groups: torch.Tensor,
           key_groups: torch.Tensor, chunk: int = 1024) -> np.ndarray:
    """(n,) per query, the keys of other groups closer to it than its ``own`` cosine."""
    counts = []
    for start in range(0, len(queries), chunk):
        cosines = queries[start:start + chunk] @ keys.T  # (c, K)
        other = query_groups[start:start + chunk, None] != key_groups[None, :]  # (c, K)
        counts.append(((cosines > own[start:start + chunk, None]) & other).sum(1))
    return torch.cat(counts).numpy() if counts else np.zeros(0, dtype=np.int64)


def pair_stats(a: View, b: View, groups: np.ndarray) -> PairStats:
    """``PairStats`` of views a and b; ``groups`` (N,) from ``text_groups``."""
    both = (a.mask & b.mask).nonzero().flatten()  # (n,)
    own = (a.vectors[both] * b.vectors[both]).sum(-1)  # (n,)
    group = torch.from_numpy(groups)
    has_a, has_b = a.mask.nonzero().flatten(), b.mask.nonzero().flatten()
    rank_ab = _ranks(a.vectors[both], own, b.vectors[has_b], group[both], group[has_b])
    rank_ba = _ranks(b.vectors[both], own, a.vectors[has_a], group[both], group[has_a])
    similarity = own.double().numpy()
    z, median, scale = robust_z(similarity)
    return PairStats(both.numpy(), similarity, rank_ab, rank_ba, z, median, scale)


@dataclass
class Agreement:
    """Per item: each view's disagreement score, the worst one, and the flags (module docstring).

    Attributes:
        views: the view names, in column order of ``scores``.
        pairs: (a, b) -> ``PairStats``, a before b in ``views``.
        scores: (N, V) mean robust z of the view against the item's other views; NaN without one.
        worst: (N,) the lowest of an item's view scores; NaN with fewer than two views.
        culprit: per item, the view found wrong (None: fewer than three views, or no mismatch).
        mismatch: (N,) bool.
        baseline: (N,) the median worst score of the item's look-alikes (``group_baseline``), what
            its own score is measured from: 0, or below when they all disagree alike.
    """

    views: List[str]
    pairs: Dict[Tuple[str, str], PairStats]
    scores: np.ndarray
    worst: np.ndarray
    culprit: List[Optional[str]]
    mismatch: np.ndarray
    baseline: np.ndarray

    def present(self, row: int) -> List[str]:
        """The views item ``row`` has (and could compare with another)."""
        return [name for name, score in zip(self.views, self.scores[row]) if not np.isnan(score)]


def measure_agreement(views: Dict[str, View], groups: np.ndarray, thresholds: AgreementThresholds) -> Agreement:
    """Score every view of every item against its other views and flag mismatches."""
    names = list(views)
    count = len(groups)
    pairs = {(a, b): pair_stats(views[a], views[b], groups) for i, a in enumerate(names) for b in names[i + 1:]}
    scores = np.full((count, len(names)), np.nan)
    for column, name in enumerate(names):
        against = [stats.at(count, stats.z) for (a, b), stats in pairs.items() if name in (a, b)]
        if against:
            stacked = np.stack(against)  # (V-1, N)
            seen = (~np.isnan(stacked)).sum(0)
            with np.errstate(invalid="ignore"):
                scores[:, column] = np.where(seen > 0, np.nansum(stacked, 0) / np.maximum(seen, 1), np.nan)
    present = ~np.isnan(scores)
    worst = np.where(present.any(1), np.where(present, scores, np.inf).min(1), np.nan)
    worst[present.sum(1) < 2] = np.nan  # one view alone agrees with nothing
    baseline = group_baseline(worst, groups, -thresholds.mismatch_z / 2)
    with np.errstate(invalid="ignore"):
        mismatch = worst - baseline <= -thresholds.mismatch_z
    lowest = np.where(present, scores, np.inf).argmin(1)
    culprit = [names[lowest[row]] if mismatch[row] and present[row].sum() >= 3 else None for row in range(count)]
    return Agreement(names, pairs, scores, worst, culprit, mismatch, baseline)


def group_baseline(worst: np.ndarray, groups: np.ndarray, below: float, min_size: int = MIN_GROUP) -> np.ndarray:
    """(N,) per item, the median ``worst`` of the items sharing its text when at least ``min_size``
    of them have one and that median is at or below ``below``; else 0. (Half the flag's threshold:
    the median of ten chance scores strays by about 0.4, so a shift that large is the product's, and
    a smaller one is left alone rather than excusing the item.)"""
    baseline = np.zeros(len(worst))
    scored = ~np.isnan(worst)
    order = np.argsort(groups, kind="stable")
    bounds = np.flatnonzero(np.diff(groups[order])) + 1
    for members in np.split(order, bounds):
        values = worst[members[scored[members]]]
        if len(values) >= min_size:
            median = float(np.median(values))
            baseline[members] = median if median <= below else 0.0
    return baseline


def nearest_other(vectors: torch.Tensor, mask: torch.Tensor, groups: np.ndarray,
                  chunk: int = 1024) -> Tuple[np.ndarray, np.ndarray]:
    """(cosine, row) of each item's nearest other product (another text group) by ``vectors``;
    NaN / -1 where the item has no vector or no other product has one."""
    rows = mask.nonzero().flatten()
    group = torch.from_numpy(groups)[rows]
    cosine, nearest = np.full(len(groups), np.nan), np.full(len(groups), -1, dtype=np.int64)
    for start in range(0, len(rows), chunk):
        block = vectors[rows[start:start + chunk]] @ vectors[rows].T  # (c, n)
        block[group[start:start + chunk, None] == group[None, :]] = -torch.inf  # itself and its look-alikes
        best, where = block.max(1)
        found = torch.isfinite(best)
        cosine[rows[start:start + chunk][found].numpy()] = best[found].double().numpy()
        nearest[rows[start:start + chunk][found].numpy()] = rows[where[found]].numpy()
    return cosine, nearest


@dataclass
class Isolation:
    """How far each item sits from every other product, per modality (module docstring).

    Attributes:
        modalities: the modalities compared, in column order.
        cosine: (N, M) cosine of the item's vector to the nearest other product's; NaN without one.
        nearest: (N, M) that product's row; -1 without one.
        z: (N, M) robust z of ``cosine`` per modality, over the eligible items; NaN elsewhere.
        score: (N,) mean of the item's z over its modalities; NaN for items not eligible.
        outlier: (N,) bool, score <= -outlier_z.
    """

    modalities: List[str]
    cosine: np.ndarray
    nearest: np.ndarray
    z: np.ndarray
    score: np.ndarray
    outlier: np.ndarray


def isolation(views: Dict[str, View], groups: np.ndarray, eligible: np.ndarray,
              thresholds: AgreementThresholds) -> Isolation:
    """``Isolation`` of the items by each of ``views`` (the item's photo, text and sound vectors),
    the z-scores taken over the ``eligible`` items (whose views agree and whose files could be read)."""
    names = list(views)
    count = len(groups)
    cosine, nearest, z = np.full((count, len(names)), np.nan), np.full((count, len(names)), -1), np.full(
        (count, len(names)), np.nan)
    for column, name in enumerate(names):
        cosine[:, column], nearest[:, column] = nearest_other(views[name].vectors, views[name].mask, groups)
        use = eligible & ~np.isnan(cosine[:, column])
        z[use, column], _, _ = robust_z(cosine[use, column])
    seen = (~np.isnan(z)).sum(1)
    with np.errstate(invalid="ignore"):
        score = np.where(seen > 0, np.nansum(np.nan_to_num(z, nan=0.0), 1) / np.maximum(seen, 1), np.nan)
        return Isolation(names, cosine, nearest, z, score, score <= -thresholds.outlier_z)
