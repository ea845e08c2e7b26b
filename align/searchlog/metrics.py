"""Graded ranking metrics for search-log evaluation: nDCG@K, ERR@K, RBP, MRR and Recall@K.

Inputs
------
- ``lists``: (Q, L) integer item indices per query, best first; -1 pads a list that ended early
  (the ranking had fewer than L items). A pad is never relevant. A list that names an item twice
  is rejected: it is a bug upstream and would let a relevant item count twice. ``rank_by_score``
  and ``rank_by_similarity`` make such lists from scores. L is the evaluation depth of MRR and
  RBP; the @K metrics read the first K columns (K <= L).
- ``GradedRelevance``: sparse (query, item, grade) judgements, grade >= 0. An item without a
  judgement has grade 0; grade 0 means not relevant; "relevant" is grade > 0. Only judgements are
  stored (no dense Q x N matrix), so 10^4 queries over 10^5 items cost memory in the judgements.
- ``max_grade``: g_max, the top of the grading scale (3 for view 1 / cart 2 / buy 3), a property
  of the scale, not of the data: a split where nobody bought would otherwise be judged on a
  different scale. Every grade must be <= g_max.

Tie rule of the rankers: equal scores are ordered by item index, the lower index first (a stable
descending sort). A NaN score is an error.

Definitions (g_r: grade of the item at 1-based rank r of a query's list; R: its relevant set)
------------------------------------------------------------------------------------------------
- nDCG@K = DCG@K / IDCG@K, DCG@K = sum_{r=1..K} (2^{g_r} - 1) / log2(r + 1). The exponential gain
  is Burges et al. (ICML 2005), used by the Yahoo! Learning to Rank Challenge (Chapelle & Chang,
  2011): a bought item (3 -> 7) outweighs a viewed one (1 -> 1) by more than their grades say.
  IDCG@K is the DCG of the query's own best ordering of ALL its judged items (grades descending),
  truncated at K: a query with fewer relevant items than K can still reach 1. This is trec_eval's
  ``ndcg_cut`` ideal (its discount is the same log2(r + 1); its gain is the grade itself, linear)
  and, for grades 0/1, RecBole's and MMRec's NDCG (IDCG over min(|R|, K) ranks), which
  ``align.rec.metrics`` also follows; the tests check the binary case against it.
- ERR@K (Chapelle, Metzler, Zhang & Grinspan, CIKM 2009, "Expected reciprocal rank for graded
  relevance"): R_r = (2^{g_r} - 1) / 2^{g_max}, the chance the user is satisfied at rank r;
  ERR@K = sum_{r=1..K} (1/r) R_r prod_{i<r} (1 - R_i).
- RBP (Moffat & Zobel, ACM TOIS 2008, "Rank-biased precision for measurement of retrieval
  effectiveness") with persistence p (default 0.9), graded as in their paper's extension:
  RBP = (1 - p) sum_{r=1..L} (g_r / g_max) p^{r-1}, over the whole list depth L.
  Residual = p^L: the most that ranks below L could still add (each adds at most (1 - p) p^{r-1});
  unjudged items inside the list count as grade 0 and add nothing to it. For a padded list (the
  ranking ended early) p^L is an upper bound.
- MRR: 1 / (rank of the first item with grade > 0) within the list (depth L), 0 if none is listed.
- Recall@K = |{r <= K : g_r > 0}| / |R|. The denominator is |R| (RecBole ``Recall``, MMRec), not
  min(|R|, K): a query with more than K relevant items cannot reach 1.

Queries without a relevant item (no judgement with grade > 0) make nDCG and Recall 0/0 and every
other metric 0 whatever the ranking, so ``graded_report`` leaves them out of EVERY mean (all means
are over the same queries) and counts them in ``n_without_relevant``. The per-query functions
return NaN for them where the value is 0/0 (nDCG, Recall), and their plain value otherwise.
All arithmetic is float64 on the CPU; a mean over no query is NaN.
"""
from __future__ import annotations

from typing import Dict, Mapping, Sequence, Tuple, Union

import numpy as np
import torch

PAD = -1  # fills a list that ended before L items
# rank_by_score / rank_by_similarity take as many query rows at once as keep about this many
# scores in a chunk (64 MiB of float32; the tie fix-up may add as many int32).
RANK_CHUNK_ELEMENTS = 1 << 24

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence]


def _as_index_tensor(values: ArrayLike, name: str) -> torch.Tensor:
    """``values`` as a CPU int64 tensor after checking it holds integers."""
    tensor = torch.as_tensor(values).cpu()
    if tensor.numel() and (tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool):
        raise ValueError(f"{name} must hold integer indices, got dtype {tensor.dtype}")
    return tensor.to(torch.int64)


class GradedRelevance:
    """Graded judgements of ``n_queries`` queries: (query, item, grade) triples, grade >= 0.

    Stored sorted by (query, item), each pair once; unjudged items have grade 0. Build with
    ``from_triples`` (vectorised, for whole logs) or ``from_dicts`` (one {item: grade} per query);
    ``select`` keeps some queries (a split, a query modality) renumbered in the given order.
    """

    def __init__(self, query: ArrayLike, item: ArrayLike, grade: ArrayLike, n_queries: int):
        if isinstance(n_queries, bool) or not isinstance(n_queries, (int, np.integer)) or n_queries < 0:
            raise ValueError(f"n_queries must be an integer >= 0, got {n_queries!r}")
        query = _as_index_tensor(query, "query").reshape(-1)
        item = _as_index_tensor(item, "item").reshape(-1)
        grade = torch.as_tensor(grade).cpu().reshape(-1)
        if not (query.numel() == item.numel() == grade.numel()):
            raise ValueError(f"query, item and grade must have one entry per judgement, got "
                             f"{query.numel()}, {item.numel()} and {grade.numel()}")
        if grade.dtype == torch.bool or grade.dtype.is_complex:
            raise ValueError(f"grades must be numbers, got dtype {grade.dtype}")
        grade = grade.to(torch.float64)
        if query.numel():
            bad = (query < 0) | (query >= n_queries)
            if bad.any():
                at = int(bad.nonzero()[0])
                raise ValueError(f"judgement {at} names query {int(query[at])}, outside 0..{n_queries - 1}")
            if (item < 0).any():
                at = int((item < 0).nonzero()[0])
                raise ValueError(f"judgement {at} (query {int(query[at])}) names item {int(item[at])}; "
                                 "items are indices >= 0")
            bad = ~torch.isfinite(grade) | (grade < 0)
            if bad.any():
                at = int(bad.nonzero()[0])
                raise ValueError(f"judgement {at} (query {int(query[at])}, item {int(item[at])}) has grade "
                                 f"{float(grade[at])}; grades are finite numbers >= 0 (0 = not relevant)")
        # Sort by (query, item): item first, then a stable sort by query.
        order = torch.sort(item, stable=True).indices
        order = order[torch.sort(query[order], stable=True).indices]
        query, item, grade = query[order], item[order], grade[order]
        repeated = (query[1:] == query[:-1]) & (item[1:] == item[:-1])
        if repeated.any():
            at = int(repeated.nonzero()[0])
            raise ValueError(f"query {int(query[at])} judges item {int(item[at])} more than once; keep one "
                             "grade per (query, item) pair (e.g. the strongest event) before evaluating")
        self.query = query  # (J,) int64, ascending
        self.item = item  # (J,) int64, ascending within a query
        self.grade = grade  # (J,) float64
        self.n_queries = int(n_queries)
        counts = torch.bincount(query, minlength=self.n_queries)  # (Q,)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)])  # (Q + 1,)
        self.n_relevant = torch.bincount(query[grade > 0], minlength=self.n_queries)  # (Q,) |R| per query

    @classmethod
    def from_triples(cls, query: ArrayLike, item: ArrayLike, grade: ArrayLike, n_queries: int) -> "GradedRelevance":
        """Judgements from parallel (J,) arrays of query index, item index and grade."""
        return cls(query, item, grade, n_queries)

    @classmethod
    def from_dicts(cls, judgements: Sequence[Mapping[int, float]]) -> "GradedRelevance":
        """Judgements from one {item index: grade} mapping per query (an empty one is allowed)."""
        sizes = [len(judged) for judged in judgements]
        query = np.repeat(np.arange(len(judgements), dtype=np.int64), sizes)
        item = np.fromiter((i for judged in judgements for i in judged), dtype=np.int64, count=sum(sizes))
        grade = np.fromiter((g for judged in judgements for g in judged.values()), dtype=np.float64,
                            count=sum(sizes))
        return cls(query, item, grade, len(judgements))

    def select(self, queries: ArrayLike) -> "GradedRelevance":
        """The judgements of ``queries`` (indices, each once), renumbered 0.. in that order: the
        rows of ``lists[queries]``."""
        queries = _as_index_tensor(queries, "queries").reshape(-1)
        if queries.numel() and ((queries < 0) | (queries >= self.n_queries)).any():
            raise ValueError(f"queries must be indices in 0..{self.n_queries - 1}, got "
                             f"{int(queries.min())}..{int(queries.max())}")
        position = torch.full((self.n_queries,), -1, dtype=torch.int64)
        position[queries] = torch.arange(queries.numel())
        if int((position >= 0).sum()) != queries.numel():
            raise ValueError("queries names a query more than once; select each query once")
        new_query = position[self.query]  # (J,) -1 for dropped queries
        keep = new_query >= 0
        return GradedRelevance(new_query[keep], self.item[keep], self.grade[keep], queries.numel())

    def max_item(self) -> int:
        """The largest judged item index, -1 without judgements."""
        return int(self.item.max()) if self.item.numel() else -1

    def ideal_dcg(self, k: int) -> torch.Tensor:
        """(Q,) float64 IDCG@k: DCG of each query's judged grades sorted descending, cut at k."""
        order = torch.sort(self.grade, descending=True, stable=True).indices
        order = order[torch.sort(self.query[order], stable=True).indices]  # by query, grade descending
        query, grade = self.query[order], self.grade[order]  # (J,)
        position = torch.arange(query.numel()) - self.offsets[query]  # (J,) 0-based place in its query's ideal list
        keep = position < k
        gains = (torch.exp2(grade[keep]) - 1.0) * _discount(k)[position[keep]]
        return torch.zeros(self.n_queries, dtype=torch.float64).index_add_(0, query[keep], gains)


def _discount(length: int) -> torch.Tensor:
    """(length,) float64 1 / log2(r + 1) for 1-based ranks r = 1..length."""
    return 1.0 / torch.log2(torch.arange(2, length + 2, dtype=torch.float64))


def _check_k(k: int, depth: int) -> int:
    """``k`` as an int after checking 1 <= k <= depth (the lists' columns)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"K must be an integer, got {k!r}")
    if not 1 <= k <= depth:
        raise ValueError(f"K={k} is outside 1..{depth} (the lists have {depth} columns); rank to a depth "
                         f"of at least {k}")
    return int(k)


def _check_lists(lists: ArrayLike) -> torch.Tensor:
    """(Q, L) CPU int64 lists after checking shape, values (>= -1) and that no row repeats an item."""
    lists = _as_index_tensor(lists, "lists")
    if lists.ndim != 2:
        raise ValueError(f"lists must be (Q, L) item indices per query, got shape {tuple(lists.shape)}")
    if not lists.numel():
        return lists
    if (lists < PAD).any():
        row, col = (lists < PAD).nonzero()[0].tolist()
        raise ValueError(f"lists[{row}, {col}] = {int(lists[row, col])} is neither an item index (>= 0) "
                         f"nor the pad {PAD}")
    ordered = torch.sort(lists, dim=1).values  # (Q, L)
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] != PAD)  # (Q, L - 1)
    if repeated.any():
        row, col = repeated.nonzero()[0].tolist()
        raise ValueError(f"lists row {row} names item {int(ordered[row, col])} more than once; "
                         "a ranking lists each item once")
    return lists


def listed_grades(lists: ArrayLike, relevance: GradedRelevance) -> torch.Tensor:
    """(Q, L) float64 grade of each listed item: its judgement, 0 if unjudged or a pad.

    Found by binary search of (query, item) keys in the sorted judgements, never a Q x N matrix.
    """
    lists = _check_lists(lists)  # (Q, L)
    if lists.shape[0] != relevance.n_queries:
        raise ValueError(f"lists has {lists.shape[0]} rows but relevance judges {relevance.n_queries} queries; "
                         "give one row per judged query, in the same order (GradedRelevance.select)")
    if not relevance.item.numel() or not lists.numel():
        return torch.zeros(lists.shape, dtype=torch.float64)
    width = max(relevance.max_item(), int(lists.max())) + 1
    if relevance.n_queries * width >= torch.iinfo(torch.int64).max:
        raise ValueError(f"{relevance.n_queries} queries x {width} items overflow the int64 (query, item) keys")
    judged_keys = relevance.query * width + relevance.item  # (J,) ascending: judgements are sorted
    # A pad's key is the previous query's item width - 1: masked below.
    list_keys = torch.arange(lists.shape[0], dtype=torch.int64)[:, None] * width + lists  # (Q, L)
    slot = torch.searchsorted(judged_keys, list_keys).clamp_(max=judged_keys.numel() - 1)  # (Q, L)
    found = (judged_keys[slot] == list_keys) & (lists != PAD)
    return torch.where(found, relevance.grade[slot], torch.zeros((), dtype=torch.float64))


def _check_max_grade(grades: torch.Tensor, max_grade: float) -> float:
    """``max_grade`` as a float after checking it is > 0 and no listed grade exceeds it."""
    if not (isinstance(max_grade, (int, float, np.number)) and not isinstance(max_grade, bool)
            and np.isfinite(max_grade) and max_grade > 0):
        raise ValueError(f"max_grade must be a finite number > 0 (the top of the grading scale), got {max_grade!r}")
    if grades.numel() and float(grades.max()) > max_grade:
        row, col = (grades > max_grade).nonzero()[0].tolist()
        raise ValueError(f"query {row} lists at rank {col + 1} an item of grade {float(grades[row, col])} > "
                         f"max_grade={max_grade}; pass the top of the grading scale as max_grade")
    return float(max_grade)


def ndcg_at_k(grades: torch.Tensor, relevance: GradedRelevance, k: int) -> torch.Tensor:
    """(Q,) nDCG@k with gain 2^g - 1 and discount 1/log2(r + 1); NaN where IDCG is 0 (no
    relevant item). ``grades`` (Q, L) from ``listed_grades``."""
    k = _check_k(k, grades.shape[1])
    dcg = ((torch.exp2(grades[:, :k]) - 1.0) * _discount(k)).sum(dim=1)  # (Q,)
    ideal = relevance.ideal_dcg(k)  # (Q,)
    return torch.where(ideal > 0, dcg / ideal.clamp(min=torch.finfo(torch.float64).tiny), torch.nan)


def err_at_k(grades: torch.Tensor, k: int, max_grade: float) -> torch.Tensor:
    """(Q,) ERR@k (Chapelle et al. 2009): sum_r (1/r) R_r prod_{i<r} (1 - R_i), R = (2^g - 1) / 2^g_max."""
    k = _check_k(k, grades.shape[1])
    max_grade = _check_max_grade(grades, max_grade)
    satisfied = (torch.exp2(grades[:, :k]) - 1.0) / 2.0 ** max_grade  # (Q, k) R_r
    still_looking = torch.cumprod(1.0 - satisfied, dim=1)  # (Q, k) prod_{i<=r} (1 - R_i)
    reaches = torch.cat([torch.ones_like(still_looking[:, :1]), still_looking[:, :-1]], dim=1)  # prod_{i<r}
    rank = torch.arange(1, k + 1, dtype=torch.float64)
    return (satisfied * reaches / rank).sum(dim=1)


def rbp(grades: torch.Tensor, max_grade: float, p: float = 0.9) -> Tuple[torch.Tensor, float]:
    """((Q,) RBP over all L columns, residual p^L) (Moffat & Zobel 2008), graded as g / g_max."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"RBP persistence p must be in (0, 1), got {p}")
    max_grade = _check_max_grade(grades, max_grade)
    depth = grades.shape[1]
    weight = (1.0 - p) * torch.pow(torch.tensor(p, dtype=torch.float64), torch.arange(depth, dtype=torch.float64))
    return (grades / max_grade * weight).sum(dim=1), float(p) ** depth


def reciprocal_rank(grades: torch.Tensor) -> torch.Tensor:
    """(Q,) 1 / rank of the first listed item with grade > 0; 0 if the list has none."""
    relevant = grades > 0  # (Q, L)
    if not grades.shape[1]:
        return torch.zeros(grades.shape[0], dtype=torch.float64)
    first = torch.argmax(relevant.to(torch.int8), dim=1).to(torch.float64) + 1.0  # (Q,) first True (0 if none)
    return torch.where(relevant.any(dim=1), 1.0 / first, torch.zeros((), dtype=torch.float64))


def recall_at_k(grades: torch.Tensor, relevance: GradedRelevance, k: int) -> torch.Tensor:
    """(Q,) |relevant in the top k| / |relevant|; NaN for a query without relevant items."""
    k = _check_k(k, grades.shape[1])
    hits = (grades[:, :k] > 0).sum(dim=1).to(torch.float64)  # (Q,)
    n_relevant = relevance.n_relevant.to(torch.float64)
    return torch.where(n_relevant > 0, hits / n_relevant.clamp(min=1.0), torch.nan)


def graded_report(lists: ArrayLike, relevance: GradedRelevance, *, max_grade: float, k: int = 10,
                  p: float = 0.9) -> Dict[str, Union[float, int]]:
    """Mean graded metrics of the ranked ``lists`` (Q, L) against ``relevance``.

    Returns ``{"ndcg@k", "err@k", "rbp_p<p>", "rbp_p<p>_residual", "mrr", "recall@k": float,
    "n_queries": Q, "n_without_relevant": int, "depth": L}``, e.g. keys ``ndcg@10`` and
    ``rbp_p0.9``. Means are over the Q - n_without_relevant queries with a relevant item (NaN if
    none); the residual is the same p^L for every query. Definitions in the module docstring.
    """
    above_scale = relevance.grade > max_grade  # checked on every judgement, listed or not
    if relevance.grade.numel() and bool(above_scale.any()):
        at = int(above_scale.nonzero()[0])
        raise ValueError(f"query {int(relevance.query[at])} judges item {int(relevance.item[at])} with grade "
                         f"{float(relevance.grade[at])} > max_grade={max_grade}; pass the top of the grading "
                         "scale as max_grade")
    grades = listed_grades(lists, relevance)  # (Q, L)
    counted = relevance.n_relevant > 0  # (Q,)
    rbp_values, residual = rbp(grades, max_grade, p)
    per_query = {
        f"ndcg@{k}": ndcg_at_k(grades, relevance, k),
        f"err@{k}": err_at_k(grades, k, max_grade),
        f"rbp_p{p:g}": rbp_values,
        "mrr": reciprocal_rank(grades),
        f"recall@{k}": recall_at_k(grades, relevance, k),
    }
    n_counted = int(counted.sum())
    report: Dict[str, Union[float, int]] = {
        name: float(values[counted].mean()) if n_counted else float("nan") for name, values in per_query.items()}
    report[f"rbp_p{p:g}_residual"] = residual if n_counted else float("nan")
    report["n_queries"] = relevance.n_queries
    report["n_without_relevant"] = relevance.n_queries - n_counted
    report["depth"] = int(grades.shape[1])
    return report


def _rank_chunk(scores: torch.Tensor, depth: int) -> torch.Tensor:
    """(c, depth) item indices of the ``depth`` best of (c, N) ``scores`` (depth <= N), by score
    descending then item index ascending.

    torch.topk picks an arbitrary subset of the items tied at the cut-off score, so rows with more
    items at or above the cut-off than ``depth`` take their tied items by lowest index instead.
    """
    values, index = torch.topk(scores, depth, dim=1, largest=True, sorted=True)  # (c, depth)
    cutoff = values[:, -1:]  # (c, 1) the depth-th best score
    # int32 sum: the int64 default took as long as the (c, D) x (D, N) matmul that made the scores.
    ambiguous = (scores >= cutoff).sum(dim=1, dtype=torch.int32) > depth  # (c,) ties straddle the cut
    if ambiguous.any():
        rows = ambiguous.nonzero().squeeze(1)  # (a,)
        row_scores, row_cutoff = scores[rows], cutoff[rows]  # (a, N), (a, 1)
        n_above = (values[rows] > row_cutoff).sum(dim=1)  # (a,) < depth; topk lists them first
        n_items = scores.shape[1]
        tied_index = torch.where(row_scores == row_cutoff,
                                 torch.arange(n_items, dtype=torch.int32, device=scores.device),
                                 torch.tensor(n_items, dtype=torch.int32, device=scores.device))  # (a, N)
        lowest_tied = torch.topk(tied_index, depth, dim=1, largest=False, sorted=True).values.long()  # (a, depth)
        slot = torch.arange(depth, device=scores.device)[None, :]  # (1, depth)
        from_ties = slot >= n_above[:, None]  # (a, depth) slots filled by tied items
        tied_pick = lowest_tied.gather(1, (slot - n_above[:, None]).clamp(min=0))
        index[rows] = torch.where(from_ties, tied_pick, index[rows])
    # Final order: sort the chosen items by index, then a stable sort by score descending keeps
    # equal scores in index order.
    index = torch.sort(index, dim=1).values
    order = torch.sort(scores.gather(1, index), dim=1, descending=True, stable=True).indices
    return index.gather(1, order)


def _padded(ranked: torch.Tensor, depth: int) -> torch.Tensor:
    """``ranked`` (c, n) widened to (c, depth) with PAD columns."""
    if ranked.shape[1] == depth:
        return ranked
    pad = torch.full((ranked.shape[0], depth - ranked.shape[1]), PAD, dtype=ranked.dtype, device=ranked.device)
    return torch.cat([ranked, pad], dim=1)


def _check_depth(depth: int) -> int:
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 1:
        raise ValueError(f"depth must be an integer >= 1 (how many items to list per query), got {depth!r}")
    return int(depth)


def rank_by_score(scores: torch.Tensor, depth: int) -> torch.Tensor:
    """(Q, depth) int64 item indices by ``scores`` (Q, N) descending, ties by lower item index.

    Rows go in chunks of about RANK_CHUNK_ELEMENTS scores on the scores' device; the result is on
    the CPU. With depth > N the rows end in PAD (-1). -inf ranks last but is still listed (rank a
    column subset to leave items out); NaN is an error naming the row.
    """
    depth = _check_depth(depth)
    scores = torch.as_tensor(scores)
    if scores.ndim != 2 or not scores.dtype.is_floating_point:
        raise ValueError(f"scores must be a (Q, N) float matrix, got shape {tuple(scores.shape)} dtype {scores.dtype}")
    n_queries, n_items = scores.shape
    if not n_items:
        return torch.full((n_queries, depth), PAD, dtype=torch.int64)
    step = max(1, RANK_CHUNK_ELEMENTS // n_items)
    out = []
    for start in range(0, n_queries, step):
        chunk = scores[start:start + step]  # (c, N)
        nan_rows = torch.isnan(chunk).any(dim=1)
        if nan_rows.any():
            raise ValueError(f"scores row {start + int(nan_rows.nonzero()[0])} holds NaN; rankings need finite scores")
        out.append(_padded(_rank_chunk(chunk, min(depth, n_items)), depth).cpu())
    return torch.cat(out) if out else torch.zeros((0, depth), dtype=torch.int64)


def rank_by_similarity(query_vectors: torch.Tensor, item_vectors: torch.Tensor, depth: int) -> torch.Tensor:
    """(Q, depth) int64 item indices by dot product q . v descending, ties by lower item index:
    ``rank_by_score(query_vectors @ item_vectors.T, depth)`` without holding the (Q, N) scores
    (10^4 x 10^5 float32 would be 4 GB). Pass unit rows for cosine similarity."""
    depth = _check_depth(depth)
    if query_vectors.ndim != 2 or item_vectors.ndim != 2 or query_vectors.shape[1] != item_vectors.shape[1]:
        raise ValueError(f"query_vectors (Q, D) and item_vectors (N, D) must share D, got shapes "
                         f"{tuple(query_vectors.shape)} and {tuple(item_vectors.shape)}")
    n_items = item_vectors.shape[0]
    step = max(1, RANK_CHUNK_ELEMENTS // max(n_items, 1))
    out = [rank_by_score(query_vectors[start:start + step] @ item_vectors.T, depth)  # (c, N) scores
           for start in range(0, query_vectors.shape[0], step)]
    return torch.cat(out) if out else torch.zeros((0, depth), dtype=torch.int64)
