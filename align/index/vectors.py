"""The item-embeddings folder that ``align embed`` writes and retrieval, recommendation,
explanations, audits and maps read: ``ItemEmbeddings`` and its reading, writing, appending,
fusing and cutting. Nothing here is ever unpickled (safetensors and JSON only).

Folder format ``align-item-embeddings/1``::

    <out>/embeddings.safetensors
        text, image, audio   float32 (N, D)  only the modalities the model has; L2-normalised rows,
                                             zero rows where the item lacks that modality
        fused                float32 (N, D)  normalised (weighted) mean of the item's modality
                                             vectors (``fuse``); a zero row when it has none
        mask.text, ...,      bool (N,)       the row is a real embedding (the item has it)
        mask.fused
        metadata (strings)   format "align-item-embeddings/1", checkpoint (absolute path of the
                             model folder), dim "D", full_dim (only after --dim: the model's
                             embed_dim, D < full_dim), modalities "text,image,audio",
                             fusion "mean" | "weighted_mean" (then also fusion_weights "image=2,text=1")
                             | "fields" (then also fields, the checkpoint's model.fields),
                             batch_size, device ("cpu", "cuda") and torch (its version) of the
                             run that wrote them: the same three give the same vectors bit for bit;
                             after an --append with other values, each lists every value its runs
                             used ("16,8"), and the rows were not all computed alike,
                             embedded_at (JSON: absolute manifest path -> the time, ns since the
                             epoch, when the run that embedded its rows started; over appends the
                             earliest: what changed after it may not be in the vectors)
    <out>/ids.json           {"ids": [item ids in row order], "modalities": [...], "dim": D, "count": N}

Rows follow the manifests' rows, manifest after manifest in the order given; an id may appear once.
``--dim D`` (Matryoshka, Kusupati et al. 2022, https://arxiv.org/abs/2205.13147) stores every vector,
the fused one included, as the first D coordinates of its full-width vector renormalised to unit
length (``truncate_embeddings``): what a model trained with ``loss.matryoshka`` keeps usable at D.
``align index`` records the dim, so that queries are cut the same way.

Both files are written atomically (a temporary file renamed over the old one), the tensors first;
``load_item_embeddings`` refuses a pair whose counts or keys disagree.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from align.errors import MODALITIES, RunError, write_json_atomic
from align.fields import check_weights
from align.fields import fuse as fuse_fields
from align.loading import read_json, read_tensors, write_tensors
from align.model import check_prefix_dim, prefix

FORMAT = "align-item-embeddings/1"
TENSORS_FILE = "embeddings.safetensors"
IDS_FILE = "ids.json"
FUSED = "fused"
MASK = "mask."  # prefix of the mask tensors' names
RUN_KEYS = ("batch_size", "device", "torch")  # how the vectors were computed (module docstring)
EMBEDDED_AT = "embedded_at"
SHOWN_IDS = 20  # ids listed per line of a report; the masks hold every one


@dataclass
class ItemEmbeddings:
    """A catalogue's item embeddings, one row per item (format in the module docstring).

    Attributes:
        ids: item ids in row order, unique.
        vectors: modality or ``"fused"`` -> (N, D) float32; unit rows, zero rows where masked out.
        masks: modality or ``"fused"`` -> (N,) bool; True where the row is a real embedding.
        metadata: the safetensors metadata (``format``, ``checkpoint``, ``dim``, ``modalities``, ``fusion``).
    """

    ids: List[str]
    vectors: Dict[str, torch.Tensor]
    masks: Dict[str, torch.Tensor]
    metadata: Dict[str, str]

    @property
    def modalities(self) -> List[str]:
        """The model's modalities held here, in order, without ``"fused"``."""
        return [name for name in self.vectors if name != FUSED]

    def row_of(self) -> Dict[str, int]:
        """Item id -> its row."""
        return {item: row for row, item in enumerate(self.ids)}

    def select(self, rows: Union[Sequence[int], torch.Tensor]) -> "ItemEmbeddings":
        """The items at ``rows``, in that order, with the same metadata."""
        index = torch.as_tensor(rows, dtype=torch.long).reshape(-1)  # (M,)
        return ItemEmbeddings([self.ids[i] for i in index.tolist()],
                              {name: v[index] for name, v in self.vectors.items()},
                              {name: m[index] for name, m in self.masks.items()}, dict(self.metadata))


def check_fusion_weights(weights: Optional[Dict[str, float]], modalities: Sequence[str]) -> None:
    """A ``ConfigError`` unless ``weights`` is None or gives every one of ``modalities`` a weight >= 0."""
    check_weights(weights, modalities)


def fuse(vectors: Dict[str, torch.Tensor], masks: Dict[str, torch.Tensor],
         weights: Optional[Dict[str, float]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One vector per item: the normalised weighted mean of the modality vectors it has
    (``align.fields.fuse``, the same function that fuses a product's fields in training)."""
    return fuse_fields(vectors, masks, weights)


def fusion_metadata(weights: Optional[Dict[str, float]]) -> Dict[str, str]:
    """The metadata entries that say how ``fused`` was made (compared before an append)."""
    if weights is None:
        return {"fusion": "mean"}
    return {"fusion": "weighted_mean", "fusion_weights": ",".join(f"{m}={weights[m]:g}" for m in sorted(weights))}


def fusion_weights_of(metadata: Dict[str, str]) -> Optional[Dict[str, float]]:
    """The weights ``metadata``'s fusion entries name (``fusion_metadata`` read back; None: equal)."""
    if metadata.get("fusion") != "weighted_mean":
        return None
    return parse_fusion_weights(metadata["fusion_weights"])


def embedded_at_metadata(manifests: Sequence[str], started_ns: int) -> Dict[str, str]:
    """The ``embedded_at`` entry of a run that started at ``started_ns`` (``time.time_ns()``) and
    embedded ``manifests``: a file changed after that time may not be what the vectors show."""
    return {EMBEDDED_AT: json.dumps({os.path.abspath(m): started_ns for m in manifests}, sort_keys=True)}


def embedded_times(metadata: Dict[str, str], where: str) -> Dict[str, int]:
    """Absolute manifest path -> when the run that embedded its rows started (ns), from ``metadata``'s
    ``embedded_at``; {} for a folder written before it was recorded. A ``RunError`` naming ``where``
    when the entry is not such a mapping."""
    text = metadata.get(EMBEDDED_AT)
    if text is None:
        return {}
    try:
        times = json.loads(text)
    except ValueError:
        times = None
    if not isinstance(times, dict) or not all(isinstance(t, int) for t in times.values()):
        raise RunError(f"{where}: metadata {EMBEDDED_AT} is {text[:80]!r}, expected {{manifest path: ns}}; "
                       f"write the folder again with `align embed`")
    return times


def truncate_embeddings(emb: ItemEmbeddings, dim: int, flag: str = "--dim") -> ItemEmbeddings:
    """``emb`` with every vector cut to its first ``dim`` coordinates and renormalised (zero rows stay
    zero); metadata ``dim`` becomes ``dim``, ``full_dim`` keeps the model's width. A ``dim`` wider
    than the vectors is a ``ConfigError`` naming ``flag``."""
    width = emb.vectors[FUSED].shape[-1]
    check_prefix_dim(dim, width, flag)
    full = emb.metadata.get("full_dim") or str(width)
    return ItemEmbeddings(list(emb.ids), {name: prefix(v, dim).contiguous() for name, v in emb.vectors.items()},
                          dict(emb.masks), {**emb.metadata, "dim": str(dim), "full_dim": full})


def id_list(ids: Sequence[str]) -> str:
    """Up to ``SHOWN_IDS`` of ``ids``, quoted, and how many more."""
    shown = ", ".join(repr(i) for i in ids[:SHOWN_IDS])
    return shown + (f" ... and {len(ids) - SHOWN_IDS} more" if len(ids) > SHOWN_IDS else "")


def _check_ids(ids: Sequence[str], where: str) -> None:
    if not all(isinstance(item, str) for item in ids):
        raise RunError(f"{where}: every item id must be a string")
    if len(set(ids)) != len(ids):
        repeated = [item for item, n in Counter(ids).items() if n > 1]
        raise RunError(f"{where}: item ids repeat: {id_list(repeated)}; each item may have one row")


def _check_tensors(emb: ItemEmbeddings, where: str) -> None:
    """A ``RunError`` naming ``where`` unless every vector is (N, D) float32 with an (N,) bool mask."""
    rows = len(emb.ids)
    if FUSED not in emb.vectors or set(emb.vectors) != set(emb.masks):
        raise RunError(f"{where}: vectors {sorted(emb.vectors)} and masks {sorted(emb.masks)} must name the same "
                       f"modalities and {FUSED!r}")
    dim = emb.vectors[FUSED].shape[-1]
    for name, vector in emb.vectors.items():
        mask = emb.masks[name]
        if vector.dtype != torch.float32 or tuple(vector.shape) != (rows, dim):
            raise RunError(f"{where}: {name} is {vector.dtype} {tuple(vector.shape)}, expected float32 {(rows, dim)} "
                           f"(one row per id)")
        if mask.dtype != torch.bool or tuple(mask.shape) != (rows,):
            raise RunError(f"{where}: {MASK}{name} is {mask.dtype} {tuple(mask.shape)}, expected bool ({rows},)")


def save_item_embeddings(emb: ItemEmbeddings, folder: str) -> None:
    """Write ``emb`` into ``folder`` (format in the module docstring), each file atomically."""
    _check_ids(emb.ids, folder)
    _check_tensors(emb, folder)
    tensors = {}
    for name in emb.vectors:
        tensors[name] = emb.vectors[name]
        tensors[MASK + name] = emb.masks[name]
    write_tensors(tensors, os.path.join(folder, TENSORS_FILE), metadata={k: str(v) for k, v in emb.metadata.items()})
    write_json_atomic({"ids": list(emb.ids), "modalities": emb.modalities, "dim": int(emb.vectors[FUSED].shape[-1]),
                       "count": len(emb.ids)}, os.path.join(folder, IDS_FILE))


def load_item_embeddings(folder: str) -> ItemEmbeddings:
    """The embeddings ``align embed`` wrote into ``folder`` (safetensors and JSON only, nothing
    unpickled). A missing or unreadable file, a tensor of the wrong shape or type, or an ids.json that
    does not fit the tensors is a ``RunError`` naming the file."""
    tensors_path, ids_path = os.path.join(folder, TENSORS_FILE), os.path.join(folder, IDS_FILE)
    for path in (tensors_path, ids_path):
        if not os.path.isfile(path):
            raise RunError(f"{path}: missing; write the folder with `align embed`")
    tensors, metadata = read_tensors(tensors_path)
    if metadata.get("format") != FORMAT:
        raise RunError(f"{tensors_path}: format {metadata.get('format')!r}, expected {FORMAT!r}; "
                       f"write the folder with `align embed`")
    modalities = [m for m in metadata.get("modalities", "").split(",") if m]
    names = modalities + [FUSED]
    missing = [key for name in names for key in (name, MASK + name) if key not in tensors]
    if not modalities or missing:
        raise RunError(f"{tensors_path}: modalities {modalities} in its metadata, tensors {missing} missing")
    listing = read_json(ids_path)
    if not isinstance(listing, dict) or not isinstance(listing.get("ids"), list) or "count" not in listing:
        raise RunError(f"{ids_path}: expected {{\"ids\": [...], \"modalities\": [...], \"dim\": D, \"count\": N}}")
    rows = tensors[FUSED].shape[0]
    if not listing["count"] == len(listing["ids"]) == rows:
        raise RunError(f"{ids_path}: {len(listing['ids'])} ids (count {listing['count']}) for the {rows} rows of "
                       f"{tensors_path}; the files come from different runs: write the folder again with `align embed`")
    if listing.get("modalities") != modalities or str(listing.get("dim")) != metadata.get("dim"):
        raise RunError(f"{ids_path}: modalities {listing.get('modalities')} and dim {listing.get('dim')} differ from "
                       f"{tensors_path} ({modalities}, {metadata.get('dim')}); "
                       f"write the folder again with `align embed`")
    _check_ids(listing["ids"], ids_path)
    emb = ItemEmbeddings(listing["ids"], {name: tensors[name] for name in names},
                         {name: tensors[MASK + name] for name in names}, metadata)
    _check_tensors(emb, tensors_path)
    return emb


APPEND_KEYS = ("checkpoint", "dim", "modalities", "fusion", "fusion_weights", "fields")


def check_same_space(existing: Dict[str, str], new: Dict[str, str], keys: Sequence[str] = APPEND_KEYS,
                     where: str = "append") -> None:
    """A ``RunError`` unless the two metadata agree on ``keys``: vectors of two models, or fused
    differently, cannot share one catalogue."""
    for key in keys:
        if existing.get(key) != new.get(key):
            raise RunError(f"{where}: {key} is {existing.get(key)!r} in the existing embeddings and {new.get(key)!r} "
                           f"in the new ones; embed the whole catalogue again with one checkpoint and one fusion")


def append_item_embeddings(existing: ItemEmbeddings, new: ItemEmbeddings) -> ItemEmbeddings:
    """``existing`` with the items of ``new``: an id in both takes the new row in place (a
    re-embedded item), the other new ids follow in ``new``'s order. Dimension, modalities,
    checkpoint and fusion must agree (``RunError`` otherwise)."""
    old_dim, new_dim = existing.vectors[FUSED].shape[-1], new.vectors[FUSED].shape[-1]
    if old_dim != new_dim:
        raise RunError(f"append: the existing embeddings have dim {old_dim}, the new ones {new_dim}")
    if set(existing.vectors) != set(new.vectors):
        raise RunError(f"append: the existing embeddings hold {sorted(existing.vectors)}, the new ones "
                       f"{sorted(new.vectors)}")
    check_same_space(existing.metadata, new.metadata)
    _check_ids(new.ids, "append: the new embeddings")
    row_of = existing.row_of()
    replaced = [(row_of[item], j) for j, item in enumerate(new.ids) if item in row_of]
    added = torch.tensor([j for j, item in enumerate(new.ids) if item not in row_of], dtype=torch.long)
    old_rows = torch.tensor([r for r, _ in replaced], dtype=torch.long)
    new_rows = torch.tensor([j for _, j in replaced], dtype=torch.long)

    def merged(old: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
        out = old.clone()
        out[old_rows] = fresh[new_rows]
        return torch.cat([out, fresh[added]])

    return ItemEmbeddings(existing.ids + [new.ids[j] for j in added.tolist()],
                          {name: merged(existing.vectors[name], new.vectors[name]) for name in existing.vectors},
                          {name: merged(existing.masks[name], new.masks[name]) for name in existing.masks},
                          appended_metadata(existing.metadata, new.metadata))


def appended_metadata(old: Dict[str, str], new: Dict[str, str]) -> Dict[str, str]:
    """The metadata of a folder holding ``old``'s rows and ``new``'s: ``new``'s, except that each of
    ``RUN_KEYS`` lists every value either side's rows were computed with ("16,8": taking the latest
    would claim that every row was computed alike), and ``embedded_at`` keeps each manifest's
    earliest time (a file changed after it may not be in the rows embedded then)."""
    merged = {**old, **new}
    for key in RUN_KEYS:
        values = [value for side in (old, new) for value in side.get(key, "").split(",") if value]
        if values:
            merged[key] = ",".join(dict.fromkeys(values))  # distinct, in order of first use
    times = embedded_times(old, "append: the existing embeddings")
    for manifest, started in embedded_times(new, "append: the new embeddings").items():
        times[manifest] = min(started, times.get(manifest, started))
    if times:
        merged[EMBEDDED_AT] = json.dumps(times, sort_keys=True)
    return merged


def parse_fusion_weights(text: str) -> Dict[str, float]:
    """``"text=1,image=2"`` -> {"text": 1.0, "image": 2.0} (``--fusion-weights``)."""
    weights = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r}: expected modality=weight pairs, e.g. text=1,image=2") from None
        if name.strip() not in MODALITIES:
            raise argparse.ArgumentTypeError(f"{name.strip()!r}: not a modality; known: {', '.join(MODALITIES)}")
    return weights
