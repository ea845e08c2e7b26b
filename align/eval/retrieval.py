"""Exact nearest-neighbour retrieval metrics between two embedded sets, at any scale.

A query's positives are the candidates that share its item id, its group id, or its exact text
(normalised for case and spaces). So a query whose caption is identical to other items' counts
any of them as a hit: two listings titled "large red striped star" are indistinguishable by text.
Queries with no positive among the candidates are left out and not counted in ``n_queries``.

Ranks are exact and the query x candidate score matrix is never held: queries go in chunks of
``QUERY_CHUNK`` against candidates in chunks of ``CANDIDATE_CHUNK`` ((512, 65536) float32 scores =
128 MiB), and each positive's rank is counted, chunk by chunk, as

    rank(p) = 1 + #{j : s_j > s_p + w} + #{j < p : |s_j - s_p| <= w}

its place in a descending sort where ties go to the lower candidate index (as the stable sort did
before). ``w`` (``tie_width``) is what float32 rounding can move a score by: the positive's own
score is computed apart from the chunk's matmul, and two kernels may round one dot product
differently, so scores closer than that cannot be told apart; identical vectors (listings with one
text) are exact ties either way. Positives are found from the keys (sorted keys and binary search,
never a Q x C mask), so memory grows with the number of (query, positive) pairs, not with Q x C.
The mAP needs every positive's rank, so it is exact too; so are R@K and the median rank of the first
positive.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

NO_KEY = -1
QUERY_CHUNK = 512
CANDIDATE_CHUNK = 65536
COMPARISONS = 1 << 24  # (positives, candidates) booleans compared at once: 16 MiB


def text_keys(texts: Sequence[Optional[str]]) -> torch.Tensor:
    """Integer key per text; identical (case/space-normalised) texts share a key, None -> -1."""
    table: Dict[str, int] = {}
    keys = []
    for text in texts:
        if text is None or not str(text).strip():
            keys.append(NO_KEY)
            continue
        norm = " ".join(str(text).lower().split())
        keys.append(table.setdefault(norm, len(table)))
    return torch.tensor(keys, dtype=torch.long)


def positives(q_ids, c_ids, q_groups, c_groups, q_text, c_text) -> torch.Tensor:
    """(Q, C) bool: candidate j is a positive of query i (the dense definition; ``positive_pairs``
    finds the same pairs without the Q x C matrix)."""
    same_id = q_ids[:, None] == c_ids[None, :]
    same_group = (q_groups[:, None] == c_groups[None, :]) & (q_groups[:, None] != NO_KEY)
    same_text = (q_text[:, None] == c_text[None, :]) & (q_text[:, None] != NO_KEY)
    return same_id | same_group | same_text


def _matching(q_key: torch.Tensor, c_key: torch.Tensor, skip_no_key: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(query, candidate) index pairs with equal keys (queries keyed NO_KEY match nothing when
    ``skip_no_key``), by binary search in the sorted candidate keys."""
    c_sorted, order = torch.sort(c_key, stable=True)
    low = torch.searchsorted(c_sorted, q_key, right=False)  # (Q,)
    count = torch.searchsorted(c_sorted, q_key, right=True) - low
    if skip_no_key:
        count = torch.where(q_key == NO_KEY, torch.zeros_like(count), count)
    query = torch.repeat_interleave(torch.arange(len(q_key)), count)  # (P,)
    first = torch.cumsum(count, 0) - count  # each query's first pair
    offset = torch.arange(int(count.sum())) - torch.repeat_interleave(first, count)
    return query, order[torch.repeat_interleave(low, count) + offset]


def positive_pairs(q_keys: Sequence[torch.Tensor], c_keys: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The (query, candidate) positive pairs of ``positives``, sorted by query then candidate.

    Args:
        q_keys: (ids, groups, texts) integer keys of the queries, (Q,) each; groups and texts
            NO_KEY where absent (then they match nothing).
        c_keys: the same for the candidates, (C,) each.
    Returns:
        (pair_query (P,), pair_candidate (P,)) int64.
    """
    found = [_matching(q, c, skip_no_key=n > 0) for n, (q, c) in enumerate(zip(q_keys, c_keys))]
    width = max(len(c_keys[0]), 1)
    code = torch.unique(torch.cat([q * width + c for q, c in found]))  # sorted, each pair once
    return code // width, code % width


def tie_width(dim: int) -> float:
    """Scores of unit vectors closer than this are ties: two float32 dot products of ``dim`` terms
    (a matmul's and a row sum's) each round by at most (dim + 2) eps |q| |c|, eps = 2^-24, so they
    may differ by twice that, however the kernels sum. Scale by |q| |c| for other norms."""
    return 2 * (dim + 2) * 2.0 ** -24


def rank_positives(queries: torch.Tensor, candidates: torch.Tensor, pair_query: torch.Tensor,
                   pair_candidate: torch.Tensor, query_chunk: int = QUERY_CHUNK,
                   candidate_chunk: int = CANDIDATE_CHUNK) -> torch.Tensor:
    """(P,) int64: each positive's 1-based rank among all candidates of its query (module docstring).

    Args:
        queries: (Q, D); candidates: (C, D); scores are inner products in float32.
        pair_query, pair_candidate: (P,) positive pairs sorted by query (``positive_pairs``).
    """
    queries, candidates = queries.float(), candidates.float()
    ranks = torch.ones(len(pair_query), dtype=torch.long)
    # Each positive's own score once, as a row dot product. It and the chunk's matmul may round
    # differently, by at most tie_width each (module docstring), so scores that close are ties.
    own = (queries[pair_query] * candidates[pair_candidate]).sum(-1)  # (P,)
    width = tie_width(queries.shape[1]) * queries.norm(dim=1)[pair_query] * candidates.norm(dim=1).max()  # (P,)
    bounds = torch.searchsorted(pair_query, torch.arange(0, len(queries) + query_chunk, query_chunk))
    for chunk, start in enumerate(range(0, len(queries), query_chunk)):
        lo, hi = int(bounds[chunk]), int(bounds[chunk + 1])
        if lo == hi:
            continue
        local, target, score, tie = pair_query[lo:hi] - start, pair_candidate[lo:hi], own[lo:hi], width[lo:hi]
        block = queries[start:start + query_chunk]  # (q, D)
        step = max(1, COMPARISONS // max(1, min(candidate_chunk, len(candidates))))
        for c_start in range(0, len(candidates), candidate_chunk):
            scores = block @ candidates[c_start:c_start + candidate_chunk].T  # (q, c)
            column = torch.arange(c_start, c_start + scores.shape[1])  # (c,)
            for p in range(0, hi - lo, step):
                end = min(p + step, hi - lo)
                rows = scores[local[p:end]]  # (p, c): the query row of each positive
                s, t, w = score[p:end, None], target[p:end, None], tie[p:end, None]
                ahead = (rows > s + w) | ((rows >= s - w) & (column < t))
                ranks[lo + p:lo + end] += ahead.sum(1)
    return ranks


@dataclass
class Ranked:
    """One modality pair's exact ranks: per query with a positive, the rank of its first positive
    and its average precision; the pairs they came from (for the index's approximate R@K)."""

    queries: torch.Tensor  # (Q',) query positions that have a positive
    first_rank: torch.Tensor  # (Q',) int64, 1-based
    average_precision: torch.Tensor  # (Q',) float64
    pair_query: torch.Tensor  # (P,) positive pairs, sorted by query
    pair_candidate: torch.Tensor  # (P,)
    n_candidates: int

    def metrics(self, ks: Sequence[int]) -> Dict[str, float]:
        """R@k, median rank of the first positive, mAP over all positives, n_queries."""
        if not len(self.queries):
            return {**{f"R@{k}": float("nan") for k in ks}, "median_rank": float("nan"), "mAP": float("nan"),
                    "n_queries": 0}
        out = {f"R@{k}": float((self.first_rank <= k).double().mean()) for k in ks}
        out["median_rank"] = float(np.median(self.first_rank.numpy()))
        out["mAP"] = float(self.average_precision.mean())
        out["n_queries"] = int(len(self.queries))
        return out

    def recall_curve(self, max_k: int) -> List[float]:
        """[R@1, ..., R@max_k]."""
        counts = torch.bincount(self.first_rank.clamp(max=max_k + 1), minlength=max_k + 2)[1:max_k + 1]
        return (counts.cumsum(0).double() / max(len(self.queries), 1)).tolist()


def rank_pairs(queries: torch.Tensor, candidates: torch.Tensor, pair_query: torch.Tensor,
               pair_candidate: torch.Tensor, query_chunk: int = QUERY_CHUNK,
               candidate_chunk: int = CANDIDATE_CHUNK) -> Ranked:
    """``Ranked`` of ``queries`` against ``candidates`` given the positive pairs (sorted by query)."""
    ranks = rank_positives(queries, candidates, pair_query, pair_candidate, query_chunk, candidate_chunk)
    if not len(ranks):
        empty = torch.zeros(0, dtype=torch.long)
        return Ranked(empty, empty, torch.zeros(0, dtype=torch.float64), pair_query, pair_candidate, len(candidates))
    # Order each query's positives by rank: the k-th found at rank r adds precision k / r.
    order = torch.argsort(pair_query * (len(candidates) + 1) + ranks)
    query, rank = pair_query[order], ranks[order]
    owners, counts = torch.unique_consecutive(query, return_counts=True)  # (Q',)
    first = torch.cumsum(counts, 0) - counts
    k = torch.arange(len(rank)) - torch.repeat_interleave(first, counts) + 1  # (P,) 1-based
    per_query = torch.zeros(len(owners), dtype=torch.float64).index_add_(
        0, torch.repeat_interleave(torch.arange(len(owners)), counts), k.double() / rank.double())
    return Ranked(owners, rank[first], per_query / counts.double(), pair_query, pair_candidate, len(candidates))


def retrieval_metrics(queries: torch.Tensor, candidates: torch.Tensor, is_positive_fn, ks: Sequence[int] = (1, 5, 10),
                      chunk: int = QUERY_CHUNK) -> Dict[str, float]:
    """R@k, median rank of the first positive, and mAP over all positives.

    ``queries`` (Q, D) and ``candidates`` (C, D) are L2-normalised; ``is_positive_fn(rows)``
    returns the (len(rows), C) positive mask for a slice of query rows (a chunk of queries at a
    time; ``RetrievalEvaluator`` finds its positives from keys instead, with no mask at all).
    """
    found = []
    for start in range(0, queries.shape[0], chunk):
        rows = slice(start, min(start + chunk, queries.shape[0]))
        query, candidate = is_positive_fn(rows).nonzero(as_tuple=True)
        found.append((query + start, candidate))
    pair_query = torch.cat([q for q, _ in found] + [torch.zeros(0, dtype=torch.long)])
    pair_candidate = torch.cat([c for _, c in found] + [torch.zeros(0, dtype=torch.long)])
    return rank_pairs(queries, candidates, pair_query, pair_candidate, chunk).metrics(ks)


def recall_from_top(top: torch.Tensor, ranked: Ranked, ks: Sequence[int]) -> Dict[str, float]:
    """R@k of a top list (e.g. an approximate index's answer) for the queries ``ranked`` counts.

    Args:
        top: (Q', k_max) int64 candidate positions, best first, -1 padding; row i answers query
            ``ranked.queries[i]``.
    Returns:
        {"R@k~": share of those queries with a positive in the first k of their list}.
    """
    width = ranked.n_candidates
    pair_codes = ranked.pair_query * width + ranked.pair_candidate  # sorted
    codes = ranked.queries[:, None] * width + top.clamp(min=0)  # (Q', k_max)
    spot = torch.searchsorted(pair_codes, codes).clamp(max=max(len(pair_codes) - 1, 0))
    hit = (pair_codes[spot] == codes) & (top >= 0) if len(pair_codes) else torch.zeros_like(top, dtype=torch.bool)
    first = torch.where(hit.any(1), hit.float().argmax(1) + 1, torch.full((len(top),), top.shape[1] + 1))
    return {f"R@{k}~": float((first <= k).double().mean()) if len(top) else float("nan") for k in ks}


@dataclass
class RetrievalEvaluator:
    """Zero-shot retrieval for every ordered pair of modalities present in an embedded split.

    Call with ``embeddings`` {modality: (N, D)} (rows aligned with ``ids``; zero rows where
    missing), ``masks`` {modality: (N,) bool}, ``ids``, ``groups`` (N,) and ``texts``. Returns
    {"text->image": {"R@1": ..., ..., "n_queries": ...}, ...}; ``rank`` returns the ``Ranked``
    behind those figures (for curves and the index's approximate R@K).
    """

    ks: Sequence[int] = (1, 5, 10)
    query_chunk: int = QUERY_CHUNK
    candidate_chunk: int = CANDIDATE_CHUNK

    def rank(self, embeddings: Dict[str, torch.Tensor], masks: Dict[str, torch.Tensor], ids: Sequence[str],
             groups: torch.Tensor,
             texts: Sequence[Optional[str]]) -> Dict[str, Tuple[Ranked, torch.Tensor, torch.Tensor]]:
        """{pair: (ranked, query rows (Q,), candidate rows (C,))}; rows index the split."""
        id_table: Dict[str, int] = {}
        id_keys = torch.tensor([id_table.setdefault(str(i), len(id_table)) for i in ids], dtype=torch.long)
        keys = (id_keys, groups.long(), text_keys(texts))
        out = {}
        for query_modality in embeddings:
            for candidate_modality in embeddings:
                if query_modality == candidate_modality:
                    continue
                q_rows = masks[query_modality].nonzero(as_tuple=True)[0]
                c_rows = masks[candidate_modality].nonzero(as_tuple=True)[0]
                if len(q_rows) == 0 or len(c_rows) == 0:
                    continue
                pair_query, pair_candidate = positive_pairs([k[q_rows] for k in keys], [k[c_rows] for k in keys])
                ranked = rank_pairs(embeddings[query_modality][q_rows], embeddings[candidate_modality][c_rows],
                                    pair_query, pair_candidate, self.query_chunk, self.candidate_chunk)
                out[f"{query_modality}->{candidate_modality}"] = (ranked, q_rows, c_rows)
        return out

    def __call__(self, embeddings: Dict[str, torch.Tensor], masks: Dict[str, torch.Tensor], ids: Sequence[str],
                 groups: torch.Tensor, texts: Sequence[Optional[str]]) -> Dict[str, Dict[str, float]]:
        return {pair: ranked.metrics(self.ks)
                for pair, (ranked, _, _) in self.rank(embeddings, masks, ids, groups, texts).items()}


def format_table(results: Dict[str, Dict[str, float]], ks: Sequence[int] = (1, 5, 10)) -> str:
    """The printed table; pairs ranked through an index add their approximate R@k~ and its recall@10."""
    approximate = any(f"R@{k}~" in m for m in results.values() for k in ks)
    header = ["pair"] + [f"R@{k}" for k in ks] + ["medR", "mAP", "queries"]
    header += [f"R@{k}~" for k in ks] + ["idx R10"] if approximate else []
    lines = [" ".join(f"{h:>14}" if i == 0 else f"{h:>8}" for i, h in enumerate(header))]
    for pair, m in results.items():
        cells = [f"{pair:>14}"] + [f"{m[f'R@{k}']:>8.3f}" for k in ks]
        cells += [f"{m['median_rank']:>8.1f}", f"{m['mAP']:>8.3f}", f"{m['n_queries']:>8d}"]
        if approximate:
            cells += [f"{m[f'R@{k}~']:>8.3f}" if f"R@{k}~" in m else f"{'-':>8}" for k in ks]
            recall = m.get("index_recall10")
            cells.append(f"{recall:>8.3f}" if isinstance(recall, float) else f"{'-':>8}")
        lines.append(" ".join(cells))
    return "\n".join(lines)
