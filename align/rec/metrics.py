"""Top-K recommendation metrics in numpy, accumulated in float64.

Every function reads ``recommended``, a (U, Kmax) integer array of item indices per user, best
first; -1 pads a list shorter than Kmax. A pad is never a hit and is never counted as a shown
item. A list that names the same item twice is rejected (ValueError): it is a bug upstream, and it
would let recall pass 1 and inflate exposure counts.

Definitions (R_u: user u's relevant set; L_u@K: the first K entries of u's list, pads dropped):

Accuracy, means over users with a non-empty R_u (the others are left out; ``users`` counts them):

- Recall@K = |L_u@K ∩ R_u| / |R_u|. The denominator is |R_u| as in RecBole (``Recall``) and MMRec,
  not min(|R_u|, K): a user with more than K relevant items cannot reach 1.
- NDCG@K, binary relevance: DCG = sum over hit positions i (1-based) of 1 / log2(i + 1); IDCG is
  the same sum over the first min(|R_u|, K) positions. Matches RecBole ``NDCG`` and MMRec.
- Hit@K = 1 if L_u@K ∩ R_u is not empty (RecBole ``Hit``).
- MRR = 1 / (1-based rank of the first hit in the whole Kmax list), 0 without a hit; RecBole's
  ``MRR@Kmax``.

Beyond accuracy (RecBole ``evaluator/metrics.py``; Microsoft recommenders
``recommenders/evaluation/python_evaluation.py``):

- Coverage@k = distinct items in all top-k lists / n_items (RecBole ``ItemCoverage``).
- Tail@k = share of shown top-k slots whose item is long-tail, pooled over all slots. RecBole's
  ``TailPercentage`` averages per user instead; the two agree when no list is padded. The long
  tail is every item outside the floor(head_share * n_items) most popular ones (``long_tail_mask``);
  RecBole instead takes items with a training count <= tail_ratio (tail_ratio > 1) or the least
  popular tail_ratio share of the items seen in training.
- Gini@k = sum_i (2i - n - 1) c_i / (n sum_i c_i) over the exposure counts c_1 <= ... <= c_n of all
  n catalogue items (never shown = 0): RecBole ``GiniIndex``. 0 is equal exposure, (n-1)/n all on
  one item.
- ILD@k = mean over lists of 1 - (mean cosine over unordered pairs of the list's items): Microsoft
  recommenders' ``diversity`` (1 - intra-list similarity) with ``item_feature_vector`` similarity.
- Novelty = mean over shown slots of -log2 p(i), p(i) = item i's share of training interactions:
  Microsoft recommenders' ``novelty`` / ``historical_item_novelty`` (Castells et al., ECIR 2011).
  An item never seen in training (p = 0) gets p = 1 / (N + 1), N = total training interactions:
  rarer than any seen item, finite, and what one more interaction with it would give.

A metric with nothing to average (no counted user, no shown slot, no list of two items) is NaN.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import numpy as np

PAD = -1  # fills a list shorter than Kmax
# ILD gathers (users, k, D) float64 vectors per chunk: at most ILD_CHUNK_USERS users, and fewer
# when k * D is large, so a chunk holds about ILD_CHUNK_ELEMENTS floats (32 MiB).
ILD_CHUNK_USERS = 4096
ILD_CHUNK_ELEMENTS = 1 << 22


def _check_k(k, kmax: int) -> int:
    """``k`` as an int after checking 1 <= k <= Kmax."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"K must be an integer, got {k!r}")
    if not 1 <= k <= kmax:
        raise ValueError(f"K={k} is outside 1..Kmax={kmax} (recommended has {kmax} columns); "
                         f"ask the recommender for at least {k} items per user")
    return int(k)


def _check_lists(recommended, k: Optional[int] = None, n_items: Optional[int] = None) -> np.ndarray:
    """The (U, k) int64 top-k slice of ``recommended`` (all Kmax columns when ``k`` is None), after
    checking its shape, dtype, index range (-1 .. n_items - 1) and that no list repeats an item."""
    recommended = np.asarray(recommended)
    if recommended.ndim != 2:
        raise ValueError(f"recommended must be (U, Kmax) item indices, got shape {recommended.shape}")
    if recommended.size and recommended.dtype.kind not in "iu":
        raise ValueError(f"recommended must hold integer item indices (-1 pads), got dtype {recommended.dtype}")
    if k is not None:
        recommended = recommended[:, :_check_k(k, recommended.shape[1])]
    lists = recommended.astype(np.int64, copy=False)  # (U, k)
    if not lists.size:
        return lists
    bad = lists < PAD
    if n_items is not None:
        bad |= lists >= n_items
    if bad.any():
        row, col = np.argwhere(bad)[0]
        allowed = f"0..{n_items - 1}" if n_items is not None else ">= 0"
        raise ValueError(f"recommended[{row}, {col}] = {lists[row, col]} is not an item index "
                         f"({allowed}) nor the pad {PAD}")
    ordered = np.sort(lists, axis=1)  # (U, k)
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] != PAD)  # (U, k - 1)
    if repeated.any():
        row, col = np.argwhere(repeated)[0]
        raise ValueError(f"recommended row {row} lists item {ordered[row, col]} more than once; "
                         "a top-K list names each item once")
    return lists


def _check_n_items(n_items) -> int:
    """``n_items`` as an int after checking it is a positive integer."""
    if isinstance(n_items, bool) or not isinstance(n_items, (int, np.integer)) or n_items < 1:
        raise ValueError(f"n_items must be a positive integer (the catalogue size), got {n_items!r}")
    return int(n_items)


def ranking_metrics(recommended: np.ndarray, relevant: Sequence[np.ndarray], ks: Sequence[int]) -> Dict[str, float]:
    """Recall@K, NDCG@K and Hit@K for every K in ``ks``, and MRR over the whole list.

    ``recommended`` (U, Kmax) int item indices per user, best first, -1 padding. ``relevant`` holds
    U integer arrays of relevant items (a set: repeats are ignored). Users with no relevant item are
    left out of every mean. Returns ``{"recall@K", "ndcg@K", "hit@K" for each K, "mrr", "users"}``,
    ``users`` being the number of users counted. Definitions in the module docstring.
    """
    lists = _check_lists(recommended)  # (U, Kmax)
    n_users, kmax = lists.shape
    if len(relevant) != n_users:
        raise ValueError(f"relevant has {len(relevant)} entries but recommended has {n_users} rows; "
                         "give one relevant-item array per user, in the same order")
    ks = [_check_k(k, kmax) for k in ks]

    # Relevance as sorted (user, item) keys user * width + item, so one searchsorted over all
    # slots finds the hits instead of a Python loop per user.
    parts = [np.asarray(items).reshape(-1) for items in relevant]
    sizes = np.fromiter((part.size for part in parts), dtype=np.int64, count=n_users)  # (U,)
    nonempty = [part for part in parts if part.size]
    items = np.concatenate(nonempty) if nonempty else np.zeros(0, dtype=np.int64)  # (sum sizes,)
    if items.dtype.kind not in "iu":
        raise ValueError(f"relevant items must be integer item indices, got dtype {items.dtype}")
    items = items.astype(np.int64, copy=False)
    owners = np.repeat(np.arange(n_users, dtype=np.int64), sizes)  # (sum sizes,) user of each item
    if items.size and items.min() < 0:
        first = int(np.argmax(items < 0))
        raise ValueError(f"relevant[{owners[first]}] holds {items[first]}; relevant items are indices >= 0")
    width = int(max(items.max(initial=-1), lists.max(initial=-1))) + 1
    if n_users * width > np.iinfo(np.int64).max:
        raise ValueError(f"{n_users} users x {width} items overflow the int64 (user, item) keys")
    # Sort and drop repeats by hand: np.unique (numpy 2.x hashes first) took 5x longer at 1M keys.
    relevant_keys = np.sort(owners * width + items)  # (sum sizes,)
    first_of_run = np.ones(relevant_keys.size, dtype=bool)
    first_of_run[1:] = relevant_keys[1:] != relevant_keys[:-1]
    relevant_keys = relevant_keys[first_of_run]  # sorted, each (user, item) once
    n_relevant = np.bincount(relevant_keys // width, minlength=n_users)  # (U,) |R_u|

    shown = lists != PAD  # (U, Kmax)
    # A pad's key user * width - 1 is the previous user's item width - 1: masked by ``shown``.
    list_keys = np.arange(n_users, dtype=np.int64)[:, None] * width + lists  # (U, Kmax)
    if relevant_keys.size:
        slot = np.minimum(np.searchsorted(relevant_keys, list_keys), relevant_keys.size - 1)
        hits = (relevant_keys[slot] == list_keys) & shown  # (U, Kmax)
    else:
        hits = np.zeros_like(shown)

    counted = n_relevant > 0
    hits, n_relevant = hits[counted], n_relevant[counted]  # (n, Kmax), (n,)
    n_counted = int(counted.sum())
    if n_counted == 0:
        empty = {f"{name}@{k}": float("nan") for k in ks for name in ("recall", "ndcg", "hit")}
        return {**empty, "mrr": float("nan"), "users": 0}

    discount = 1.0 / np.log2(np.arange(2, kmax + 2, dtype=np.float64))  # (Kmax,) 1/log2(i+1), i = 1..Kmax
    ideal_dcg = np.concatenate([[0.0], np.cumsum(discount)])  # (Kmax + 1,) DCG of m hits on top, m = 0..Kmax
    hit_count = np.cumsum(hits, axis=1, dtype=np.float64)  # (n, Kmax) hits among the first j + 1
    dcg = np.cumsum(hits * discount, axis=1)  # (n, Kmax)
    metrics: Dict[str, float] = {}
    for k in ks:
        metrics[f"recall@{k}"] = float(np.mean(hit_count[:, k - 1] / n_relevant))
        metrics[f"ndcg@{k}"] = float(np.mean(dcg[:, k - 1] / ideal_dcg[np.minimum(n_relevant, k)]))
        metrics[f"hit@{k}"] = float(np.mean(hit_count[:, k - 1] > 0))
    if kmax:
        first_rank = np.argmax(hits, axis=1) + 1.0  # (n,) 1-based rank of the first hit, if any
        reciprocal = np.where(hits.any(axis=1), 1.0 / first_rank, 0.0)
    else:
        reciprocal = np.zeros(n_counted)
    metrics["mrr"] = float(np.mean(reciprocal))
    metrics["users"] = n_counted
    return metrics


def item_coverage(recommended: np.ndarray, n_items: int, k: int) -> float:
    """Share of the ``n_items`` catalogue that appears in at least one top-``k`` list."""
    n_items = _check_n_items(n_items)
    lists = _check_lists(recommended, k, n_items)  # (U, k)
    seen = np.zeros(n_items, dtype=bool)
    seen[lists[lists != PAD]] = True
    return float(np.count_nonzero(seen) / n_items)


def tail_percentage(recommended: np.ndarray, tail: np.ndarray, k: int) -> float:
    """Share of shown top-``k`` slots (pads ignored) whose item is long-tail.

    ``tail`` is a (n_items,) bool mask, e.g. from ``long_tail_mask``. Pooled over all slots, so a
    padded (short) list weighs less than a full one; NaN when no slot is shown.
    """
    tail = np.asarray(tail)
    if tail.ndim != 1 or tail.dtype != np.bool_:
        raise ValueError(f"tail must be a (n_items,) bool mask, got shape {tail.shape} dtype {tail.dtype}")
    lists = _check_lists(recommended, k, tail.size)  # (U, k)
    items = lists[lists != PAD]
    if not items.size:
        return float("nan")
    return float(np.count_nonzero(tail[items]) / items.size)


def long_tail_mask(train_counts: np.ndarray, head_share: float = 0.2) -> np.ndarray:
    """(n_items,) bool: True for the long tail, the items outside the popular head.

    The head is the floor(head_share * n_items) items with the most training interactions; equal
    counts are ranked by item index (the lower index is more popular), so the split is
    deterministic. This is a share-of-items split: RecBole's ``TailPercentage`` instead takes a
    count threshold (items with count <= tail_ratio) or the least popular tail_ratio share of the
    items seen in training. An item never seen in training falls in the head only when the head is
    larger than the number of seen items.
    """
    counts = np.asarray(train_counts)
    if counts.ndim != 1 or counts.dtype.kind not in "iuf":
        raise ValueError(f"train_counts must be (n_items,) numbers, got shape {counts.shape} dtype {counts.dtype}")
    counts = counts.astype(np.float64)
    if counts.size and (not np.all(np.isfinite(counts)) or counts.min() < 0):
        raise ValueError("train_counts must be finite and >= 0 (interactions per item)")
    if not 0.0 <= head_share <= 1.0:
        raise ValueError(f"head_share must be in [0, 1] (share of items in the head), got {head_share}")
    # The small slack keeps shares such as 0.29 * 100 = 28.999999999999996 at 29 items.
    n_head = min(counts.size, math.floor(head_share * counts.size + 1e-9))
    most_popular_first = np.argsort(-counts, kind="stable")  # stable: equal counts keep index order
    mask = np.ones(counts.size, dtype=bool)
    mask[most_popular_first[:n_head]] = False
    return mask


def gini_exposure(recommended: np.ndarray, n_items: int, k: int) -> float:
    """Gini index of how often each of the ``n_items`` catalogue items is shown in the top-``k`` lists.

    Items never shown count with 0: 0 is equal exposure, (n-1)/n everything on one item. RecBole's
    formula over ascending counts c_1..c_n: G = sum_i (2i - n - 1) c_i / (n sum_i c_i). NaN when
    nothing is shown.
    """
    n_items = _check_n_items(n_items)
    lists = _check_lists(recommended, k, n_items)  # (U, k)
    exposure = np.bincount(lists[lists != PAD], minlength=n_items).astype(np.float64)  # (n_items,)
    total = exposure.sum()
    if total == 0:
        return float("nan")
    exposure.sort()
    rank = np.arange(1, n_items + 1, dtype=np.float64)  # (n_items,) i = 1..n
    return float(np.sum((2 * rank - n_items - 1) * exposure) / (n_items * total))


def _inverse_norms(vectors: np.ndarray) -> np.ndarray:
    """(n_items,) float64 1 / |v|, 0 for zero rows; item chunks so a float32 table is never copied
    whole to float64."""
    n_items, dim = vectors.shape
    inverse = np.zeros(n_items, dtype=np.float64)
    step = max(1, ILD_CHUNK_ELEMENTS // max(dim, 1))
    for start in range(0, n_items, step):
        block = vectors[start:start + step].astype(np.float64)  # (c, D)
        norm = np.sqrt(np.einsum("cd,cd->c", block, block))  # (c,)
        inverse[start:start + step] = np.divide(1.0, norm, out=np.zeros_like(norm), where=norm > 0)
    return inverse


def intra_list_diversity(recommended: np.ndarray, item_vectors: np.ndarray, k: int) -> float:
    """ILD@k: mean over lists of 1 - (mean cosine over unordered pairs of the list's items).

    ``item_vectors`` (n_items, D) need not be unit rows: they are normalised here, and a zero row
    has cosine 0 with everything. Lists with fewer than 2 shown items are skipped; NaN when none is
    left. Users go in chunks, so at most about ILD_CHUNK_ELEMENTS float64 values are gathered at once.
    """
    vectors = np.asarray(item_vectors)
    if vectors.ndim != 2 or vectors.dtype.kind not in "iuf":
        raise ValueError(f"item_vectors must be (n_items, D) numbers, got shape {vectors.shape} dtype {vectors.dtype}")
    lists = _check_lists(recommended, k, vectors.shape[0])  # (U, k)
    n_shown = np.count_nonzero(lists != PAD, axis=1)  # (U,)
    keep = n_shown >= 2
    lists, n_shown = lists[keep], n_shown[keep].astype(np.float64)  # (n, k), (n,)
    if not lists.shape[0]:
        return float("nan")
    inverse_norm = _inverse_norms(vectors)  # (n_items,)
    dim = vectors.shape[1]
    step = max(1, min(ILD_CHUNK_USERS, ILD_CHUNK_ELEMENTS // max(k * dim, 1)))
    diversity = np.empty(lists.shape[0], dtype=np.float64)  # (n,)
    for start in range(0, lists.shape[0], step):
        block = lists[start:start + step]  # (c, k)
        shown = block != PAD
        safe = np.where(shown, block, 0)  # pads read item 0, then get weight 0
        unit = vectors[safe].astype(np.float64)  # (c, k, D)
        unit *= (inverse_norm[safe] * shown)[:, :, None]  # unit rows; zero for pads and zero vectors
        # For unit (or zero) rows v_j, the cosines over unordered pairs sum to
        # (|sum_j v_j|^2 - sum_j |v_j|^2) / 2: O(k D) per list instead of the O(k^2 D) Gram matrix.
        summed = unit.sum(axis=1)  # (c, D)
        self_similarity = np.einsum("ckd,ckd->c", unit, unit)  # (c,)
        pair_cosine_sum = (np.einsum("cd,cd->c", summed, summed) - self_similarity) / 2  # (c,)
        m = n_shown[start:start + step]
        diversity[start:start + step] = 1.0 - pair_cosine_sum / (m * (m - 1) / 2)
    return float(np.mean(diversity))


def novelty(recommended: np.ndarray, item_probability: np.ndarray, k: int, *,
            n_interactions: Optional[float] = None) -> float:
    """Mean over shown top-``k`` slots of -log2 p(i), p(i) the item's share of training interactions.

    ``item_probability`` (n_items,) is counts / counts.sum(). A cold item (p = 0) gets
    p = 1 / (n_interactions + 1), n_interactions being the total training interactions; the
    probabilities alone do not carry that total, so recommending a cold item without
    ``n_interactions`` is an error rather than a guess. NaN when no slot is shown.
    """
    probability = np.asarray(item_probability)
    if probability.ndim != 1 or probability.dtype.kind not in "iuf":
        raise ValueError(f"item_probability must be (n_items,) numbers, got shape {probability.shape} "
                         f"dtype {probability.dtype}")
    probability = probability.astype(np.float64)
    if probability.size and (not np.all(np.isfinite(probability)) or probability.min() < 0 or probability.max() > 1):
        raise ValueError("item_probability must lie in [0, 1] (each item's share of training interactions)")
    lists = _check_lists(recommended, k, probability.size)  # (U, k)
    items = lists[lists != PAD]
    if not items.size:
        return float("nan")
    chosen = probability[items]  # (slots,)
    cold = chosen == 0
    if cold.any():
        if n_interactions is None or not n_interactions > 0:
            raise ValueError(f"item {items[cold][0]} is recommended but has probability 0 (never seen in "
                             f"training); pass n_interactions=<total training interactions> (got "
                             f"{n_interactions!r}) so cold items get p = 1 / (n_interactions + 1)")
        chosen = np.where(cold, 1.0 / (n_interactions + 1.0), chosen)
    return float(np.mean(-np.log2(chosen)))


def beyond_accuracy(recommended: np.ndarray, n_items: int, k: int, train_counts: np.ndarray,
                    item_vectors: np.ndarray) -> Dict[str, float]:
    """Coverage, tail share, Gini, ILD at ``k`` and novelty of the top-``k`` lists, in one dict.

    ``train_counts`` (n_items,) training interactions per item give the long tail
    (``long_tail_mask`` with its default head share) and p(i) = count / total for novelty;
    ``item_vectors`` (n_items, D) give ILD. Keys: ``coverage@k``, ``tail@k``, ``gini@k``, ``ild@k``,
    ``novelty``.
    """
    n_items = _check_n_items(n_items)
    counts = np.asarray(train_counts)
    if counts.shape != (n_items,):
        raise ValueError(f"train_counts has shape {counts.shape}, expected ({n_items},): one count per item")
    if np.shape(item_vectors)[:1] != (n_items,):
        raise ValueError(f"item_vectors has shape {np.shape(item_vectors)}, expected ({n_items}, D)")
    tail = long_tail_mask(counts)  # also checks the counts are finite and >= 0
    total = float(counts.sum(dtype=np.float64))
    if total <= 0:
        raise ValueError("train_counts sum to 0: novelty needs at least one training interaction")
    return {
        f"coverage@{k}": item_coverage(recommended, n_items, k),
        f"tail@{k}": tail_percentage(recommended, tail, k),
        f"gini@{k}": gini_exposure(recommended, n_items, k),
        f"ild@{k}": intra_list_diversity(recommended, item_vectors, k),
        "novelty": novelty(recommended, counts / total, k, n_interactions=total),
    }
