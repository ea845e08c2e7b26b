"""Re-ranking a candidate pool for diversity and the long tail.

Popularity penalty: score - beta * log(1 + training count), applied before anything else, so
the head's ranking is pulled toward items fewer people saw (beta = ``popularity_penalty``).

MMR (Carbonell & Goldstein 1998, https://doi.org/10.1145/290941.291025): pick the list one item
at a time, each time the candidate with the highest

    lambda * relevance(i) - (1 - lambda) * max_{j already picked} cos(i, j)

over the aligned item vectors (the same ones ILD@K is measured on). lambda = 1 is the plain
ranking; lower values trade relevance for a list whose items look less alike.

Hub penalty: in a high-dimensional space a few items ("hubs", Radovanovic et al. 2010,
https://jmlr.org/papers/v11/radovanovic10a.html) sit close to most users and fill most lists,
however the ranking is trained. CSLS (Conneau et al. 2018, https://arxiv.org/abs/1710.04087)
scores ``cos(u, i) - r(i)`` up to a per-user constant, with ``r(i)`` the item's mean cosine to its
k nearest users: an item close to everyone loses what it gains from being close to this user.
We weigh ``r`` per user (``hub_weights``), so a user with one or two items, whose vector says
little, keeps the items everyone likes.
"""
from __future__ import annotations

from typing import Optional

import torch


@torch.no_grad()
def hubness(items: torch.Tensor, users: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """(N,) mean cosine of each item (N, D) to its ``k`` nearest users (M, D), unit rows; chunked
    over items, so the largest matrix is (chunk, M)."""
    k = min(k, users.shape[0])
    out = torch.empty(items.shape[0])
    for start in range(0, items.shape[0], chunk):
        block = items[start:start + chunk].float() @ users.float().T  # (c, M)
        out[start:start + chunk] = block.topk(k, dim=1).values.mean(dim=1)
    return out


def hub_weights(history_lengths: torch.Tensor, strength: float, half_history: float) -> torch.Tensor:
    """(U,) ``strength * n / (n + half_history)`` for users with n items of history (all
    ``strength`` when ``half_history`` is 0)."""
    n = history_lengths.double()
    if half_history == 0:
        return torch.full_like(n, strength).float()
    return (strength * n / (n + half_history)).float()


def popularity_penalised(scores: torch.Tensor, candidates: torch.Tensor, log_counts: torch.Tensor,
                         beta: float) -> torch.Tensor:
    """scores (U, P) of candidate rows (U, P) (-1 = none) minus beta * log(1 + count)."""
    if beta == 0:
        return scores
    return scores - beta * log_counts[candidates.clamp(min=0)]


@torch.no_grad()
def mmr(scores: torch.Tensor, candidates: torch.Tensor, vectors: torch.Tensor, k: int, lam: float,
        chunk: int = 1024) -> torch.Tensor:
    """(U, k) rows chosen greedily from each user's pool by MMR.

    scores (U, P) relevance of the pool, best first or not (-inf for no candidate); candidates
    (U, P) item rows (-1 = none); vectors (N, D) unit item vectors for the similarity.
    """
    if lam >= 1:
        order = scores.argsort(dim=1, descending=True)[:, :k]
        return torch.where(torch.gather(scores, 1, order) > -torch.inf, torch.gather(candidates, 1, order), -1)
    out = torch.full((scores.shape[0], k), -1, dtype=torch.long)
    for start in range(0, scores.shape[0], chunk):
        out[start:start + chunk] = _mmr_chunk(scores[start:start + chunk], candidates[start:start + chunk],
                                              vectors, k, lam)
    return out


def _mmr_chunk(scores: torch.Tensor, candidates: torch.Tensor, vectors: torch.Tensor, k: int,
               lam: float) -> torch.Tensor:
    users, pool = scores.shape
    pool_vectors = vectors[candidates.clamp(min=0)]  # (u, P, D)
    open_ = scores > -torch.inf  # (u, P) still available
    closest = torch.full((users, pool), -torch.inf)  # max cosine to the items picked so far
    picked = torch.full((users, k), -1, dtype=torch.long)
    arange = torch.arange(users)
    for slot in range(min(k, pool)):
        diversity = torch.where(torch.isinf(closest), torch.zeros_like(closest), closest)  # first pick: none
        value = torch.where(open_, lam * scores - (1 - lam) * diversity, -torch.inf)
        best = value.argmax(dim=1)  # (u,)
        ok = open_[arange, best]
        picked[:, slot] = torch.where(ok, candidates[arange, best], -1)
        open_[arange, best] = False
        chosen = pool_vectors[arange, best]  # (u, D)
        closest = torch.maximum(closest, torch.einsum("upd,ud->up", pool_vectors, chosen))
    return picked


def rerank(scores: torch.Tensor, candidates: torch.Tensor, vectors: torch.Tensor, k: int, mmr_lambda: float = 1.0,
           popularity_penalty: float = 0.0, log_counts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(U, k) item rows: the pool re-scored by the popularity penalty, then picked by MMR."""
    if popularity_penalty and log_counts is None:
        raise ValueError("popularity_penalty needs log_counts")
    scores = popularity_penalised(scores, candidates, log_counts, popularity_penalty) if popularity_penalty else scores
    return mmr(scores, candidates, vectors, k, mmr_lambda)
