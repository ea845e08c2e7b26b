"""``align index``: a FAISS index over the item vectors of ``align embed``, with an id map, item
metadata to filter on, and its own recall measured against exact search.

    align index --embeddings runs/demo/items --out runs/demo/index \\
                [--kind auto|exact|hnsw|ivf|ivfpq|"<FAISS factory string>"] [--modality fused] \\
                [--memory-mb M] [--metadata catalogue.csv ... --fields kind,colour] [--recall-target 0.95]

Folder format ``align-index/1``::

    <out>/index.faiss    the FAISS index in FAISS's own binary format (faiss.write_index/read_index,
                         never pickle), inner-product metric over the unit vectors of one modality;
                         its int64 ids are our labels (below)
    <out>/ids.json       {"labels": [int64 label of each item], "ids": [item id], "count": N}
                         in label order; only items that can be returned
    <out>/metadata.json  {"fields": [...], "items": {item id: {field: value}}}  (values as text, written
                         by ``metadata_text``: JSON true -> "true", 10.0 -> "10"; empty ones left out)
    <out>/index.json     {"format": "align-index/1", "kind", "factory", "dim", "full_dim" (the model's
                          width; dim < full_dim for a Matryoshka prefix: --dim here or in `align
                          embed`, and queries must be cut to dim and renormalised too), "count", "modality",
                          "metric": "inner_product", "recall10", "recall_sample", "recall_target",
                          "recall_queries": [the items whose vectors measured recall10],
                          "recall_holdout": [both held-out samples' items],
                          "search_params": {"efSearch": 64} | {"nprobe": 32} | {},
                          "checkpoint", "embeddings", "build_seconds", "seed", "choice" (why this
                          kind), "next_label", "tombstones",
                          "files": {name: {"bytes", "sha256"}} of the three files above}

Each file is written atomically (a temporary file renamed over the old one), index.json last: it
holds the size and SHA-256 of the others, so ``load_index`` refuses a folder whose files come from
two builds, or a truncated or altered index.faiss (FAISS itself may read a damaged file without
noticing, or fail deep inside), with a ``RunError`` naming the file, before FAISS reads a byte.

Which index (``--kind auto``, ``choose_index``): exact search costs count x dim multiply-adds a
query; up to 2^24 of them (65k items of dim 256) it takes a few milliseconds, needs no training
and is always right, so small catalogues get ``Flat``. Above that, the first of these that fits
``--memory-mb`` (no budget: the first): ``HNSW32,Flat`` up to 2M items (the fastest at 0.95
recall in benchmarks/index_search.py; its graph is built one insertion at a time, which takes
hours beyond a few million items on a few cores), ``IVF<lists>,Flat`` (k-means trains in
minutes at any size), ``IVF<lists>,SQ8`` (1 byte a dimension), ``IVF<lists>,PQ<m>x8np`` (m bytes
an item: the only choice for a tight budget, and its recall may stay below the target, which
is then measured and printed, not hidden; ``np``: no polysemous training, which takes minutes
and serves a Hamming pre-filter we do not use). ``<lists>`` is the power of two nearest 4 sqrt(N)
(FAISS's guidance), at most N / 40 so that k-means has 40 vectors a list.

Recall and the search parameter: two seeded samples of the catalogue's own vectors (1000 each,
at most a tenth of it) are held out while the index is trained and filled, so that they are
queries the index does not hold, like a shopper's (an item searched for itself sits in the index
and is found far more easily: in a 100k-item run of benchmarks/index_search.py, an HNSW setting
with 0.955 recall on such queries had 0.91 on fresh ones). The search parameter (HNSW
``efSearch``, IVF ``nprobe``) is the smallest of a ladder whose recall on the first sample clears
the recall target (default 0.95 recall@10 against exact search) by two standard errors of that
sample's mean: a setting that only just reaches it on 1000 queries falls short on others about
half the time (at 1M items, 0.95 on the tuning sample was 0.9478 on fresh queries). When none
does, the smallest that reaches the target; else (codes too coarse) the smallest within 0.005 of
the best. recall@10 is then measured on the second sample, stored as ``recall10`` and printed,
and the held-out items are added. The parameter is stored in index.json and applied on load.

Ids: FAISS holds int64 labels (0, 1, 2, ... in the order items were added); ids.json maps them to
item ids. IVF indexes store labels themselves (with a hash-table direct map, so that vectors can be
read back and removed); other kinds sit in a ``faiss.IndexIDMap2``. ``remove`` deletes the vectors
where FAISS can (Flat, IVF); where it cannot (HNSW: a graph node cannot be taken out), the label
becomes a tombstone: the vector stays in the graph (and helps navigation), is never returned, and
is counted in index.json's ``tombstones`` until the next ``align index`` rebuild. ``add`` of an id
already present replaces its vector. Rows whose mask is False (the item lacks the modality) are
never stored, so never returned.

Filters: ``search(q, k, where={"kind": "scarf"})`` returns only items whose metadata has every
given value. A selective filter (at most ``EXACT_SUBSET_ROWS`` items match) scores the matching
items exactly (vectors read back from the index); otherwise the index is asked for more results
than k, widening the fetch until k matching items come back for every query, and a query that
still lacks them (the index ran out of candidates) falls back to exact scoring of the matching
items. Either way k items come back whenever k items match.

FAISS uses the machine's cores: OMP_NUM_THREADS when set, else every core this process may run on.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from align.errors import ConfigError, RunError, atomic_open
from align.index.index import PAD_SCORE, Matrix, as_matrix, metadata_text
from align.index.vectors import (FUSED, IDS_FILE as EMBED_IDS_FILE, TENSORS_FILE, ItemEmbeddings, load_item_embeddings,
                                 truncate_embeddings)
from align.loading import read_json
from align.model import check_prefix_dim

FORMAT = "align-index/1"
INDEX_FILE = "index.faiss"
INFO_FILE = "index.json"
IDS_FILE = "ids.json"
METADATA_FILE = "metadata.json"
KINDS = ("auto", "exact", "hnsw", "ivf", "ivfpq")
RECALL_K = 10
RECALL_TARGET = 0.95
RECALL_SAMPLE = 1000  # queries to tune on, and as many others to measure on
FLAT_MAX_WORK = 2 ** 24  # count x dim multiply-adds a query up to which exact search is the choice
HNSW_MAX = 2_000_000  # items up to which auto builds a graph (its build is insertion-bound)
HNSW_M = 32  # graph neighbours a node; 2M int32 links a vector on the bottom layer
TRAIN_PER_LIST = 40  # k-means vectors per IVF list (FAISS warns below 39)
TRAIN_MIN = 65_536  # training vectors for other trained parts (PQ and SQ codebooks)
EXACT_SUBSET_ROWS = 4096  # a filter matching at most this many items is scored exactly
SURE = 2.0  # standard errors by which the tuning sample's recall must clear the target
WIDEN = 4  # each retry of a filtered search asks for this many times more results
EF_LADDER = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
NPROBE_LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
# FAISS's memory besides the vectors' codes, bytes an item: the IndexIDMap2 id array and its
# reverse hash map; the IVF list id and its direct-map hash entry; the HNSW levels and offsets.
ID_MAP_BYTES = 8 + 48
IVF_ID_BYTES = 8 + 48
HNSW_NODE_BYTES = 2 * HNSW_M * 4 * 1.05 + 12  # bottom-layer links, upper layers (~1/M of nodes), level


def use_machine_threads() -> int:
    """Set FAISS's thread count to OMP_NUM_THREADS when set, else the cores this process may use."""
    import faiss

    text = os.environ.get("OMP_NUM_THREADS", "").strip()
    threads = int(text) if text.isdigit() and int(text) > 0 else len(os.sched_getaffinity(0))
    faiss.omp_set_num_threads(threads)
    return threads


# ------------------------------------------------------------------------------------------------
# Which index


def ivf_lists(count: int) -> int:
    """IVF list count: the power of two nearest 4 sqrt(count), at least 1, at most count / 40."""
    target = 2 ** round(math.log2(max(4 * math.sqrt(max(count, 1)), 1)))
    while target > 1 and target * TRAIN_PER_LIST > count:
        target //= 2
    return max(target, 1)


def pq_bytes_ladder(dim: int) -> List[int]:
    """PQ code sizes (bytes an item) for ``dim``: sub-vectors of 2, 4, 8, 16 dimensions, largest first."""
    return [dim // sub for sub in (2, 4, 8, 16) if dim % sub == 0] or [1]


def estimate_bytes(factory: str, count: int, dim: int) -> float:
    """FAISS memory of ``factory`` over ``count`` vectors of ``dim`` (our factories only; see ID_MAP_BYTES)."""
    if factory == "Flat":
        return count * (4 * dim + ID_MAP_BYTES)
    if factory.startswith("HNSW"):
        return count * (4 * dim + HNSW_NODE_BYTES + ID_MAP_BYTES)
    lists = int(factory.split(",")[0][3:])
    centroids = lists * dim * 4
    code = factory.split(",")[1]
    if code == "Flat":
        return count * (4 * dim + IVF_ID_BYTES) + centroids
    if code == "SQ8":
        return count * (dim + IVF_ID_BYTES) + centroids + 2 * dim * 4
    m = int(code[2:].split("x")[0])
    return count * (m + IVF_ID_BYTES) + centroids + 256 * dim * 4


def choose_index(count: int, dim: int, memory_mb: Optional[float] = None) -> Tuple[str, str]:
    """``--kind auto``: (FAISS factory string, why), by the rule in the module docstring."""
    budget = math.inf if memory_mb is None else memory_mb * 2 ** 20
    lists = ivf_lists(count)
    if count * dim <= FLAT_MAX_WORK and estimate_bytes("Flat", count, dim) <= budget:
        return "Flat", (f"{count} x {dim} = {count * dim} multiply-adds a query (<= 2^24): exact search is fast "
                        f"enough, needs no training and is always right")
    ladder = ([f"HNSW{HNSW_M},Flat"] if count <= HNSW_MAX else [])
    ladder += [f"IVF{lists},Flat", f"IVF{lists},SQ8"] + [f"IVF{lists},PQ{m}x8np" for m in pq_bytes_ladder(dim)]
    too_many = f" (> {HNSW_MAX}: a graph would take hours to build)" if count > HNSW_MAX else ""
    why = {"HNSW": f"{count} items (<= {HNSW_MAX}): a graph gives the most queries a second at high recall",
           "IVF": f"{count} items{too_many}"}
    for factory in ladder:
        size = estimate_bytes(factory, count, dim)
        if size <= budget:
            reason = why["HNSW" if factory.startswith("HNSW") else "IVF"]
            if factory != ladder[0]:
                reason += f"; the first that fits --memory-mb {memory_mb:g} (~{size / 2 ** 20:.0f} MB)"
            return factory, reason
    smallest = estimate_bytes(ladder[-1], count, dim) / 2 ** 20
    raise ConfigError(f"--memory-mb {memory_mb:g}: even {ladder[-1]} needs ~{smallest:.0f} MB for {count} vectors "
                      f"of dim {dim}; give more memory or index fewer items")


def resolve_kind(kind: str, count: int, dim: int, memory_mb: Optional[float] = None) -> Tuple[str, str, str]:
    """(kind name, FAISS factory string, why) for ``--kind``: one of KINDS or a factory string."""
    lists = ivf_lists(count)
    if kind == "auto":
        factory, why = choose_index(count, dim, memory_mb)
        return kind_of(factory), factory, "auto: " + why
    if kind == "exact":
        return "exact", "Flat", "asked for exact search"
    if kind == "hnsw":
        return "hnsw", f"HNSW{HNSW_M},Flat", "asked for a graph"
    if kind == "ivf":
        return "ivf", f"IVF{lists},Flat", "asked for IVF over the full vectors"
    if kind == "ivfpq":
        ladder = pq_bytes_ladder(dim)
        if memory_mb is None:  # 4 dimensions a byte: 16 times smaller than float32
            m = ([m for m in ladder if m <= max(dim // 4, 1)] or ladder[-1:])[0]
        else:  # the largest code that fits
            fitting = [m for m in ladder if estimate_bytes(f"IVF{lists},PQ{m}x8np", count, dim) <= memory_mb * 2 ** 20]
            if not fitting:
                raise ConfigError(f"--memory-mb {memory_mb:g}: even IVF{lists},PQ{ladder[-1]}x8np does not fit {count} "
                                  f"vectors of dim {dim}; give more memory")
            m = fitting[0]
        return "ivfpq", f"IVF{lists},PQ{m}x8np", f"asked for IVF with product quantisation ({m} bytes an item)"
    check_factory(kind, dim)
    return kind_of(kind), kind, "asked for this FAISS factory string"


def kind_of(factory: str) -> str:
    """A short name for a factory string: exact, hnsw, ivf, ivfsq8, ivfpq, or custom."""
    parts = factory.split(",")
    if factory == "Flat":
        return "exact"
    if parts[0].startswith("HNSW"):
        return "hnsw"
    if parts[0].startswith("IVF") and len(parts) == 2:
        return {"Flat": "ivf", "SQ8": "ivfsq8"}.get(parts[1], "ivfpq" if parts[1].startswith("PQ") else "custom")
    return "custom"


def check_factory(factory: str, dim: int, key: str = "--kind") -> None:
    """A ``ConfigError`` naming ``key`` unless FAISS can make ``factory`` for vectors of ``dim``
    (nothing is trained)."""
    import faiss

    if factory.split(",")[0].startswith("IDMap"):
        raise ConfigError(f"{key} {factory!r}: leave out IDMap; the index keeps its own id map")
    try:
        faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        first = str(error).strip().split("Error: ")[-1][:200]  # FAISS's own words, without its source location
        raise ConfigError(f"{key} {factory!r}: not a FAISS factory string for dim {dim} ({first}); use one of "
                          f"{', '.join(KINDS)} or e.g. 'HNSW32,Flat', 'IVF1024,PQ32x8'") from None


# ------------------------------------------------------------------------------------------------
# The index


def _file_record(path: str) -> Dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return {"bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def _write_json(data: Any, path: str, indent: Optional[int] = None) -> Dict[str, Any]:
    """``data`` as JSON at ``path``, atomically; its size and SHA-256."""
    raw = json.dumps(data, indent=indent).encode("utf-8") + b"\n"
    with atomic_open(path, "wb") as handle:
        handle.write(raw)
    return {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}


def stored_metadata(values: Dict[str, Any]) -> Dict[str, str]:
    """{field: value} as the index keeps it: each value in its one text form (``metadata_text``),
    empty ones left out."""
    texts = {field: metadata_text(value) for field, value in values.items()}
    return {field: text for field, text in texts.items() if text is not None}


class CatalogueIndex:
    """A FAISS index over a catalogue's item vectors, with item ids, metadata and its measured recall.

    Attributes:
        kind: "exact", "hnsw", "ivf", "ivfsq8", "ivfpq" or "custom".
        factory: the FAISS factory string it was built from.
        dim: vector dimension. modality: the embeddings' modality ("fused", "text", ...).
        checkpoint: the model folder that made the vectors (None when unknown).
        recall10: recall@10 against exact search measured at build (1.0 for exact; None if unmeasured).
        info: everything index.json holds.

    Build with ``build_index``, read with ``load_index`` / ``open_index``. Example::

        index = open_index("runs/demo/index")
        scores, ids = index.search(query_vectors, k=10, where={"kind": "ring"})  # (Q, 10), Q lists
    """

    def __init__(self, faiss_index: Any, labels: np.ndarray, ids: Sequence[str],
                 metadata: Optional[Dict[str, Dict[str, str]]], info: Dict[str, Any]) -> None:
        self._index = faiss_index
        self.info = info
        next_label = int(info.get("next_label", int(labels.max()) + 1 if len(labels) else 0))
        self._ids: List[Optional[str]] = [None] * next_label  # label -> item id; None: removed
        self._live = np.zeros(next_label, dtype=bool)  # (L,) labels that may be returned
        for label, item in zip(labels.tolist(), ids):
            self._ids[label] = item
        self._live[labels] = True
        self._label_of: Dict[str, int] = {item: int(label) for label, item in zip(labels.tolist(), ids)}
        self._metadata: Dict[str, Dict[str, str]] = {item: dict(values) for item, values in (metadata or {}).items()
                                                     if item in self._label_of}
        self.fields: List[str] = list(info.get("fields") or sorted({f for v in self._metadata.values() for f in v}))
        self._postings: Dict[str, Dict[str, np.ndarray]] = {}  # field -> value -> labels, built when filtered on
        self._can_remove: Optional[bool] = None  # learned at the first remove
        self.apply_search_params(info.get("search_params") or {})

    # -- attributes of the contract
    kind = property(lambda self: self.info["kind"])
    factory = property(lambda self: self.info["factory"])
    dim = property(lambda self: int(self.info["dim"]))
    modality = property(lambda self: self.info["modality"])
    checkpoint = property(lambda self: self.info.get("checkpoint"))
    recall10 = property(lambda self: self.info.get("recall10"))

    def __len__(self) -> int:
        return len(self._label_of)

    @property
    def ids(self) -> List[str]:
        """The items that can be returned, in label (insertion) order."""
        return [item for item in self._ids if item is not None]

    @property
    def tombstones(self) -> int:
        """Vectors still inside FAISS that are never returned (removed from an index that cannot remove)."""
        return int(self._index.ntotal) - len(self)

    def apply_search_params(self, params: Dict[str, int]) -> None:
        """Set FAISS search parameters (``{"efSearch": 64}``, ``{"nprobe": 32}``) on the index."""
        import faiss

        space = faiss.ParameterSpace()
        for name, value in params.items():
            space.set_index_parameter(self._index, name, int(value))
        self.info["search_params"] = {name: int(value) for name, value in params.items()}

    def metadata_of(self, item_id: str) -> Dict[str, str]:
        """The item's metadata fields (empty values left out); a ``KeyError`` for an id not in the index."""
        if item_id not in self._label_of:
            raise KeyError(f"{item_id!r} is not in the index")
        return dict(self._metadata.get(item_id, {}))

    # -- search

    def search(self, queries: Matrix, k: int, where: Optional[Dict[str, str]] = None
               ) -> Tuple[np.ndarray, List[List[str]]]:
        """The ``k`` best items of each query, best first.

        Args:
            queries: (Q, D) unit rows, numpy or torch (converted to float32, C-contiguous).
            k: results per query.
            where: field -> value that every returned item's metadata must equal (compared as
                ``metadata_text`` writes it: True matches a catalogue's true, 10 its 10.0).
        Returns:
            (scores (Q, k) float32, padded with -inf; ids: Q lists of at most k item ids). Every
            list has k ids whenever k items match ``where``.
        """
        queries = self._queries(queries)
        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        scores, labels = self.search_labels(queries, k, self._matching(where))
        return scores, [[self._ids[label] for label in row if label >= 0] for row in labels]

    def _queries(self, queries: Matrix) -> np.ndarray:
        queries = as_matrix(queries, "queries")
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries have dim {queries.shape[1]}, the index {self.dim}")
        return queries

    def _matching(self, where: Optional[Dict[str, str]]) -> Optional[np.ndarray]:
        """(L,) bool: the live labels whose metadata has every value of ``where``; None: no filter."""
        if not where:
            return None
        allowed = self._live.copy()
        for field, value in where.items():
            if field not in self.fields:
                raise ValueError(f"no field {field!r} in this index's metadata; it holds {self.fields} "
                                 f"(align index --metadata ... --fields ...)")
            if field not in self._postings:
                postings: Dict[str, List[int]] = {}
                for item, values in self._metadata.items():
                    if field in values:
                        postings.setdefault(values[field], []).append(self._label_of[item])
                self._postings[field] = {v: np.asarray(rows, dtype=np.int64) for v, rows in postings.items()}
            has = np.zeros_like(allowed)
            # the stored text form: where={"in_stock": True} matches a catalogue's JSON true
            has[self._postings[field].get(metadata_text(value), np.zeros(0, dtype=np.int64))] = True
            allowed &= has
        return allowed

    def search_labels(self, queries: np.ndarray, k: int,
                      allowed: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
        """(scores (Q, k) float32, labels (Q, k) int64), best first, -inf / -1 padded: the k best
        live labels (of ``allowed`` (L,) bool, when given) of each float32 (Q, D) query."""
        allowed = self._live if allowed is None else allowed
        count = int(allowed.sum())
        scores = np.full((len(queries), k), PAD_SCORE, dtype=np.float32)
        labels = np.full((len(queries), k), -1, dtype=np.int64)
        if count == 0 or len(queries) == 0:
            return scores, labels
        if count <= EXACT_SUBSET_ROWS and count < len(self):  # a selective filter: score its items exactly
            return self._score_subset(queries, k, np.flatnonzero(allowed))
        stored = int(self._index.ntotal)
        want = min(k, count)
        # Expect count / stored of the results to be allowed: ask for enough that k are, and more.
        fetch = k if count == stored else min(stored, math.ceil(2 * k * stored / count) + 8)
        pending = np.arange(len(queries))
        while len(pending):
            found_scores, found = self._index.search(queries[pending], fetch)  # (P, fetch) each
            ok = (found >= 0) & allowed[np.maximum(found, 0)]
            done = ok.sum(axis=1) >= want
            order = np.argsort(~ok, axis=1, kind="stable")[:, :k]  # allowed results first, ranks kept
            picked = np.take_along_axis(np.where(ok, found, -1), order, axis=1)
            picked_scores = np.take_along_axis(np.where(ok, found_scores, PAD_SCORE), order, axis=1)
            labels[pending[done], :picked.shape[1]] = picked[done]
            scores[pending[done], :picked.shape[1]] = picked_scores[done]
            # The index had no more to give (-1 padding) or gave all it holds: score exactly.
            spent = ~done & ((found < 0).any(axis=1) | (fetch >= stored))
            if spent.any():
                rows = pending[spent]
                scores[rows], labels[rows] = self._score_subset(queries[rows], k, np.flatnonzero(allowed))
            pending = pending[~done & ~spent]
            fetch = min(stored, fetch * WIDEN)
        return scores, labels

    def _score_subset(self, queries: np.ndarray, k: int, subset: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Exact top k of ``subset`` (labels) for each query, scoring the vectors read back from the
        index (for PQ and SQ codes: their decoded approximations, as the index scores them)."""
        best_scores = np.full((len(queries), 0), PAD_SCORE, dtype=np.float32)
        best = np.zeros((len(queries), 0), dtype=np.int64)
        for start in range(0, len(subset), 65536):
            chunk = subset[start:start + 65536]
            vectors = self._index.reconstruct_batch(chunk)  # (c, D)
            block = queries @ vectors.T  # (Q, c)
            best_scores = np.concatenate([best_scores, block], axis=1)
            best = np.concatenate([best, np.broadcast_to(chunk, block.shape)], axis=1)
            if best.shape[1] > k:
                top = np.argpartition(-best_scores, k - 1, axis=1)[:, :k]
                best_scores, best = np.take_along_axis(best_scores, top, 1), np.take_along_axis(best, top, 1)
        order = np.argsort(-best_scores, axis=1, kind="stable")
        scores = np.full((len(queries), k), PAD_SCORE, dtype=np.float32)
        labels = np.full((len(queries), k), -1, dtype=np.int64)
        scores[:, :best.shape[1]] = np.take_along_axis(best_scores, order, 1)
        labels[:, :best.shape[1]] = np.take_along_axis(best, order, 1)
        return scores, labels

    # -- changes without a rebuild

    def add(self, vectors: Matrix, ids: Sequence[str], metadata: Optional[Dict[str, Dict[str, str]]] = None,
            present: Optional[Union[np.ndarray, torch.Tensor]] = None) -> None:
        """Add items; an id already in the index has its vector (and metadata) replaced.

        Args:
            vectors: (M, D) unit rows, numpy or torch.
            ids: (M,) item ids, unique.
            metadata: item id -> {field: value} for (some of) the new items; values are kept as
                ``metadata_text`` writes them (True as "true", 10.0 as "10"), empty ones left out.
            present: (M,) bool, rows that hold a real vector (an ``align embed`` mask); the others
                are not stored (and an id already present with such a row is removed).
        """
        vectors = as_matrix(vectors, "vectors")
        ids = list(ids)
        if vectors.shape != (len(ids), self.dim):
            raise ValueError(f"vectors {vectors.shape} for {len(ids)} ids of dim {self.dim}")
        if len(set(ids)) != len(ids) or not all(isinstance(item, str) for item in ids):
            raise ValueError("ids must be unique strings")
        if not np.isfinite(vectors).all():
            bad = ids[int(np.flatnonzero(~np.isfinite(vectors).all(axis=1))[0])]
            raise ValueError(f"vector of {bad!r} is not finite")
        if isinstance(present, torch.Tensor):
            present = present.cpu().numpy()
        keep = np.ones(len(ids), dtype=bool) if present is None else np.asarray(present, dtype=bool)
        replaced = [item for item in ids if item in self._label_of]
        if replaced:
            self.remove(replaced)
        kept_ids = [item for item, has in zip(ids, keep.tolist()) if has]
        first = len(self._ids)
        labels = np.arange(first, first + len(kept_ids), dtype=np.int64)
        self._index.add_with_ids(np.ascontiguousarray(vectors[keep]), labels)
        self._ids.extend(kept_ids)
        self._live = np.concatenate([self._live, np.ones(len(kept_ids), dtype=bool)])
        self._label_of.update(zip(kept_ids, labels.tolist()))
        for item in kept_ids:
            values = stored_metadata((metadata or {}).get(item, {}))
            if values:
                self._metadata[item] = values
                self.fields += [f for f in values if f not in self.fields]
        self._changed()

    def remove(self, ids: Sequence[str]) -> None:
        """Take items out without a rebuild (FAISS deletes them, or they become tombstones; see the
        module docstring). An id not in the index is a ``KeyError``."""
        import faiss

        unknown = [item for item in ids if item not in self._label_of]
        if unknown:
            raise KeyError(f"not in the index: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
        labels = np.ascontiguousarray([self._label_of[item] for item in ids], dtype=np.int64)
        if self._can_remove is not False and len(labels):
            # IVF's hash-table direct map removes only through an id array; IndexIDMap2 asks each
            # stored id whether to go, which a batch (hash set) answers in O(1).
            selector = (faiss.IDSelectorArray(len(labels), faiss.swig_ptr(labels))
                        if faiss.try_extract_index_ivf(self._index) is not None else faiss.IDSelectorBatch(labels))
            try:
                self._index.remove_ids(selector)
                self._can_remove = True
            except RuntimeError:  # HNSW: graph nodes stay; the labels become tombstones
                self._can_remove = False
        for item, label in zip(ids, labels.tolist()):
            self._ids[label] = None
            del self._label_of[item]
            self._metadata.pop(item, None)
        self._live[labels] = False
        self._changed()

    def _changed(self) -> None:
        self._postings = {}
        self.info.update(count=len(self), next_label=len(self._ids), tombstones=self.tombstones, fields=self.fields)

    # -- files

    def save(self, folder: str) -> None:
        """Write the folder (format in the module docstring); each file atomically, index.json last."""
        import faiss

        os.makedirs(folder, exist_ok=True)
        files = {}
        with atomic_open(os.path.join(folder, INDEX_FILE), "wb") as handle:  # FAISS writes by name
            faiss.write_index(self._index, handle.name)
            files[INDEX_FILE] = _file_record(handle.name)
        labels = np.flatnonzero(self._live)
        files[IDS_FILE] = _write_json({"labels": labels.tolist(), "ids": [self._ids[i] for i in labels.tolist()],
                                       "count": len(labels)}, os.path.join(folder, IDS_FILE))
        files[METADATA_FILE] = _write_json({"fields": self.fields, "items": self._metadata},
                                           os.path.join(folder, METADATA_FILE))
        self._changed()
        _write_json({**self.info, "files": files}, os.path.join(folder, INFO_FILE), indent=1)


# ------------------------------------------------------------------------------------------------
# Building, measuring, loading


def _faiss_index(factory: str, dim: int, count: int, seed: int) -> Any:
    """A FAISS index for ``factory`` (inner product) that stores our int64 labels itself."""
    import faiss

    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.seed = seed  # k-means initialisation
        if isinstance(faiss.downcast_index(index), (faiss.IndexIVF, faiss.IndexPreTransform)):
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # labels -> entries: read back, remove
            return index
    return faiss.IndexIDMap2(index)


def _train(index: Any, vectors: np.ndarray, seed: int) -> None:
    import faiss

    if index.is_trained:
        return
    ivf = faiss.try_extract_index_ivf(index)
    rows = max(TRAIN_PER_LIST * (ivf.nlist if ivf is not None else 0), TRAIN_MIN)
    sample = vectors
    if len(vectors) > rows:
        sample = vectors[np.sort(np.random.default_rng(seed).choice(len(vectors), rows, replace=False))]
    try:
        index.train(np.ascontiguousarray(sample))
    except RuntimeError as error:
        raise RunError(f"training {index.__class__.__name__} on {len(sample)} vectors failed: "
                       f"{str(error).strip().splitlines()[-1][:200]}; use a smaller index for this catalogue") from None


def _knob(index: Any) -> Tuple[Optional[str], Sequence[int]]:
    """The search parameter that trades speed for recall, and the values to try, smallest first."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return "nprobe", [p for p in NPROBE_LADDER if p < ivf.nlist] + [ivf.nlist]
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    if isinstance(inner, faiss.IndexHNSW):
        return "efSearch", EF_LADDER
    return None, ()


def query_recalls(found: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(Q,) |found_q ∩ truth_q| / |truth_q| for rows of labels (-1 padding ignored)."""
    return np.array([len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist())) / max(int((t >= 0).sum()), 1)
                     for f, t in zip(found, truth)], dtype=np.float64)


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found_q ∩ truth_q| / |truth_q| (rows of labels, -1 padding ignored)."""
    hits = query_recalls(found, truth)
    return float(hits.mean()) if len(hits) else 1.0


def holdout_rows(count: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(tune rows, measure rows): two disjoint seeded samples of the catalogue's rows, each
    ``RECALL_SAMPLE`` (at most a tenth of the catalogue; none below 20 items), sorted."""
    size = min(RECALL_SAMPLE, count // 10) if count >= 20 else 0
    order = np.random.default_rng([seed, 1]).permutation(count)
    return np.sort(order[:size]), np.sort(order[size:2 * size])


def _tune_and_measure(index: CatalogueIndex, vectors: np.ndarray, held: np.ndarray, tune_rows: np.ndarray,
                      measure_rows: np.ndarray, target: float) -> Dict[str, Any]:
    """Pick the search parameter on one held-out sample, measure recall@10 on the other (module
    docstring). ``index`` holds every row of ``vectors`` but ``held``, labelled 0, 1, ... in row order."""
    import faiss

    kept = np.flatnonzero(~np.isin(np.arange(len(vectors)), held))  # label -> row
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors[kept])
    _, truth = exact.search(vectors[np.concatenate([tune_rows, measure_rows])], RECALL_K)  # (2S, 10) labels
    tune_truth, measure_truth = truth[:len(tune_rows)], truth[len(tune_rows):]

    def recalls(rows: np.ndarray, against: np.ndarray) -> np.ndarray:
        return query_recalls(index.search_labels(vectors[rows], RECALL_K)[1], against)

    knob, ladder = _knob(index._index)
    tried: List[Tuple[int, float, float]] = []  # (value, tuning recall, its lower bound), smallest value first
    for value in ladder:
        index.apply_search_params({knob: value})
        hits = recalls(tune_rows, tune_truth)  # (S,)
        tried.append((value, float(hits.mean()), float(hits.mean() - SURE * hits.std() / math.sqrt(len(hits)))))
        if tried[-1][2] >= target:
            break
        if len(tried) > 3 and max(r for _, r, _ in tried[-3:]) <= max(r for _, r, _ in tried[:-3]) + 0.002:
            break  # a plateau below the target (codes too coarse): more probes only cost time
    params: Dict[str, int] = {}
    if tried:
        best = max(r for _, r, _ in tried)
        reached = ([v for v, _, low in tried if low >= target] or [v for v, r, _ in tried if r >= target]
                   or [v for v, r, _ in tried if r >= best - 0.005])
        params = {knob: reached[0]}
    index.apply_search_params(params)
    measured = float(recalls(measure_rows, measure_truth).mean())
    return {"recall10": round(measured, 4), "recall_sample": int(len(measure_rows)), "recall_target": target,
            "recall_target_met": bool(measured >= target),
            "tune_recall10": round({v: r for v, r, _ in tried}[params[knob]], 4) if tried else None,
            "search_params": params}


def build_index(emb: ItemEmbeddings, kind: str = "auto", modality: str = FUSED, memory_mb: Optional[float] = None,
                metadata: Optional[Dict[str, Dict[str, str]]] = None, seed: int = 0,
                recall_target: float = RECALL_TARGET, measure: bool = True) -> CatalogueIndex:
    """A FAISS index over ``emb.vectors[modality]`` (rows whose mask is False left out).

    With ``measure``, two seeded samples of the items are held out while the index is trained and
    filled: one tunes the search parameter, the other measures recall@10 (queries the index does
    not hold, as a shopper's are); then they are added. index.json names both (``recall_holdout``,
    ``recall_queries``), so the figure can be checked.

    Args:
        emb: ``align embed`` vectors (``load_item_embeddings``).
        kind: "auto" | "exact" | "hnsw" | "ivf" | "ivfpq" | a FAISS factory string ("IVF1024,PQ32x8").
        modality: which vectors to index.
        memory_mb: FAISS memory budget for ``auto`` and ``ivfpq``; None: no limit.
        metadata: item id -> {field: value} to filter on (``search(where=...)``), kept as
            ``metadata_text`` writes each value.
        seed: training sample, k-means start and the recall samples.
        recall_target: recall@10 the search parameter is tuned to reach (module docstring).
        measure: tune and measure recall (False: none of it; for exact search over a folder).
    Raises:
        ConfigError for an unknown modality or kind, or a budget nothing fits;
        RunError when FAISS cannot train the index on these vectors.
    """
    start = time.perf_counter()
    threads = use_machine_threads()
    if modality not in emb.vectors:
        raise ConfigError(f"--modality {modality!r}: these embeddings hold {sorted(emb.vectors)}")
    if not 0 < recall_target <= 1:
        raise ConfigError(f"recall target {recall_target}: must be in (0, 1]")
    mask = emb.masks[modality].bool().numpy()  # (N,)
    vectors = np.ascontiguousarray(emb.vectors[modality].float().numpy()[mask])  # (n, D) real rows only
    ids = [item for item, has in zip(emb.ids, mask.tolist()) if has]
    count, dim = vectors.shape
    name, factory, why = resolve_kind(kind, count, dim, memory_mb)
    tune_rows, measure_rows = holdout_rows(count, seed) if measure else (np.zeros(0, np.int64),) * 2
    held = np.concatenate([tune_rows, measure_rows])
    kept = np.flatnonzero(~np.isin(np.arange(count), held))  # (n - 2S,) rows indexed first
    index = _faiss_index(factory, dim, count, seed)
    _train(index, np.ascontiguousarray(vectors[kept]), seed)
    labels = np.arange(len(kept), dtype=np.int64)
    index.add_with_ids(np.ascontiguousarray(vectors[kept]), labels)
    # full_dim: the model's width; dim < full_dim when the vectors are a Matryoshka prefix (--dim),
    # and a query must then be cut to dim and renormalised in the same way.
    info = {"format": FORMAT, "kind": name, "factory": factory, "choice": why, "dim": dim,
            "full_dim": int(emb.metadata.get("full_dim") or dim), "count": len(kept),
            "modality": modality, "metric": "inner_product", "recall10": 1.0 if factory == "Flat" else None,
            "recall_sample": 0, "recall_target": recall_target, "search_params": {},
            "checkpoint": emb.metadata.get("checkpoint"), "embeddings": None,
            "seed": seed, "threads": threads, "next_label": len(kept), "tombstones": 0}
    metadata = {item: stored_metadata(values) for item, values in (metadata or {}).items()}  # as add keeps them
    catalogue = CatalogueIndex(index, labels, [ids[r] for r in kept.tolist()], metadata, info)
    if len(held):
        info.update(_tune_and_measure(catalogue, vectors, held, tune_rows, measure_rows, recall_target),
                    recall_queries=[ids[r] for r in measure_rows.tolist()],
                    recall_holdout=[ids[r] for r in held.tolist()])
        catalogue.add(vectors[held], [ids[r] for r in held.tolist()], metadata)
    info["build_seconds"] = round(time.perf_counter() - start, 2)
    return catalogue


def load_index(folder: str) -> CatalogueIndex:
    """The index ``align index`` wrote into ``folder``. A missing, altered or mismatched file is a
    ``RunError`` naming it, found before FAISS reads anything (sizes and SHA-256 in index.json)."""
    import faiss

    info_path = os.path.join(folder, INFO_FILE)
    if not os.path.isfile(info_path):
        raise RunError(f"{info_path}: missing; build the index with `align index`")
    info = read_json(info_path)
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        got = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise RunError(f"{info_path}: format {got!r}, expected {FORMAT!r}; build the index with `align index`")
    files = info.get("files") or {}
    for name in (INDEX_FILE, IDS_FILE, METADATA_FILE):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise RunError(f"{path}: missing; build the index again with `align index`")
        expected = files.get(name) or {}
        if os.path.getsize(path) != expected.get("bytes") or _file_record(path)["sha256"] != expected.get("sha256"):
            raise RunError(f"{path}: its size or SHA-256 differs from {info_path} (damaged, or from another build); "
                           f"build the index again with `align index`")
    use_machine_threads()
    index_path = os.path.join(folder, INDEX_FILE)
    try:
        index = faiss.read_index(index_path)
    except RuntimeError as error:
        raise RunError(f"{index_path}: FAISS cannot read it ({str(error).strip().splitlines()[-1][:200]}); "
                       f"build the index again with `align index`") from None
    ids_path = os.path.join(folder, IDS_FILE)
    listing = read_json(ids_path)
    labels = np.asarray(listing.get("labels", []) if isinstance(listing, dict) else [], dtype=np.int64)
    ids = listing.get("ids") if isinstance(listing, dict) else None
    if not isinstance(ids, list) or len(ids) != len(labels) or listing.get("count") != len(ids):
        raise RunError(f"{ids_path}: expected {{\"labels\": [...], \"ids\": [...], \"count\": N}} of equal lengths")
    if len(set(ids)) != len(ids) or len(np.unique(labels)) != len(labels) or \
            (len(labels) and (labels.min() < 0 or labels.max() >= int(info.get("next_label", 0)))):
        raise RunError(f"{ids_path}: repeated ids or labels, or labels outside 0..{info.get('next_label')}")
    if index.d != info.get("dim") or index.ntotal != len(ids) + int(info.get("tombstones", 0)) \
            or info.get("count") != len(ids):
        raise RunError(f"{index_path}: {index.ntotal} vectors of dim {index.d}, but {info_path} says "
                       f"{info.get('count')} items + {info.get('tombstones')} tombstones of dim {info.get('dim')}")
    meta_path = os.path.join(folder, METADATA_FILE)
    stored = read_json(meta_path)
    if not isinstance(stored, dict) or not isinstance(stored.get("items"), dict):
        raise RunError(f"{meta_path}: expected {{\"fields\": [...], \"items\": {{id: {{field: value}}}}}}")
    info.pop("files", None)
    try:
        return CatalogueIndex(index, labels, ids, stored["items"], {**info, "fields": stored.get("fields") or []})
    except (RuntimeError, TypeError, ValueError) as error:  # search_params FAISS does not know
        raise RunError(f"{info_path}: search_params {info.get('search_params')} cannot be applied to "
                       f"{info.get('factory')} ({str(error).strip().splitlines()[-1][:200]})") from None


def open_index(path: str) -> CatalogueIndex:
    """An ``align index`` folder, or an ``align embed`` items folder (then exact search over its
    fused vectors, built in memory, recall 1 by construction)."""
    if os.path.isfile(os.path.join(path, INFO_FILE)):
        return load_index(path)
    if os.path.isfile(os.path.join(path, TENSORS_FILE)):
        emb = load_item_embeddings(path)
        index = build_index(emb, kind="exact", measure=False)
        index.info["embeddings"] = os.path.abspath(path)
        return index
    raise RunError(f"{path}: neither an `align index` folder ({INFO_FILE}) nor an `align embed` folder "
                   f"({TENSORS_FILE})")


# ------------------------------------------------------------------------------------------------
# align index


def read_metadata(manifests: Sequence[str], fields: Optional[Sequence[str]],
                  id_column: str = "id") -> Tuple[Dict[str, Dict[str, str]], List[str]]:
    """(item id -> {field: value}, fields) from catalogue manifests (CSV, JSONL, Parquet); each
    value in its one text form (``metadata_text``: a JSON true is "true", 10.0 is "10"), empty
    ones left out. ``fields`` None: every column but the id. A missing file, or a field or id
    column a manifest lacks, is a ``ConfigError`` naming the file and column."""
    from pathlib import Path

    from align.data.manifest import read_table_rows

    metadata: Dict[str, Dict[str, str]] = {}
    chosen: List[str] = list(fields or [])
    for manifest in manifests:
        if not os.path.isfile(manifest):
            raise ConfigError(f"--metadata {manifest}: no such file")
        try:
            columns, rows = read_table_rows(Path(manifest))
        except (ValueError, OSError, ImportError) as error:
            raise ConfigError(f"--metadata {manifest}: cannot be read ({error})") from None
        if id_column not in columns:
            raise ConfigError(f"--metadata {manifest}: no id column {id_column!r} (columns: {columns}); "
                              f"name it with --id-column")
        wanted = list(fields) if fields else [c for c in columns if c != id_column]
        missing = [f for f in wanted if f not in columns]
        if missing:
            raise ConfigError(f"--fields: {manifest} has no column {missing[0]!r} (columns: {columns})")
        chosen += [f for f in wanted if f not in chosen]
        for _, row in rows:
            item = row.get(id_column)
            if item is None or str(item).strip() == "":
                continue
            values = stored_metadata({f: row.get(f) for f in wanted})
            metadata.setdefault(str(item).strip(), {}).update(values)
    return metadata, chosen


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align index", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embeddings", required=True, help="folder written by `align embed`")
    parser.add_argument("--out", required=True, help="folder for index.faiss, index.json, ids.json, metadata.json")
    parser.add_argument("--kind", default="auto", help=f"{' | '.join(KINDS)} | a FAISS factory string (default auto)")
    parser.add_argument("--modality", default=FUSED, help="which vectors to index (default fused)")
    parser.add_argument("--memory-mb", type=float, help="memory budget of the index for auto and ivfpq")
    parser.add_argument("--metadata", nargs="+", default=[], help="catalogue manifest(s) with item fields to filter on")
    parser.add_argument("--fields", help="comma-separated manifest columns to keep (default: all but the id)")
    parser.add_argument("--id-column", default="id", help="the manifests' item id column (default id)")
    parser.add_argument("--recall-target", type=float, default=RECALL_TARGET,
                        help=f"recall@10 the search parameter is tuned to reach (default {RECALL_TARGET})")
    parser.add_argument("--seed", type=int, default=0, help="samples for training and measuring recall")
    parser.add_argument("--dim", type=int, help="index the first DIM coordinates of the vectors, renormalised "
                                                "(Matryoshka; queries are cut the same way; default: all)")
    return parser


def _folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, name)) for name in (INDEX_FILE, IDS_FILE, METADATA_FILE, INFO_FILE))


def main(argv: Optional[List[str]] = None) -> int:
    """``align index``; a ``ConfigError`` or ``RunError`` is left to align/cli.py to report."""
    args = _parser().parse_args(argv)
    for name in (TENSORS_FILE, EMBED_IDS_FILE):  # every argument is checked before the vectors are read
        if not os.path.isfile(os.path.join(args.embeddings, name)):
            raise ConfigError(f"--embeddings {args.embeddings}: no {name}; give a folder written by `align embed`")
    listing = read_json(os.path.join(args.embeddings, EMBED_IDS_FILE))
    if not isinstance(listing, dict) or not isinstance(listing.get("dim"), int):
        raise RunError(f"{os.path.join(args.embeddings, EMBED_IDS_FILE)}: no dim; write the folder with `align embed`")
    known = list(listing.get("modalities") or []) + [FUSED]
    if args.modality not in known:
        raise ConfigError(f"--modality {args.modality!r}: {args.embeddings} holds {known}")
    dim = listing["dim"] if args.dim is None else check_prefix_dim(args.dim, listing["dim"])
    if args.kind not in KINDS:
        check_factory(args.kind, dim)
    if args.memory_mb is not None and not args.memory_mb > 0:
        raise ConfigError(f"--memory-mb {args.memory_mb}: must be positive")
    if not 0 < args.recall_target <= 1:
        raise ConfigError(f"--recall-target {args.recall_target}: must be in (0, 1]")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ConfigError(f"--out {args.out}: a file, not a folder")
    if os.path.isfile(os.path.join(args.out, TENSORS_FILE)):  # both folders keep their ids in ids.json
        raise ConfigError(f"--out {args.out}: holds item vectors ({TENSORS_FILE}, written by `align embed`), "
                          f"which the index's {IDS_FILE} would overwrite; give the index a folder of its own")
    fields = [f.strip() for f in args.fields.split(",") if f.strip()] if args.fields else None
    if fields is not None and not args.metadata:
        raise ConfigError("--fields names manifest columns: give the manifests with --metadata")
    metadata, fields = read_metadata(args.metadata, fields, args.id_column) if args.metadata else ({}, [])

    emb = load_item_embeddings(args.embeddings)
    if args.dim is not None:
        emb = truncate_embeddings(emb, args.dim)
    index = build_index(emb, args.kind, args.modality, args.memory_mb, metadata, args.seed, args.recall_target)
    index.info["embeddings"] = os.path.abspath(args.embeddings)
    index.info["fields"] = index.fields = fields
    index.save(args.out)
    info = index.info
    cut = "" if info["dim"] == info["full_dim"] else f" = the first of {info['full_dim']}, renormalised (Matryoshka)"
    lines = [f"built {info['kind']} index {info['factory']!r} over {info['count']} items ({args.modality}, dim "
             f"{info['dim']}{cut}; {int((~emb.masks[args.modality].bool()).sum())} without this modality left out)",
             f"  why: {info['choice']}"]
    if info["recall_sample"]:
        params = ", ".join(f"{k}={v}" for k, v in info["search_params"].items()) or "no search parameter"
        met = "" if info["recall_target_met"] else f" -- BELOW the target {info['recall_target']}"
        lines.append(f"  recall@10 {info['recall10']:.4f} against exact search ({info['recall_sample']} held-out "
                     f"catalogue items as queries, {params}; target {info['recall_target']}){met}")
    if args.metadata:
        lacking = sum(1 for item in index.ids if not index.metadata_of(item))
        lines.append(f"  metadata fields {fields} from {len(args.metadata)} manifest(s); {lacking} items have none")
    lines.append(f"  {_folder_bytes(args.out) / 2 ** 20:.1f} MB on disk, built in {info['build_seconds']:.1f} s "
                 f"on {info['threads']} threads")
    lines.append(f"  -> {os.path.join(args.out, INDEX_FILE)}, {INFO_FILE}, {IDS_FILE}, {METADATA_FILE}")
    print("\n".join(lines), flush=True)
    return 0
