r"""``align map``: the catalogue in two dimensions, as map.png, map.html (interactive, self-contained:
it opens offline) and map.json (the coordinates and how they were made)::

    align map --embeddings runs/demo/items --manifest data/demo/train.csv data/demo/test.csv \
              --category-column kind --out runs/demo [--flags runs/demo/audit/audit.csv]
    align map --checkpoint runs/demo --manifest data/demo/test.csv --category-column kind --out /tmp/map  # embeds first

One projection is fitted on every vector of every item: its fused vector and each of its modality
vectors (text, image, audio), so an item's points share one plane and the map can link them; the
gap between the modalities' clouds is the space's own, not the drawing's. The method is exact PCA
unless ``--method umap`` is asked for (umap-learn must be installed); map.json and both pictures
say which, and PCA's share of variance kept. ``--flags`` takes the CSV of ``align audit`` and rings
the items it flags. More than ``--max-items`` items: the flagged ones and a seeded sample of the
rest are drawn (the projection still fits all). Thumbnails are inlined into the HTML within
``--thumbnails-mb``, smaller when they would not fit.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any, Dict, List, Optional

from align.errors import ConfigError, write_json_atomic
from align.map.html import write_html
from align.map.items import CatalogueColumns, ItemMap, build_map, read_flags, read_item_fields
from align.map.png import plot_map
from align.map.project import METHODS

JSON_FILE = "map.json"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align map", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--embeddings", help="folder written by `align embed`")
    source.add_argument("--checkpoint", help="embed --manifest with this checkpoint first (in memory)")
    parser.add_argument("--manifest", nargs="+", default=[],
                        help="catalogue manifest(s): categories, titles, images (required with --checkpoint)")
    parser.add_argument("--out", required=True, help="folder for map.png, map.html and map.json")
    parser.add_argument("--flags", help="CSV of `align audit` (item_id, flag, severity, reason): flagged items ringed")
    parser.add_argument("--method", default="pca", choices=METHODS, help="pca (exact, default) or umap (umap-learn)")
    parser.add_argument("--seed", type=int, default=0, help="UMAP's seed and the sample drawn past --max-items")
    parser.add_argument("--id-column", default="id", help="the manifests' item id column (default id)")
    parser.add_argument("--category-column", default="category", help="column that colours the map ('' for none)")
    parser.add_argument("--title-column", default="title", help="column shown as the item's name ('' for none)")
    parser.add_argument("--image-column", default="image", help="column of image paths for thumbnails ('' for none)")
    parser.add_argument("--media-root", help="base of relative image paths (default: each manifest's folder)")
    parser.add_argument("--max-items", type=int, default=50_000, help="items drawn at most (default 50000)")
    parser.add_argument("--thumbnail-px", type=int, default=32, help="thumbnail side in pixels (0: none)")
    parser.add_argument("--thumbnails-mb", type=float, default=2.0, help="thumbnails' share of map.html, in MB")
    parser.add_argument("--title", default="Embedding map", help="the page's title")
    parser.add_argument("--batch-size", type=int, default=256, help="with --checkpoint: samples per batch")
    parser.add_argument("--device", help="with --checkpoint: cpu, cuda, ... (default: cuda if available)")
    return parser


def _check_arguments(args: argparse.Namespace) -> None:
    if args.checkpoint and not args.manifest:
        raise ConfigError("--checkpoint embeds the catalogue: give its --manifest too")
    if args.max_items < 1:
        raise ConfigError(f"--max-items {args.max_items}: must be positive")
    if args.thumbnail_px < 0 or not (math.isfinite(args.thumbnails_mb) and args.thumbnails_mb >= 0):
        raise ConfigError("--thumbnail-px and --thumbnails-mb must be >= 0 (0: no thumbnails)")
    if args.embeddings:
        from align.index.vectors import IDS_FILE, TENSORS_FILE

        for name in (TENSORS_FILE, IDS_FILE):
            if not os.path.isfile(os.path.join(args.embeddings, name)):
                raise ConfigError(f"--embeddings {args.embeddings}: no {name}; give a folder written by `align embed`")


def _columns(args: argparse.Namespace) -> CatalogueColumns:
    return CatalogueColumns(args.id_column, args.category_column or None, args.title_column or None,
                            args.image_column or None, args.media_root)


def _embeddings(args: argparse.Namespace) -> Any:
    from align.index.embed import embed_manifests
    from align.index.vectors import load_item_embeddings

    if args.embeddings:
        return load_item_embeddings(args.embeddings)
    return embed_manifests(args.checkpoint, args.manifest, args.batch_size, args.device, progress=False)


def write_map(item_map: ItemMap, folder: str, sources: Dict[str, Any], title: str) -> Dict[str, Optional[str]]:
    """map.json, map.png and map.html in ``folder``; their paths (png None without matplotlib)."""
    os.makedirs(folder, exist_ok=True)
    json_path = os.path.join(folder, JSON_FILE)
    write_json_atomic(item_map.to_json(sources), json_path)
    return {"json": json_path, "png": plot_map(item_map, folder), "html": write_html(item_map, folder, title)}


def main(argv: Optional[List[str]] = None) -> int:
    """``align map``; a ``ConfigError`` or ``RunError`` is left to align/cli.py to report."""
    args = _parser().parse_args(argv)
    _check_arguments(args)
    start = time.perf_counter()
    fields = read_item_fields(args.manifest, _columns(args))  # every input is read before the vectors
    flags = read_flags(args.flags) if args.flags else {}
    emb = _embeddings(args)
    item_map = build_map(emb, fields, flags, args.method, args.seed, args.max_items, args.thumbnail_px,
                         int(args.thumbnails_mb * 1e6))
    sources = {"embeddings": os.path.abspath(args.embeddings) if args.embeddings else None,
               "checkpoint": emb.metadata.get("checkpoint"), "manifests": [os.path.abspath(m) for m in args.manifest],
               "flags": os.path.abspath(args.flags) if args.flags else None}
    paths = write_map(item_map, args.out, sources, args.title)
    notes = item_map.notes
    lines = [f"mapped {notes['drawn']} of {notes['items']} items in {time.perf_counter() - start:.1f} s: "
             f"{item_map.projection.statement()}",
             f"  {len(item_map.palette)} categories; {notes['not_in_manifests']} items not in the manifests; "
             f"thumbnails {notes['thumbnails']['count']} at {notes['thumbnails']['px']} px"]
    if args.flags:
        lines.append(f"  flagged items drawn: {notes['flagged_drawn']}; flagged ids not in the embeddings: "
                     f"{notes['flag_ids_unknown']}")
    lines.append("  -> " + ", ".join(path for path in paths.values() if path)
                 + ("" if paths["png"] else " (no map.png: matplotlib is not installed)"))
    print("\n".join(lines), flush=True)
    return 0
