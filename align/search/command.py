"""``align search``: a catalogue's best items for a text, a photo or a sound::

    align search --index runs/demo/index --text "small green dotted star" -k 5
    align search --index runs/demo/index --image data/demo/images/000466.png --where kind=star --json

``--index`` is an ``align index`` folder or an ``align embed`` items folder (exact search over its
fused vectors). The model defaults to the checkpoint recorded with the vectors; another one must
embed into the same dimension (and should be the same model: vectors of two models share a size,
not a space). Queries are encoded as catalogue items of their modality are
(``align.index.search.QueryEncoder``).

Output: a table of rank, id, score (cosine) and the metadata columns the index keeps, or with
``--json`` one line ``{"results": [{"id": ..., "score": ..., "metadata": {...}}, ...]}``
(``metadata`` only when the index keeps some for that item). ``--explain`` adds each modality's
share of every score and the catalogue words of the match (align/explain).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List, Optional, Sequence

from align.errors import MODALITIES, ConfigError
from align.explain.report import attach_explanation, format_explanation, search_explainer
from align.index.index import metadata_text
from align.index.search import open_catalogue, search


def parse_where(pairs: Sequence[str], category: Optional[str]) -> Dict[str, str]:
    """``--where key=value`` pairs and ``--category X`` -> {key: value}; ``ConfigError`` for a pair
    without "=" or a value, or a key given two values. Values are compared as the index stores
    metadata (``metadata_text``), so ``--where in_stock=true`` matches a JSONL catalogue's true."""
    where: Dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key, text = key.strip(), metadata_text(value)
        if not sep or not key or text is None:
            raise ConfigError(f"--where {pair!r}: expected key=value, e.g. --where colour=red")
        if key in where and where[key] != text:
            raise ConfigError(f"--where {key}: given twice ({where[key]!r} and {text!r})")
        where[key] = text
    if category is not None:
        text = metadata_text(category)
        if text is None:
            raise ConfigError(f"--category {category!r}: give a category, e.g. --category scarf")
        if "category" in where and where["category"] != text:
            raise ConfigError(f"--category {category!r} and --where category={where['category']!r} disagree")
        where["category"] = text
    return where


def format_table(results: List[Dict[str, Any]]) -> str:
    """Rank, id, score and the metadata columns any result has (in first-seen order)."""
    columns: List[str] = []
    for entry in results:
        columns += [c for c in entry.get("metadata", {}) if c not in columns]
    rows = [["rank", "id", "score", *columns]]
    for rank, entry in enumerate(results, 1):
        metadata = entry.get("metadata", {})
        rows.append([str(rank), entry["id"], f"{entry['score']:.4f}", *(str(metadata.get(c, "")) for c in columns)])
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align search", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", required=True, help="an `align index` folder or an `align embed` items folder")
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="words to search for")
    query.add_argument("--image", help="a photo (any format PIL reads)")
    query.add_argument("--audio", help="a sound (wav, flac, ogg)")
    parser.add_argument("-k", type=int, default=10, help="results to show (default 10)")
    parser.add_argument("--category", help="only items whose metadata category is this")
    parser.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                        help="only items whose metadata KEY equals VALUE (repeatable)")
    parser.add_argument("--checkpoint", help="model folder (default: the one recorded with the index)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--json", action="store_true", help='print {"results": [{"id", "score"}, ...]} instead')
    parser.add_argument("--explain", action="store_true",
                        help="say why: each modality's share of the score and the catalogue words of the match")
    parser.add_argument("--vocabulary", nargs="+", metavar="MANIFEST",
                        help="catalogue manifests whose words explain (default: the index's metadata, else the "
                             "model's training manifests)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """``align search``; a ``ConfigError`` (exit 2) or ``RunError`` (exit 1) is left to align/cli.py."""
    args = _parser().parse_args(argv)
    if not 1 <= args.k <= 1000:
        raise ConfigError(f"-k {args.k}: ask for 1 to 1000 results")
    where = parse_where(args.where, args.category)
    modality, value = next((m, getattr(args, m)) for m in MODALITIES if getattr(args, m) is not None)
    index, encoder = open_catalogue(args.index, args.checkpoint, args.device)
    vector = encoder.encode(modality, [value], names=[f"--{modality} {value}" if modality != "text" else "--text"])
    results = search(index, vector, args.k, where)[0]
    why = None
    if args.explain and results:
        why = search_explainer(index, encoder, args.vocabulary).explain(vector[0], [r["id"] for r in results])
    if args.json:
        answer: Dict[str, Any] = {"results": results}
        if why is not None:
            attach_explanation(answer, results, why)
        print(json.dumps(answer))
    elif results:
        print(format_table(results))
        if not any("metadata" in entry for entry in results):
            print(f"(ids only: {args.index} keeps no catalogue columns; `align index --metadata MANIFEST ... "
                  f"--fields title,...` builds an index that shows them)", file=sys.stderr)
        if why is not None:
            print("\n" + format_explanation(why))
    else:
        print(f"no item matches {where}" if where else "the index holds no item", file=sys.stderr)
    return 0
