"""What a map shows of each item: its points in every layer, its category, title and thumbnail from
the catalogue manifests, and the flags an ``align audit`` CSV gives it (``ItemMap``, ``build_map``).

The manifests are read as tables (CSV, JSONL, Parquet; align/data/manifest.py), by column name:
an id, a category, a title and an image path, relative to ``--media-root`` or to the manifest's
own folder. The audit CSV needs the columns ``item_id`` and ``flag``; ``severity`` and ``reason``
are shown when present. Rows are kept in the CSV's order (the audit sorts them by severity).
"""
from __future__ import annotations

import base64
import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from align.errors import ConfigError
from align.map.project import Method, Projection, project_layers

FORMAT = "align-map/1"
FUSED = "fused"
NO_CATEGORY = "(no category)"
NOT_IN_MANIFESTS = "(not in the manifests)"
# Twenty colours told apart on a white page (matplotlib's tab10 and its dark/light pairs in tab20);
# categories beyond twenty reuse them, in order of size.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7",
           "#dbdb8d", "#9edae5")
FLAG_COLUMNS = ("item_id", "flag")
FLAG_DETAILS = ("severity", "reason")
THUMBNAIL_MIN_PX = 12
SHOWN_IDS = 20  # unknown flagged ids listed in map.json; the count covers all


@dataclass
class CatalogueColumns:
    """The manifest columns a map reads; None leaves that field out (all items one category, ...)."""

    id: str = "id"
    category: Optional[str] = "category"
    title: Optional[str] = "title"
    image: Optional[str] = "image"
    media_root: Optional[str] = None  # base of relative image paths; default each manifest's folder


@dataclass
class ItemFields:
    """An item's fields from the manifests (None where its cell is empty or the column is off)."""

    category: Optional[str] = None
    title: Optional[str] = None
    image: Optional[str] = None  # the path to open
    where: str = ""  # file:line, for messages


@dataclass
class ItemMap:
    """The drawn items of a catalogue, in embedding row order, with everything the PNG, the HTML and
    map.json show.

    Attributes:
        ids, categories, titles: per drawn item.
        points: layer (``"fused"`` first, then the modalities) -> (n, 2) float64, NaN where the
            item lacks that layer.
        projection: how the coordinates were made.
        palette: category -> colour, in legend order (largest first).
        flags: row -> the audit's flag rows for that item ({"flag", "severity", "reason"}).
        thumbnails: row -> an image data URI.
        notes: counts worth saying (items left out, unknown flag ids, thumbnails left out ...).
    """

    ids: List[str]
    categories: List[str]
    titles: List[str]
    points: Dict[str, np.ndarray]
    projection: Projection
    palette: Dict[str, str]
    flags: Dict[int, List[Dict[str, str]]] = field(default_factory=dict)
    thumbnails: Dict[int, str] = field(default_factory=dict)
    notes: Dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> List[str]:
        """``"fused"``, then the modalities, in the order they are drawn and listed."""
        return list(self.points)

    def to_json(self, sources: Dict[str, Any]) -> Dict[str, Any]:
        """The map.json document: method, categories and every drawn item's points by layer."""
        counts = {name: 0 for name in self.palette}
        for category in self.categories:
            counts[category] += 1
        items = []
        for row, item in enumerate(self.ids):
            points = {layer: [float(v) for v in xy[row]] for layer, xy in self.points.items()
                      if not np.isnan(xy[row, 0])}
            entry = {"id": item, "category": self.categories[row], "title": self.titles[row], "points": points}
            if row in self.flags:
                entry["flags"] = self.flags[row]
            items.append(entry)
        projection = self.projection
        return {"format": FORMAT, "method": projection.method,
                "projection": {"method": projection.method, "statement": projection.statement(),
                               "axes": projection.axis_labels(), "explained_variance": projection.explained,
                               "fit_rows": projection.fit_rows, **projection.detail},
                "layers": self.layers, "sources": sources, "notes": self.notes,
                "categories": [{"name": name, "colour": colour, "count": counts[name]}
                               for name, colour in self.palette.items()],
                "items": items}


def _table(manifest: str) -> Tuple[List[str], List[Tuple[int, Dict[str, Any]]]]:
    from align.data.manifest import read_table_rows

    if not os.path.isfile(manifest):
        raise ConfigError(f"--manifest {manifest}: no such file")
    try:
        return read_table_rows(Path(manifest))
    except (ValueError, OSError, ImportError) as error:
        raise ConfigError(f"--manifest {manifest}: cannot be read ({error})") from None


def _cell(row: Dict[str, Any], column: Optional[str]) -> Optional[str]:
    value = None if column is None else row.get(column)
    return None if value is None or str(value).strip() in ("", "nan") else str(value).strip()


def read_item_fields(manifests: Sequence[str], columns: CatalogueColumns) -> Dict[str, ItemFields]:
    """Item id -> ``ItemFields`` from the manifests (a later manifest's row for an id wins). A missing
    file, or a column a manifest lacks, is a ``ConfigError`` naming the file, the column and the
    option that names it."""
    fields: Dict[str, ItemFields] = {}
    for manifest in manifests:
        header, rows = _table(manifest)
        for option, column in (("--id-column", columns.id), ("--category-column", columns.category),
                               ("--title-column", columns.title), ("--image-column", columns.image)):
            if column is not None and column not in header:
                raise ConfigError(f"--manifest {manifest}: no column {column!r} (columns: {', '.join(header)}); "
                                  f"name the right one with {option}" + ("" if option == "--id-column" else
                                                                         f", or {option} '' to leave it out"))
        root = columns.media_root or os.path.dirname(os.path.abspath(manifest))
        for number, row in rows:
            item = _cell(row, columns.id)
            if item is None:
                continue
            image = _cell(row, columns.image)
            fields[item] = ItemFields(_cell(row, columns.category), _cell(row, columns.title),
                                      None if image is None else os.path.join(root, image), f"{manifest}:{number}")
    return fields


def read_flags(path: str) -> Dict[str, List[Dict[str, str]]]:
    """Item id -> its flag rows ({"flag", "severity", "reason"}, in the file's order) from an
    ``align audit`` CSV; a missing file or column, or a row without an id or flag, is a ``ConfigError``."""
    if not os.path.isfile(path):
        raise ConfigError(f"--flags {path}: no such file (write it with `align audit`)")
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = list(reader.fieldnames or [])
        missing = [column for column in FLAG_COLUMNS if column not in header]
        if missing:
            raise ConfigError(f"--flags {path}: no column {', '.join(missing)} "
                              f"(columns: {', '.join(header) or 'none'}); "
                              f"expected the CSV of `align audit` with {', '.join(FLAG_COLUMNS + FLAG_DETAILS)}")
        flags: Dict[str, List[Dict[str, str]]] = {}
        for row in reader:
            item, flag = _cell(row, "item_id"), _cell(row, "flag")
            if item is None or flag is None:
                raise ConfigError(f"{path}:{reader.line_num}: empty item_id or flag; every row flags one item")
            flags.setdefault(item, []).append({"flag": flag, **{k: _cell(row, k) or "" for k in FLAG_DETAILS}})
    return flags


def _encode_thumbnail(path: str, px: int, fmt: str) -> Optional[bytes]:
    """``path`` shrunk to fit ``px`` x ``px`` and encoded; None when it cannot be read (the audit
    reports unreadable media; a map just draws the item without a picture)."""
    from align.data.manifest import open_image
    from align.data.sample import BadSample

    try:
        image = open_image(path, "", path)
    except BadSample:
        return None
    image.thumbnail((px, px))
    buffer = io.BytesIO()
    image.save(buffer, fmt, quality=70)
    return buffer.getvalue()


def make_thumbnails(paths: Dict[int, str], px: int, budget_bytes: int,
                    first: Sequence[int] = ()) -> Tuple[Dict[int, str], Dict[str, Any]]:
    """Data URIs of small thumbnails of ``paths`` (row -> image file) within ``budget_bytes``
    of base64 in all: at ``px``, or smaller when they do not fit; when even
    ``THUMBNAIL_MIN_PX`` overflows, the rows in ``first`` (flagged items), then the others in
    order, until the budget is spent. Returns (row -> data URI, what was done)."""
    from PIL import features

    fmt, mime = ("WEBP", "image/webp") if features.check("webp") else ("JPEG", "image/jpeg")
    if px <= 0 or budget_bytes <= 0 or not paths:
        return {}, {"count": 0, "px": 0, "bytes": 0, "left_out": len(paths), "unreadable": 0}
    encoded = {row: _encode_thumbnail(path, px, fmt) for row, path in paths.items()}
    total = sum(4 * ((len(data) + 2) // 3) for data in encoded.values() if data)
    if total > budget_bytes and px > THUMBNAIL_MIN_PX:
        # Bytes grow about with the area: shrink the side by the square root of the overshoot.
        px = max(THUMBNAIL_MIN_PX, int(px * (budget_bytes / total) ** 0.5 * 0.95))
        encoded = {row: _encode_thumbnail(path, px, fmt) for row, path in paths.items()}
    order = list(dict.fromkeys([row for row in first if row in encoded] + sorted(encoded)))
    uris, spent = {}, 0
    for row in order:
        data = encoded[row]
        if data is None:
            continue
        uri = f"data:{mime};base64," + base64.b64encode(data).decode("ascii")
        if spent + len(uri) > budget_bytes:
            continue
        uris[row], spent = uri, spent + len(uri)
    unreadable = sum(data is None for data in encoded.values())
    return uris, {"count": len(uris), "px": px, "format": fmt.lower(), "bytes": spent,
                  "left_out": len(paths) - len(uris) - unreadable, "unreadable": unreadable}


def category_palette(categories: Sequence[str]) -> Dict[str, str]:
    """Category -> colour, largest category first (ties by name); the placeholders come last."""
    counts: Dict[str, int] = {}
    for category in categories:
        counts[category] = counts.get(category, 0) + 1
    placeholder = (NO_CATEGORY, NOT_IN_MANIFESTS)
    order = sorted(counts, key=lambda name: (name in placeholder, -counts[name], name))
    return {name: PALETTE[k % len(PALETTE)] for k, name in enumerate(order)}


def choose_rows(present: np.ndarray, flagged: Sequence[int], max_items: int, seed: int) -> np.ndarray:
    """The rows to draw: every item with a vector, or when there are more than ``max_items``, the
    flagged ones and a seeded random sample of the others, in row order."""
    rows = np.flatnonzero(present)
    if len(rows) <= max_items:
        return rows
    keep = [row for row in flagged if present[row]][:max_items]
    others = np.setdiff1d(rows, keep)
    extra = np.random.default_rng(seed).permutation(others)[:max_items - len(keep)]
    return np.sort(np.concatenate([np.asarray(keep, dtype=np.int64), extra]))


def build_map(emb: Any, fields: Dict[str, ItemFields], flags: Dict[str, List[Dict[str, str]]],
              method: Method = "pca", seed: int = 0, max_items: int = 50_000, thumbnail_px: int = 32,
              thumbnail_budget: int = 2_000_000) -> ItemMap:
    """The ``ItemMap`` of an ``ItemEmbeddings``: one projection fitted on every real vector of every
    layer (fused and each modality) of every item, drawn or not; then the items to draw
    (``choose_rows``), their fields and flags, and thumbnails of their images within
    ``thumbnail_budget`` bytes (0: none)."""
    layers = [FUSED] + list(emb.modalities)
    masks = {name: emb.masks[name].numpy().astype(bool) for name in layers}
    real = {name: emb.vectors[name].numpy()[masks[name]] for name in layers}  # (n_layer, D) each
    projected, projection = project_layers(real, method, seed)
    count = len(emb.ids)
    row_of = emb.row_of()
    flagged = [row_of[item] for item in flags if item in row_of]
    present = np.zeros(count, dtype=bool)
    for name in layers:
        present |= masks[name]
    rows = choose_rows(present, flagged, max_items, seed)
    points = {}
    for name in layers:
        full = np.full((count, 2), np.nan)
        full[masks[name]] = projected[name]
        points[name] = full[rows]
    ids = [emb.ids[row] for row in rows.tolist()]
    known = [fields.get(item) for item in ids]
    categories = [NOT_IN_MANIFESTS if f is None else f.category or NO_CATEGORY for f in known]
    titles = [item if f is None or not f.title else f.title for item, f in zip(ids, known)]
    drawn = {item: n for n, item in enumerate(ids)}
    item_flags = {drawn[item]: rows_ for item, rows_ in flags.items() if item in drawn}
    unknown = sorted(set(flags) - set(row_of))
    images = {n: f.image for n, f in enumerate(known) if f is not None and f.image}
    thumbnails, thumbnail_notes = make_thumbnails(images, thumbnail_px, thumbnail_budget, sorted(item_flags))
    notes = {"items": count, "drawn": len(ids), "without_vectors": int((~present).sum()),
             "not_in_manifests": sum(f is None for f in known),
             "flagged_drawn": len(item_flags), "flag_ids_unknown": len(unknown),
             "flag_ids_unknown_first": unknown[:SHOWN_IDS],
             "thumbnails": thumbnail_notes}
    return ItemMap(ids, categories, titles, points, projection, category_palette(categories), item_flags,
                   thumbnails, notes)
