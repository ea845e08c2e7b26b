"""The audit's vectors: every item embedded as ``align embed`` embeds it, and each view on its own.

Everything goes through ``align embed``'s multi-field path (align/index/embed.py ``embed_fields``:
the checkpoint read through align/loading.py, the manifests through the checkpoint's ``data``
section, one sample per (item, field), so an unreadable photo costs its item only that field).
The product's fields are the checkpoint's ``model.fields``, or one per tower (align/fields.py
``product_fields``: the text field joins ``data.columns.text``). Two things differ from ``align embed``:

* the skipped-file limit (``data.max_bad_fraction``) is lifted: an audit reports broken files,
  it does not stop at them;
* the views the audit compares are the fields, except that a product whose only text field joins
  several columns (title and description) gets a view per column, each embedded alone through
  the same path, so that a wrong title can be told from a wrong photo.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from align.config import FieldConfig
from align.data.manifest import read_manifest
from align.fields import product_fields
from align.index.embed import ItemEmbeddings, embed_fields, load_for_embedding
from align.loading import model_folder, read_saved_config


@dataclass
class AuditVectors:
    """What the audit reads of a catalogue.

    Attributes:
        items: the catalogue's embeddings (``align embed``'s format, rows in catalogue order).
        rows: the manifests' rows as the loader reads them (``read_manifest``), in the same order.
        roots: per row, the folder its media paths are relative to.
        views: view name -> its modality ("image", "text", "audio"), in the order compared.
        vectors: view name -> (N, D) unit vectors (zero rows where the item lacks the view).
        masks: view name -> (N,) bool.
        texts: text view -> its text per row (None where empty), for quoting a wrong one.
    """

    items: ItemEmbeddings
    rows: List[Dict]
    roots: List[str]
    views: Dict[str, str] = field(default_factory=dict)
    vectors: Dict[str, torch.Tensor] = field(default_factory=dict)
    masks: Dict[str, torch.Tensor] = field(default_factory=dict)
    texts: Dict[str, List[Optional[str]]] = field(default_factory=dict)


def audit_fields(fields: Dict[str, FieldConfig]) -> Dict[str, FieldConfig]:
    """The views: ``fields``, with a lone text field of several columns split into one per column."""
    text = [name for name, spec in fields.items() if spec.modality == "text"]
    if len(text) != 1 or len(fields[text[0]].columns) < 2:
        return dict(fields)
    views: Dict[str, FieldConfig] = {}
    for name, spec in fields.items():
        if name == text[0]:
            views.update({column: FieldConfig("text", [column], spec.weight) for column in spec.columns
                          if column not in fields})
        else:
            views[name] = spec
    return views


def embed_for_audit(checkpoint: str, manifests: Sequence[str], batch_size: int, device: torch.device,
                    progress: bool = True) -> AuditVectors:
    """Embed ``manifests`` with ``checkpoint`` (module docstring). A ``ConfigError`` for a path that
    cannot be used, a ``RunError`` for an id in two manifests."""
    model, catalogue, metadata = load_for_embedding(checkpoint, manifests, batch_size, device)
    config = read_saved_config(model_folder(checkpoint), [f"eval.batch_size={batch_size}", "data.max_bad_fraction=1.0"])
    fields = product_fields(config.model, config.data.columns)
    label = "" if progress else None
    ids, item_vectors, item_masks = embed_fields(model, config, manifests, batch_size, device, fields, label)
    rows = [row for manifest_rows in catalogue.rows for row in manifest_rows]
    roots = [loader.dataset.root for loader, manifest_rows in zip(catalogue.loaders, catalogue.rows)
             for _ in manifest_rows]
    out = AuditVectors(ItemEmbeddings(ids, item_vectors, item_masks, metadata), rows, roots)
    for name, spec in audit_fields(fields).items():
        out.views[name] = spec.modality
        if name in fields and sum(1 for other in fields.values() if other.modality == spec.modality) == 1:
            # the only field of its modality, embedded above: its modality's vectors are the field's
            out.vectors[name], out.masks[name] = item_vectors[spec.modality], item_masks[spec.modality]
        else:
            _, vectors, masks = embed_fields(model, config, manifests, batch_size, device, {name: spec}, label)
            out.vectors[name], out.masks[name] = vectors[spec.modality], masks[spec.modality]
        if spec.modality == "text":
            columns = dataclasses.replace(config.data.columns, text=list(spec.columns))
            out.texts[name] = [row["text"] for manifest in manifests for row in read_manifest(manifest, columns)]
    return out
