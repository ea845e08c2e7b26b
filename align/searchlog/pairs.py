"""Training rows from a search log: (query, product) pairs with the query's graded products.

``data.search_log`` (``SearchLogConfig``) turns the trainer from a manifest's own pairs to a
shop's search log read against its catalogue (align/searchlog/log.py: graded, merged,
bad rows counted). A row is one query and one product:

* ``pairs: graded`` -- a row per (query, product) with a grade > 0; the row also lists the
  query's graded products (its ``max_positives`` best, grade order) so that
  ``graded_infonce`` treats every one of them in the batch as a positive of the query,
  weighted by its grade, and never as a negative.
* ``pairs: per_query`` -- a row per query, its product drawn afresh each epoch from the query's
  graded products with probability proportional to the grade (from seed, epoch and row, so a
  resumed epoch draws the same), with the same list of graded products: every query weighs the
  same in an epoch however many products it led to.
* ``pairs: best`` -- a row per query with its best product (highest grade, first in the log on
  ties): plain (query, product) pairs for ``infonce``, the baseline.

The query is encoded by its modality's tower (a typed text, a photo, a recording); the product
field by field (``model.fields``, align/fields.py), each text field its own text. Rows are
shuffled and cut into steps exactly as manifest rows are (``ManifestLoader``: seed, epoch and
rank fix the order; resume skips whole steps), so everything the trainer does with a manifest
(several processes, exactly-once resume, bad-sample counting) holds here too.

A row whose query or product media cannot be read is skipped and counted like a bad manifest
sample (``data.max_bad_fraction``); a product field whose cell is empty is simply absent.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from align.config import ColumnsConfig, Config, FieldConfig, SearchLogConfig, product_fields
from align.data.bad_samples import Skipped
from align.data.loader import ManifestLoader, worker_processor
from align.data.manifest import open_audio, open_image, read_manifest, seeded_sample
from align.data.sample import BadSample, _stack
from align.errors import ConfigError, RunError
from align.searchlog.log import EventGrades, SearchLog, read_search_log

@dataclass
class ProductTable:
    """The catalogue, field by field: ``values[field][n]`` is item n's text for a text field, or
    its media path (absolute) for an image/audio field; None where the item lacks it."""

    ids: List[str]
    fields: Dict[str, FieldConfig]
    values: Dict[str, List[Optional[str]]]
    where: List[str]


def read_products(manifests: Sequence[str], fields: Dict[str, FieldConfig], columns: ColumnsConfig,
                  root: Optional[str] = None) -> ProductTable:
    """Every item of ``manifests`` (in order) with its field values; a text field is read as the
    manifest's text with ``data.columns.text`` set to the field's columns, so it is joined exactly
    as ``align embed`` joins it."""
    ids: List[str] = []
    where: List[str] = []
    values: Dict[str, List[Optional[str]]] = {name: [] for name in fields}
    for manifest in manifests:
        base = root if root is not None else os.path.dirname(os.path.abspath(manifest))
        rows = read_manifest(manifest, columns)
        ids += [row["id"] for row in rows]
        where += [row["_where"] for row in rows]
        for name, spec in fields.items():
            if spec.modality == "text":
                texts = read_manifest(manifest, dataclasses.replace(columns, text=list(spec.columns)))
                values[name] += [row["text"] for row in texts]
            else:
                values[name] += [os.path.join(base, row[spec.modality]) if row[spec.modality] else None
                                 for row in rows]
    if len(set(ids)) != len(ids):
        raise RunError(f"data.search_log.catalogue {list(manifests)}: item ids repeat across the manifests; "
                       "each item may have one row")
    return ProductTable(ids, dict(fields), values, where)


@dataclass
class Rows:
    """The training rows: query index, product row, and the query's graded products."""

    queries: List[Any]  # align.searchlog.log.Query
    query: np.ndarray  # (R,) int64 into ``queries``
    item: np.ndarray  # (R,) int64 catalogue row of the row's product
    positives: List[Tuple[np.ndarray, np.ndarray]]  # per query: (items (P,), grades (P,)), grade order


def training_rows(log: SearchLog, pairs: str, max_positives: int) -> Rows:
    """``graded``: every (query, product) with grade > 0; ``best``: one row per query (module doc)."""
    query, item, positives = [], [], []
    for code, (_, items, grades) in enumerate(log.judgements()):
        keep = grades > 0
        items, grades = items[keep], grades[keep]
        positives.append((items[:max_positives], grades[:max_positives]))
        if not len(items):
            continue
        chosen = items[:max_positives] if pairs == "graded" else items[:1]  # per_query: redrawn per epoch
        query += [code] * len(chosen)
        item += list(chosen)
    return Rows(log.queries, np.asarray(query, dtype=np.int64), np.asarray(item, dtype=np.int64), positives)


class SearchPairsDataset(Dataset):
    """Map-style dataset of search-log rows; item ``(i, epoch)`` is row i processed (or ``Skipped``).

    Args:
        rows: ``training_rows``. products: ``read_products``.
        processor: a ``SampleProcessor`` (its per-modality preprocessors are used).
        path: the log (named in skip reports). seed: augmentations, with (epoch, row).
    """

    def __init__(self, rows: Rows, products: ProductTable, processor: Any, path: str, seed: int = 0,
                 per_query: bool = False) -> None:
        self.rows, self.products, self.processor = rows, products, processor
        self.per_query = per_query
        self.path, self.seed = path, seed
        self.preprocessors = processor.preprocessors
        missing = sorted({spec.modality for spec in products.fields.values()} - set(self.preprocessors))
        if missing:
            raise ConfigError(f"model.fields: fields need the {missing} tower(s), which the model lacks")

    def __len__(self) -> int:
        return len(self.rows.query)

    def _encode(self, modality: str, value: str, sample_id: str, where: str) -> Any:
        if modality == "image":  # data.jpeg_draft / data.image_decode, as the manifest readers
            raw = open_image(value, sample_id, where, self.processor.image_draft_side,
                             keep_jpeg=self.processor.image_keep_jpeg)
        elif modality == "audio":
            raw = open_audio(value, sample_id, where)
        else:
            raw = value
        try:
            return self.preprocessors[modality](raw)
        except Exception as error:
            raise BadSample(sample_id, f"bad_{modality}", where, repr(error)) from error

    def sample(self, index: int, epoch: int = 0) -> Dict[str, Any]:
        code, item = int(self.rows.query[index]), int(self.rows.item[index])
        if self.per_query:
            keys, grades = self.rows.positives[code]
            draw = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch, index, 0x9A1E])
            item = int(keys[draw.choice(len(keys), p=grades / grades.sum())])
        query = self.rows.queries[code]
        item_id = self.products.ids[item]
        sample_id = f"{query.key}|{item_id}"
        where = f"{self.path}: query {query.text or query.media!r}, item {item_id!r}"
        if query.modality not in self.preprocessors:
            raise BadSample(sample_id, f"no_{query.modality}_tower", where)
        value = query.text if query.modality == "text" else query.path
        fields = {}
        for name, spec in self.products.fields.items():
            cell = self.products.values[name][item]
            fields[name] = None if cell is None else self._encode(spec.modality, cell, sample_id,
                                                                   self.products.where[item])
        if all(v is None for v in fields.values()):
            raise BadSample(sample_id, "no_field", self.products.where[item])
        keys, grades = self.rows.positives[code]
        return {"id": sample_id, "text_raw": query.text or None, "query_modality": query.modality,
                "query": self._encode(query.modality, value, sample_id, where), "fields": fields,
                "item_key": item, "positive_keys": keys, "positive_grades": grades}

    def __getitem__(self, key: Any) -> Any:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        try:
            with seeded_sample((self.seed, epoch, index), self.processor):
                return self.sample(index, epoch)
        except Exception as error:  # BadSample, or a transform bug on one row: skip and count
            return Skipped.from_error(error, f"row {index}", self.path)


def collate_pairs(processed: List[Any]) -> Dict[str, Any]:
    """Processed rows -> a batch: ``inputs``/``masks`` by query modality (as a manifest batch's),
    ``fields``: {"inputs", "masks"} by product field, ``groups`` = the product's catalogue row
    (so a product present twice is never its own negative), and the relevance input of
    ``graded_infonce``: ``item_keys`` (B,), ``positive_keys`` / ``positive_grades`` (B, P), -1 / 0 padded."""
    from align.data.bad_samples import split_bad
    from align.data.sample import MODALITIES

    good, bad = split_bad(processed)
    batch: Dict[str, Any] = {"ids": [s["id"] for s in good], "texts": [s["text_raw"] for s in good],
                             "inputs": {}, "masks": {}, "fields": {"inputs": {}, "masks": {}}}
    for modality in MODALITIES:
        present = [s["query_modality"] == modality for s in good]
        batch["masks"][modality] = torch.tensor(present, dtype=torch.bool)
        if any(present):
            batch["inputs"][modality] = _stack([s["query"] for s in good if s["query_modality"] == modality])
    names = list(good[0]["fields"]) if good else []
    for name in names:
        present = [s["fields"][name] is not None for s in good]
        batch["fields"]["masks"][name] = torch.tensor(present, dtype=torch.bool)
        if any(present):
            batch["fields"]["inputs"][name] = _stack([s["fields"][name] for s in good if s["fields"][name] is not None])
    width = max([len(s["positive_keys"]) for s in good] or [1])
    keys = torch.full((len(good), width), -1, dtype=torch.long)
    grades = torch.zeros(len(good), width, dtype=torch.float32)
    for n, s in enumerate(good):
        keys[n, :len(s["positive_keys"])] = torch.as_tensor(s["positive_keys"], dtype=torch.long)
        grades[n, :len(s["positive_grades"])] = torch.as_tensor(s["positive_grades"], dtype=torch.float32)
    batch["item_keys"] = torch.tensor([s["item_key"] for s in good], dtype=torch.long)
    batch["groups"] = batch["item_keys"].clone()
    batch["positive_keys"], batch["positive_grades"] = keys, grades
    batch["bad"] = {"seen": len(processed), "skipped": bad}
    return batch


def read_training_log(config: Config) -> Tuple[SearchLog, ProductTable]:
    """The config's search log and catalogue, read and checked (bad rows over the limit raise)."""
    search: SearchLogConfig = config.data.search_log
    fields = product_fields(config.model, config.data.columns)
    if not fields:
        raise ConfigError("model.fields: the products have no field the model can encode; list model.fields")
    products = read_products(search.catalogue, fields, config.data.columns, config.data.root)
    events = EventGrades(search.events) if search.events else EventGrades()
    log, bad = read_search_log(search.log, products.ids, events, media_root=search.media_root,
                               max_bad_fraction=search.max_bad_fraction)
    if bad.n_bad or bad.n_merged:
        print(f"data.search_log: {search.log}: {bad.report()}", flush=True)
    return log, products


def search_log_loader(config: Config, processor: Any, *, rank: int = 0, world_size: int = 1,
                      pin_memory: bool = False) -> ManifestLoader:
    """The training loader of ``data.search_log``: a ``ManifestLoader`` over search-log rows
    (same order, step and resume rules as a manifest)."""
    search = config.data.search_log
    log, products = read_training_log(config)
    rows = training_rows(log, search.pairs, search.max_positives)
    if not len(rows.query):
        raise RunError(f"data.search_log.log: {search.log} has no (query, product) pair with a grade > 0")
    dataset = SearchPairsDataset(rows, products, worker_processor(processor, config.data), search.log,
                                 seed=config.train.seed, per_query=search.pairs == "per_query")
    return ManifestLoader(dataset, batch_size=config.data.batch_size, num_workers=config.data.num_workers,
                          train=True, seed=config.train.seed, rank=rank, world_size=world_size,
                          max_bad_fraction=config.data.max_bad_fraction, drop_last=True, pin_memory=pin_memory,
                          collate=collate_pairs)


