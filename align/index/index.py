"""Exact nearest-neighbour search over unit vectors, with an id map: ``ExactIndex``.

The inner product of L2-normalised vectors is their cosine similarity, so the best rows of a query
are its nearest items. Search runs in FAISS (``IndexFlatIP``, exact) when faiss is importable
(``pip install faiss-cpu``), else in torch: a matmul and top-k in chunks of queries and rows, the
same results up to float32 rounding and tie order, only slower on large catalogues. Approximate
indexes and sharding are to come behind this same API.

Rows are numbered as given (``ids[row]``); rows that are not ``allowed`` (an item without that
modality, an item out of stock) are never stored, so they are never returned and cost nothing.

``metadata_text`` is the one text form of a catalogue metadata value, used where the indexes store
metadata and where ``where`` filters are read (``align search --where``, ``align serve``).
"""
from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any, List, Literal, Optional, Sequence, Tuple, Union

import numpy as np
import torch

if TYPE_CHECKING:
    from align.index.vectors import ItemEmbeddings

Backend = Literal["faiss", "torch"]
Matrix = Union[np.ndarray, torch.Tensor]
QUERY_CHUNK = 256  # torch search: queries and rows per matmul, (256, 65536) float32 scores = 64 MiB
ROW_CHUNK = 65536
PAD_SCORE = -np.inf  # the score beside a -1 row (fewer than k rows to return)


def metadata_text(value: Any) -> Optional[str]:
    """The one text form of a metadata value, or None for no value (None, NaN, empty text).

    Metadata is kept and filtered on as text, and a JSONL or Parquet catalogue, a JSON ``where``
    and ``align search --where in_stock=true`` must all write a value the same way to match:
    text is stripped; booleans are "true"/"false" (JSON's words, not Python's "True"); a whole
    finite float is its integer ("10" for 10.0, as a JSON 10 reads); other numbers their shortest
    repr ("10.5"); lists and objects their JSON. A CSV cell is text, so "10.0" there stays "10.0".
    """
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return None
        if math.isfinite(value) and float(value).is_integer():
            return str(int(value))
        return str(value)  # shortest text of its own precision: "10.5", float32 0.1 -> "0.1", "inf"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
    return str(value).strip() or None  # dates, decimals...: as Python writes them


def _faiss():
    """The faiss module, or None when it is not installed."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def as_matrix(values: Matrix, what: str) -> np.ndarray:
    """A float32, C-contiguous (rows, D) array: what faiss reads, whatever was given."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().float().numpy()
    array = np.ascontiguousarray(values, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"{what} must be a (rows, dim) matrix; got shape {array.shape}")
    return array


class ExactIndex:
    """Exact inner-product search (FAISS IndexFlatIP) over unit vectors, with an id map and a mask of
    rows that may be returned.

    Args:
        vectors: (N, D) unit rows (not normalised here), numpy or torch.
        ids: (N,) item ids, unique.
        allowed: (N,) bool, rows that may be returned; default all.
        backend: "faiss" or "torch"; default faiss when installed.

    Example::

        index = ExactIndex.from_embeddings(load_item_embeddings("items/"), "fused")
        scores, rows = index.search(queries, k=10, exclude=[history_rows])  # (Q, 10) each
        index.ids_of(rows)
    """

    def __init__(self, vectors: Matrix, ids: Sequence[str], allowed: Optional[Union[np.ndarray, torch.Tensor]] = None,
                 backend: Optional[Backend] = None) -> None:
        faiss = _faiss()
        backend = backend or ("faiss" if faiss is not None else "torch")
        if backend not in ("faiss", "torch"):
            raise ValueError(f"backend {backend!r}: use 'faiss' or 'torch'")
        if backend == "faiss" and faiss is None:
            raise ImportError("backend 'faiss' needs faiss: pip install faiss-cpu (or leave backend unset for torch)")
        vectors = as_matrix(vectors, "vectors")
        self.backend, self.dim = backend, vectors.shape[1]
        self.ids: List[str] = []
        self._known: set = set()
        self._rows = np.zeros(0, dtype=np.int64)  # stored position -> row
        self._faiss = faiss.IndexFlatIP(self.dim) if backend == "faiss" else None
        self._stored = torch.zeros(0, self.dim)  # torch backend: the allowed rows, (n, D)
        self.add(vectors, ids, allowed)

    @classmethod
    def from_embeddings(cls, emb: "ItemEmbeddings", modality: str = "fused",
                        backend: Optional[Backend] = None) -> "ExactIndex":
        """An index over ``emb.vectors[modality]``; rows whose mask is False are never returned."""
        if modality not in emb.vectors:
            raise KeyError(f"no {modality!r} vectors; these embeddings hold {sorted(emb.vectors)}")
        return cls(emb.vectors[modality], emb.ids, allowed=emb.masks[modality], backend=backend)

    def add(self, vectors: Matrix, ids: Sequence[str],
            allowed: Optional[Union[np.ndarray, torch.Tensor]] = None) -> None:
        """Append rows (numbered after the existing ones); ``allowed`` as in the constructor. An id
        already present is a ``ValueError``: build a new index from ``append_item_embeddings``."""
        vectors = as_matrix(vectors, "vectors")
        ids = list(ids)
        if vectors.shape != (len(ids), self.dim):
            raise ValueError(f"vectors {vectors.shape} for {len(ids)} ids of dim {self.dim}")
        if isinstance(allowed, torch.Tensor):
            allowed = allowed.cpu().numpy()
        allowed = np.ones(len(ids), dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool)
        if allowed.shape != (len(ids),):
            raise ValueError(f"allowed {allowed.shape} for {len(ids)} ids")
        repeated = self._known.intersection(ids)
        if repeated or len(set(ids)) != len(ids):
            raise ValueError(f"ids already in the index or repeated: {sorted(repeated)[:5] or 'within the new ids'}; "
                             f"merge with append_item_embeddings and build a new index")
        kept = vectors[allowed]  # (n, D), a new contiguous array
        if self._faiss is not None:
            self._faiss.add(kept)
        else:
            self._stored = torch.cat([self._stored, torch.from_numpy(kept)])
        self._rows = np.concatenate([self._rows, len(self.ids) + np.flatnonzero(allowed)])
        self.ids.extend(ids)
        self._known.update(ids)

    def search(self, queries: Matrix, k: int,
               exclude: Optional[Sequence[Sequence[int]]] = None) -> Tuple[np.ndarray, np.ndarray]:
        """The ``k`` best allowed rows of each query, best first.

        Args:
            queries: (Q, D), unit rows for cosine scores; converted to float32, C-contiguous.
            k: results per query.
            exclude: per query, rows never to return (a user's history, the query item itself).
        Returns:
            (scores (Q, k) float32, rows (Q, k) int64). Each query gets k rows whenever that many
            allowed, non-excluded rows exist; the rest is padded with row -1 and score -inf.
        """
        queries = as_matrix(queries, "queries")
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries have dim {queries.shape[1]}, the index {self.dim}")
        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        if exclude is not None and len(exclude) != len(queries):
            raise ValueError(f"exclude has {len(exclude)} lists for {len(queries)} queries")
        # Fetch enough that k remain after dropping every excluded row.
        extra = max((len(rows) for rows in exclude), default=0) if exclude is not None else 0
        fetch = min(k + extra, len(self._rows))
        scores, positions = self._search(queries, fetch)  # (Q, fetch) each
        found = np.where(positions >= 0, self._rows[np.maximum(positions, 0)], -1)  # (Q, fetch) rows
        keep = found >= 0  # (Q, fetch)
        for q, rows in enumerate(exclude or []):
            if len(rows):
                keep[q] &= ~np.isin(found[q], np.asarray(rows, dtype=np.int64))
        # The kept results first, each group in score order (a stable sort keeps the ranking).
        order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
        rows_out = np.full((len(queries), k), -1, dtype=np.int64)
        scores_out = np.full((len(queries), k), PAD_SCORE, dtype=np.float32)
        rows_out[:, :order.shape[1]] = np.take_along_axis(np.where(keep, found, -1), order, axis=1)
        scores_out[:, :order.shape[1]] = np.take_along_axis(np.where(keep, scores, PAD_SCORE), order, axis=1)
        return scores_out, rows_out

    def _search(self, queries: np.ndarray, fetch: int) -> Tuple[np.ndarray, np.ndarray]:
        """(scores (Q, fetch) float32, stored positions (Q, fetch) int64, -1 for none), best first."""
        if fetch == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        if self._faiss is not None:
            return self._faiss.search(queries, fetch)
        scores, positions = [], []
        for start in range(0, len(queries), QUERY_CHUNK):
            chunk = torch.from_numpy(queries[start:start + QUERY_CHUNK])  # (c, D)
            best = torch.zeros(len(chunk), 0)  # (c, <= fetch) running best scores
            where = torch.zeros(len(chunk), 0, dtype=torch.long)  # their positions
            for first in range(0, len(self._stored), ROW_CHUNK):
                block = chunk @ self._stored[first:first + ROW_CHUNK].T  # (c, r)
                top, at = block.topk(min(fetch, block.shape[1]), dim=1)
                best, where = torch.cat([best, top], dim=1), torch.cat([where, at + first], dim=1)
                best, pick = best.topk(min(fetch, best.shape[1]), dim=1)
                where = where.gather(1, pick)
            scores.append(best.numpy())
            positions.append(where.numpy())
        return np.concatenate(scores), np.concatenate(positions)

    def ids_of(self, rows: Union[np.ndarray, Sequence[Sequence[int]]]) -> List[List[str]]:
        """The ids of ``search``'s rows, one list per query; the -1 padding (always at the end) is left out."""
        return [[self.ids[r] for r in row if r >= 0] for row in np.asarray(rows, dtype=np.int64)]
