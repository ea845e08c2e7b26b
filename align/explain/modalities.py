"""Which modalities of an item carried its score: the score split into one share per modality.

Search (``linear``, exact): the fused item vector is the normalised weighted mean of the item's
normalised modality vectors (``align.index.vectors.fuse``),

    f = m / |m|,   m = sum_k w_k v_k / sum_k w_k   (over the modalities k the item has),

so the cosine with a query q is a sum of one term per modality,

    <q, f> = sum_k  w_k <q, v_k> / (sum_j w_j * |m|),

and those terms are the shares: they sum to the fused score (to float64 rounding).

Recommendation (``shapley``, exact): the head's item tower is non-linear, so its score has no
such split. With M <= 3 modalities every coalition is cheap: the item is scored with only the
modalities of each subset S fused (its ID vector and popularity kept), v(S) = <u, item(S)>, and
modality k gets its Shapley value (Shapley 1953)

    phi_k = sum_{S without k} |S|! (M - |S| - 1)! / M! * (v(S + k) - v(S)).

The phi_k sum to v(all) - v(none); v(none), what the head gives the item from its ID vector and
popularity alone, is reported as ``base``, so shares + base = the score. With learned fusion a
coalition switches the other modalities' masks off (the head re-weighs the rest, as it does for
an item that lacks them); with given fusion the coalition's vector is fused again as
``align embed`` fused it (its recorded fusion weights).
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from align.errors import RunError
from align.index.vectors import FUSED, ItemEmbeddings, fuse, parse_fusion_weights

Recommender = Any  # an align.rec.recommend.Recommender: not imported, as align recommend / align search import this package


def fusion_weights_of(embeddings: ItemEmbeddings) -> Optional[Dict[str, float]]:
    """The weights ``align embed`` fused with (its metadata), None for the plain mean."""
    if embeddings.metadata.get("fusion", "mean") != "weighted_mean":
        return None
    return parse_fusion_weights(embeddings.metadata["fusion_weights"])


def linear_shares(query: torch.Tensor, vectors: Dict[str, torch.Tensor], masks: Dict[str, torch.Tensor],
                  weights: Optional[Dict[str, float]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Per item, each modality's share of the query's cosine with the fused vector (module docstring).

    Args:
        query: (D,) a unit query vector.
        vectors: modality -> (k, D) the items' modality vectors (normalised here).
        masks: modality -> (k,) bool, the item has that modality.
        weights: the fusion weights, None for equal ones.
    Returns:
        (shares (k, M) float64 in the order of ``vectors``, fused scores (k,) float64 = their sums).
    """
    names = list(vectors)
    q = query.double().reshape(-1)  # (D,)
    weight = torch.stack([masks[m].double() * (1.0 if weights is None else float(weights[m])) for m in names], 1)
    unit = torch.stack([F.normalize(vectors[m].double(), dim=-1) for m in names], 1)  # (k, M, D)
    total = weight.sum(1, keepdim=True)  # (k, 1)
    mean = (weight.unsqueeze(-1) * unit).sum(1) / total.clamp_min(1e-300)  # (k, D)
    norm = mean.norm(dim=-1, keepdim=True)  # (k, 1); zero for an item with no modality
    shares = weight * (unit @ q) / (total * norm).clamp_min(1e-300)  # (k, M)
    return shares.numpy(), shares.sum(1).numpy()


def head_modalities(recommender: "Recommender", embeddings: ItemEmbeddings) -> List[str]:
    """The modalities the head's item vectors are made of, in the order of its features."""
    if recommender.head.items.fusion is not None:
        return list(recommender.head.items.fusion.modalities)
    modality = recommender.config.head.modality
    return list(embeddings.modalities) if modality == FUSED else [modality]


def coalition_features(recommender: "Recommender", embeddings: ItemEmbeddings, rows: Sequence[int],
                       names: Sequence[str], keep: Sequence[bool]) -> torch.Tensor:
    """(k, F) what the item tower reads for the items at ``rows`` when only the modalities
    ``names[m]`` with ``keep[m]`` are there (the popularity column is kept)."""
    features = recommender.features[list(rows)].clone()  # (k, F)
    if recommender.head.items.fusion is not None:  # [M*D vectors | M masks | extras]
        start = len(names) * recommender.head.items.modality_dim
        for m, kept in enumerate(keep):
            if not kept:
                features[:, start + m] = 0.0
        return features
    width = recommender.content.shape[1]
    chosen = [name for name, kept in zip(names, keep) if kept]
    index = torch.as_tensor(list(rows), dtype=torch.long)
    if recommender.config.head.modality != FUSED or len(chosen) == len(names):
        content = recommender.content[index] if chosen else torch.zeros(len(index), width)
    else:
        weights = fusion_weights_of(embeddings)
        if chosen and (weights is None or any(weights[m] > 0 for m in chosen)):
            content, _ = fuse({m: embeddings.vectors[m][index] for m in chosen},
                              {m: embeddings.masks[m][index] for m in chosen},
                              None if weights is None else {m: weights[m] for m in chosen})
        else:
            content = torch.zeros(len(index), width)
    features[:, :width] = content
    return features


@torch.no_grad()
def shapley_shares(recommender: "Recommender", embeddings: ItemEmbeddings, user: torch.Tensor,
                   rows: Sequence[int]) -> Tuple[List[str], np.ndarray, np.ndarray, np.ndarray]:
    """Each modality's Shapley share of the head's score of the items at ``rows`` for ``user``.

    Args:
        recommender: the head and its catalogue.
        embeddings: its item embeddings folder (``recommender.items_folder``), rows in the same order.
        user: (dim,) the user vector.
        rows: k catalogue rows.
    Returns:
        (modality names, shares (k, M) float64, base (k,) float64, scores (k,) float64 with
        shares.sum(1) + base == scores).
    """
    if list(embeddings.ids) != list(recommender.item_ids):
        raise RunError(f"{recommender.items_folder}: its items are not the recommender's; load both from one folder")
    names = head_modalities(recommender, embeddings)
    count = len(names)
    user = user.double()
    values = {}  # coalition (tuple of bools) -> (k,) score
    for keep in itertools.product((False, True), repeat=count):
        if all(keep):  # the item as the head scores it, so that the shares sum to that very score
            vectors = recommender.item_vectors[list(rows)]
        else:
            features = coalition_features(recommender, embeddings, rows, names, keep)
            vectors = recommender.head.encode_items(features, recommender.id_rows[list(rows)])
        values[keep] = (vectors.double() @ user).numpy()  # (k,)
    shares = np.zeros((len(rows), count))
    for m in range(count):
        for keep in values:
            if keep[m]:
                continue
            size = sum(keep)
            weight = math.factorial(size) * math.factorial(count - size - 1) / math.factorial(count)
            joined = tuple(True if n == m else kept for n, kept in enumerate(keep))
            shares[:, m] += weight * (values[joined] - values[keep])
    return names, shares, values[(False,) * count], values[(True,) * count]
