"""The audit's vectors: every item embedded as ``align embed`` embeds it, and each view on its own.

Everything goes through ``align embed``'s own path (align/index/embed.py: the checkpoint read
through align/loading.py, the manifests through the checkpoint's ``data`` section, one sample per
(item, modality or field), so an unreadable photo costs its item only that view). The item vectors
are ``align embed``'s bit for bit at the same batch size and device: the catalogue's mixed
batches (``embed_batches``), or field by field for a checkpoint trained with ``model.fields``
(``embed_fields``). Two things differ from ``align embed``:

* the skipped-file limit (``data.max_bad_fraction``) is lifted: an audit reports broken files,
  it does not stop at them;
* the views the audit compares are the product's fields (align/fields.py ``product_fields``),
  except that a product whose only text field joins several columns (title and description) gets
  a view per column, each embedded alone through the same path, so that a wrong title can be told
  from a wrong photo.

``items``: a folder ``align embed`` wrote for the same checkpoint and manifests; its item vectors
are read instead of embedded (``open_embedded``, ``check_embedded_rows``). What it does not hold,
the views of single text columns (title, description) or of several fields of one modality, is
still embedded. Its metadata records the batch size, device type and torch version its rows were
embedded with (every value used, after appends with other ones); the audit does not require its own:
another batch size or device gives vectors that differ only in float32 rounding. It also records when
each manifest's rows were embedded (``embedded_at``, the earliest over appends), and a model file,
manifest or media file changed after that time is refused: the vectors may not show it.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from align.config import Config, FieldConfig, product_fields
from align.errors import ConfigError
from align.index.embed import (embed_batches, embed_fields, fields_metadata, load_for_embedding, merge_parts,
                                read_manifest_rows)
from align.index.vectors import FUSED, IDS_FILE, TENSORS_FILE, ItemEmbeddings, embedded_times, load_item_embeddings
from align.loading import model_folder, read_saved_config

SHOWN = 5  # paths or ids named in a refusal


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
        reused: the ``align embed`` folder the item vectors were read from (None: embedded here).
    """

    items: ItemEmbeddings
    rows: List[Dict]
    roots: List[str]
    views: Dict[str, str] = field(default_factory=dict)
    vectors: Dict[str, torch.Tensor] = field(default_factory=dict)
    masks: Dict[str, torch.Tensor] = field(default_factory=dict)
    texts: Dict[str, List[Optional[str]]] = field(default_factory=dict)
    reused: Optional[str] = None


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
                    progress: bool = True, items: Optional[str] = None) -> AuditVectors:
    """Embed ``manifests`` with ``checkpoint`` (module docstring), or read the item vectors from the
    ``align embed`` folder ``items``. A ``ConfigError`` for a path that cannot be used or an
    ``items`` folder of other inputs, before anything is embedded; a ``RunError`` for an id in two
    manifests."""
    config = read_saved_config(model_folder(checkpoint), [f"eval.batch_size={batch_size}", "data.max_bad_fraction=1.0"])
    fields = product_fields(config.model, config.data.columns)
    stored = None if items is None else open_embedded(items, checkpoint, manifests, config, fields)
    model, catalogue, metadata = load_for_embedding(checkpoint, manifests, batch_size, device)
    for loader in catalogue.loaders:  # every portion's tally takes its loader's limit (embed.py _embed_portion)
        loader.bad.max_bad_fraction = config.data.max_bad_fraction
    rows = [row for manifest_rows in catalogue.rows for row in manifest_rows]
    roots = [loader.dataset.root for loader, manifest_rows in zip(catalogue.loaders, catalogue.rows)
             for _ in manifest_rows]
    if stored is not None:
        sources = [manifest for manifest, manifest_rows in zip(manifests, catalogue.rows) for _ in manifest_rows]
        check_embedded_rows(items, stored, catalogue.ids, rows, roots, sources)
    label = "" if progress else None
    if stored is None and config.model.fields:  # as embed_manifests embeds such a checkpoint
        ids, item_vectors, item_masks = embed_fields(model, config, manifests, batch_size, device, fields, label)
        stored = ItemEmbeddings(ids, item_vectors, item_masks, {**metadata, **fields_metadata(fields)})
    elif stored is None:  # as `align embed` does, sharded or not
        part = embed_batches(model, catalogue, catalogue.batches(), device, label)
        stored = merge_parts(catalogue, [part], model.modalities, model.embed_dim, metadata)
    out = AuditVectors(stored, rows, roots, reused=None if items is None else os.path.abspath(items))
    for name, spec in audit_fields(fields).items():
        out.views[name] = spec.modality
        if name in fields and _sole_field(name, fields):  # its modality's item vectors are the field's
            out.vectors[name], out.masks[name] = stored.vectors[spec.modality], stored.masks[spec.modality]
        else:
            _, vectors, masks = embed_fields(model, config, manifests, batch_size, device, {name: spec}, label)
            out.vectors[name], out.masks[name] = vectors[spec.modality], masks[spec.modality]
        if spec.modality == "text":
            columns = dataclasses.replace(config.data.columns, text=list(spec.columns))
            out.texts[name] = [row["text"] for manifest in manifests for row in read_manifest_rows(manifest, columns)]
    return out


def _sole_field(name: str, fields: Dict[str, FieldConfig]) -> bool:
    """``name`` is the only field of its modality and weighs in: the item vector of that modality is its own."""
    modality = fields[name].modality
    return fields[name].weight > 0 and sum(1 for spec in fields.values() if spec.modality == modality) == 1


def open_embedded(folder: str, checkpoint: str, manifests: Sequence[str], config: Config,
                  fields: Dict[str, FieldConfig]) -> ItemEmbeddings:
    """The item vectors ``align embed`` wrote into ``folder``, after the checks that need no model: a
    ``ConfigError`` naming ``folder`` and what differs unless it was embedded with ``checkpoint``'s
    model folder (its recorded path), after the model's and the manifests' last change, at full
    width and with the modalities (and, for ``model.fields``, the fields) the audit reads."""
    where = f"--items {folder}"
    for name in (TENSORS_FILE, IDS_FILE):
        if not os.path.isfile(os.path.join(folder, name)):
            raise ConfigError(f"{where}: no {name}; give the --out folder of `align embed`, or leave out --items")
    stored = load_item_embeddings(folder)
    metadata, model = stored.metadata, os.path.abspath(model_folder(checkpoint))
    again = (f"embed again (`align embed --checkpoint {checkpoint} --manifest {' '.join(manifests)} --out {folder}`) "
             f"or leave out --items")
    if metadata.get("checkpoint") != model:
        raise ConfigError(f"{where}: embedded with the model in {metadata.get('checkpoint')}, the audit reads "
                          f"{model}; {again}")
    since, earliest = embedding_times(folder, stored, manifests)
    newer = [path for path in (os.path.join(model, "model.safetensors"), os.path.join(model, "config.yaml"))
             if _changed_after(path, earliest)]  # every row came from this model
    newer += [manifest for manifest in manifests if _changed_after(manifest, since[manifest])]
    if newer:
        raise ConfigError(f"{where}: {', '.join(newer)} changed after it was embedded; {again}")
    if "full_dim" in metadata or stored.vectors[FUSED].shape[-1] != config.model.embed_dim:
        raise ConfigError(f"{where}: its vectors are {stored.vectors[FUSED].shape[-1]} wide (--dim), the model's "
                          f"{config.model.embed_dim}; the audit compares full-width vectors: {again}")
    needed = list(config.model.towers)
    if stored.modalities != needed:
        raise ConfigError(f"{where}: holds the modalities {stored.modalities}, the audit needs {needed}; {again}")
    expected = fields_metadata(fields)["fields"] if config.model.fields else None
    if metadata.get("fields") != expected:
        raise ConfigError(f"{where}: its text vectors fuse the fields {metadata.get('fields')}, the checkpoint's "
                          f"are {expected}; {again}")
    return stored


def check_embedded_rows(folder: str, stored: ItemEmbeddings, ids: Sequence[str], rows: Sequence[Dict[str, Any]],
                        roots: Sequence[str], sources: Sequence[str]) -> None:
    """A ``ConfigError`` naming ``folder`` unless its rows are the catalogue's items in the same order
    and no photo or sound of theirs changed after their manifest's rows were embedded (file
    modification times against ``embedding_times``; ``sources``: each row's manifest)."""
    where = f"--items {folder}"
    if list(stored.ids) != list(ids):
        raise ConfigError(f"{where}: {_id_difference(stored.ids, ids)}; give the manifests in the order `align "
                          f"embed` was given them, embed them again, or leave out --items")
    since, _ = embedding_times(folder, stored, sorted(set(sources)))
    media = [(os.path.join(roots[n], row[m]), since[sources[n]]) for n, row in enumerate(rows)
             for m in ("image", "audio") if row.get(m)]
    newer = [path for path, embedded in media if _changed_after(path, embedded)]
    if newer:
        raise ConfigError(f"{where}: {len(newer)} media files changed after it was embedded ("
                          f"{', '.join(newer[:SHOWN])}{' ...' if len(newer) > SHOWN else ''}); embed again or "
                          f"leave out --items")


def embedding_times(folder: str, stored: ItemEmbeddings, manifests: Sequence[str]) -> Tuple[Dict[str, int], int]:
    """(manifest -> when its rows in ``folder`` were embedded, the earliest of those), in ns: the
    start of the run that embedded them (metadata ``embedded_at``; the earliest over appends, as a
    file changed after it may not be in the rows embedded then). A manifest it does not name (the
    same rows copied elsewhere) takes the earliest time; a folder written before the times were
    recorded, its tensors file's modification time for all."""
    recorded = embedded_times(stored.metadata, os.path.join(folder, TENSORS_FILE))
    if not recorded:
        written = os.stat(os.path.join(folder, TENSORS_FILE)).st_mtime_ns
        return {manifest: written for manifest in manifests}, written
    earliest = min(recorded.values())
    return {manifest: recorded.get(os.path.abspath(manifest), earliest) for manifest in manifests}, earliest


def _changed_after(path: str, since: int) -> bool:
    """``path`` was modified after ``since`` (ns; a missing file was not: the audit reports it)."""
    return os.path.exists(path) and os.stat(path).st_mtime_ns > since


def _id_difference(stored: Sequence[str], wanted: Sequence[str]) -> str:
    """How two id lists differ, in words: the count, ids on one side only, or the first row that differs."""
    absent, extra = sorted(set(wanted) - set(stored)), sorted(set(stored) - set(wanted))
    if absent or extra:
        def shown(ids: List[str]) -> str:
            return ", ".join(map(repr, ids[:SHOWN])) + (" ..." if len(ids) > SHOWN else "")
        return (f"holds {len(stored)} items, the manifests {len(wanted)}"
                + (f"; not embedded there: {shown(absent)}" if absent else "")
                + (f"; not in the manifests: {shown(extra)}" if extra else ""))
    row = next(n for n, (a, b) in enumerate(zip(stored, wanted)) if a != b)
    return f"the same items in another order: row {row} is {stored[row]!r} there, {wanted[row]!r} in the manifests"
