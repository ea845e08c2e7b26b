"""Exact nearest-neighbour retrieval metrics between two embedded sets.

A query's positives are the candidates that share its item id, its group id, or its exact text
(normalised for case and spaces). So a query whose caption is identical to other items' counts
any of them as a hit: two listings titled "large red striped star" are indistinguishable by text.
Queries with no positive among the candidates are left out and not counted in ``n_queries``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

NO_KEY = -1


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
    """(Q, C) bool: candidate j is a positive of query i."""
    same_id = q_ids[:, None] == c_ids[None, :]
    same_group = (q_groups[:, None] == c_groups[None, :]) & (q_groups[:, None] != NO_KEY)
    same_text = (q_text[:, None] == c_text[None, :]) & (q_text[:, None] != NO_KEY)
    return same_id | same_group | same_text


def retrieval_metrics(queries: torch.Tensor, candidates: torch.Tensor, is_positive_fn, ks: Sequence[int] = (1, 5, 10),
                      chunk: int = 512) -> Dict[str, float]:
    """R@k, median rank of the first positive, and mAP over all positives.

    ``queries`` (Q, D) and ``candidates`` (C, D) are L2-normalised; ``is_positive_fn(rows)``
    returns the (len(rows), C) positive mask for a slice of query rows, so the full Q x C mask is
    never held at once.
    """
    first_ranks: List[torch.Tensor] = []
    average_precisions: List[torch.Tensor] = []
    for start in range(0, queries.shape[0], chunk):
        rows = slice(start, min(start + chunk, queries.shape[0]))
        scores = queries[rows].float() @ candidates.float().T  # (q, C)
        positive = is_positive_fn(rows)  # (q, C)
        has_positive = positive.any(dim=1)
        scores, positive = scores[has_positive], positive[has_positive]
        if scores.shape[0] == 0:
            continue
        order = torch.argsort(scores, dim=1, descending=True, stable=True)  # (q, C)
        hits = torch.gather(positive, 1, order)  # (q, C) positives in ranked order
        first_ranks.append(hits.float().argmax(dim=1) + 1)  # 1-based rank of the first positive
        positions = torch.arange(1, hits.shape[1] + 1, dtype=torch.float32)
        precision_at_hit = hits.float().cumsum(dim=1) / positions  # (q, C)
        average_precisions.append((precision_at_hit * hits).sum(1) / hits.sum(1))
    if not first_ranks:
        return {**{f"R@{k}": float("nan") for k in ks}, "median_rank": float("nan"), "mAP": float("nan"),
                "n_queries": 0}
    ranks = torch.cat(first_ranks)
    metrics = {f"R@{k}": float((ranks <= k).float().mean()) for k in ks}
    metrics["median_rank"] = float(np.median(ranks.numpy()))
    metrics["mAP"] = float(torch.cat(average_precisions).mean())
    metrics["n_queries"] = int(ranks.numel())
    return metrics


@dataclass
class RetrievalEvaluator:
    """Zero-shot retrieval for every ordered pair of modalities present in an embedded split.

    Call with ``embeddings`` {modality: (N, D)} (rows aligned with ``ids``; zero rows where
    missing), ``masks`` {modality: (N,) bool}, ``ids``, ``groups`` (N,) and ``texts``. Returns
    {"text->image": {"R@1": ..., ..., "n_queries": ...}, ...}.
    """

    ks: Sequence[int] = (1, 5, 10)

    def __call__(self, embeddings: Dict[str, torch.Tensor], masks: Dict[str, torch.Tensor], ids: Sequence[str],
                 groups: torch.Tensor, texts: Sequence[Optional[str]]) -> Dict[str, Dict[str, float]]:
        id_table: Dict[str, int] = {}
        id_keys = torch.tensor([id_table.setdefault(str(i), len(id_table)) for i in ids], dtype=torch.long)
        t_keys = text_keys(texts)
        results: Dict[str, Dict[str, float]] = {}
        for query_modality in embeddings:
            for candidate_modality in embeddings:
                if query_modality == candidate_modality:
                    continue
                q_rows = masks[query_modality].nonzero(as_tuple=True)[0]
                c_rows = masks[candidate_modality].nonzero(as_tuple=True)[0]
                if len(q_rows) == 0 or len(c_rows) == 0:
                    continue

                def is_positive(rows, q_rows=q_rows, c_rows=c_rows):
                    q = q_rows[rows]
                    return positives(id_keys[q], id_keys[c_rows], groups[q], groups[c_rows], t_keys[q], t_keys[c_rows])

                results[f"{query_modality}->{candidate_modality}"] = retrieval_metrics(
                    embeddings[query_modality][q_rows], embeddings[candidate_modality][c_rows], is_positive, self.ks)
        return results



def format_table(results: Dict[str, Dict[str, float]], ks: Sequence[int] = (1, 5, 10)) -> str:
    header = ["pair"] + [f"R@{k}" for k in ks] + ["medR", "mAP", "queries"]
    lines = [" ".join(f"{h:>14}" if i == 0 else f"{h:>8}" for i, h in enumerate(header))]
    for pair, m in results.items():
        cells = [f"{pair:>14}"] + [f"{m[f'R@{k}']:>8.3f}" for k in ks]
        cells += [f"{m['median_rank']:>8.1f}", f"{m['mAP']:>8.3f}", f"{m['n_queries']:>8d}"]
        lines.append(" ".join(cells))
    return "\n".join(lines)
