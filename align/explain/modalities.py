"""Which modalities of an item carried its score: the score split into one share per modality.

Search (``linear``, exact): the fused vector f that the index holds is, for every fusion ``align
embed`` and ``align index`` make, a linear combination of the item's own modality vectors v_k
(unit rows of the same folder, cut as the index cut it):

    mean, weighted mean:  f = sum_k w_k v_k / (sum_j w_j * |m|)   (``align.index.vectors.fuse``);
    model.fields:         f is the weighted mean of the field vectors, and each modality's v_k the
                          normalised weighted mean of its own fields m_k, so
                          f = sum_k W_k |m_k| v_k / (W * |m|)   (W_k: its fields' weight; W: all);
    a Matryoshka cut:     f = prefix(F) with F = sum_k c_k V_k over the full-width vectors, and each
                          v_k = prefix(V_k), so f = sum_k c_k |V_k[:D]| v_k / |F[:D]|
                          (``--dim`` of ``align embed`` or ``align index``, ``align.model.prefix``).

Only in the first do the stored vectors and the recorded weights give the coefficients; the others
need norms the folder does not keep (|m_k|, |V_k[:D]|). So the coefficients a_k are found from
the vectors themselves: f written in the item's modality vectors by least squares (unique where
they are linearly independent; where two coincide, the minimum-norm solution gives them equal
parts). The cosine with a query q is then a sum of one term per modality,

    <q, f> = sum_k a_k <q, v_k> + <q, r>,   r = f - sum_k a_k v_k,

those terms are the shares, and ``rest`` = <q, r> is the part of f outside the item's modality
vectors: float32 rounding (~1e-7) for the folders ``align embed`` writes, so that the shares sum to
the fused score; shares + rest equal it to float64 rounding whatever made f.

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
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch

from align.errors import RunError
from align.index.vectors import FUSED, ItemEmbeddings, fuse, fusion_weights_of

Recommender = Any  # an align.rec.recommend.Recommender: not imported, as align recommend / align search import this package


def linear_shares(query: torch.Tensor, fused: torch.Tensor, vectors: Dict[str, torch.Tensor],
                  masks: Dict[str, torch.Tensor]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per item, each modality's share of the query's cosine with its fused vector (module docstring).

    Args:
        query: (D,) a unit query vector.
        fused: (k, D) the items' vectors as the index holds them.
        vectors: modality -> (k, D) the items' modality vectors, of the same width.
        masks: modality -> (k,) bool, the item has that modality.
    Returns:
        (shares (k, M) float64 in the order of ``vectors``, rest (k,) float64, scores (k,) float64:
        the cosines with ``fused``, = shares.sum(1) + rest).
    """
    names = list(vectors)
    q = query.double().reshape(-1)  # (D,)
    parts = torch.stack([vectors[m].double() * masks[m].double()[:, None] for m in names], -1)  # (k, D, M)
    target = fused.double()  # (k, D)
    # gelsd (SVD): a missing modality's zero column, or two equal vectors, get the minimum-norm answer
    coefficients = torch.linalg.lstsq(parts, target.unsqueeze(-1), driver="gelsd").solution.squeeze(-1)  # (k, M)
    shares = coefficients * torch.einsum("kdm,d->km", parts, q)  # (k, M)
    scores = target @ q  # (k,)
    return shares.numpy(), (scores - shares.sum(1)).numpy(), scores.numpy()


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
        weights = fusion_weights_of(embeddings.metadata)
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
