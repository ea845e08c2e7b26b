"""``align prep mine-negatives``: embed a catalogue with a checkpoint, find look-alike items with
FAISS (``align.index.index.ExactIndex``), and write them into the manifest as explicit hard negatives.

For every item, its anchor embedding (``--anchor``, e.g. image) is searched against the other
items' text embeddings. A candidate is kept when it
  * is another item that shares neither the group id nor the exact text (those are false
    negatives: the same product, or a caption that is literally the same),
  * scores within ``[--min-score, --max-score]`` (too dissimilar teaches nothing; almost
    identical is likely an unlabelled duplicate), and
  * scores at most ``positive - --margin``, where positive is the anchor's score with its own
    text (NV-Retriever's positive-aware filter, https://arxiv.org/abs/2407.15831).
The output manifest (CSV, JSONL or Parquet, as the input) is the input plus a ``negatives``
column (list of texts; JSON in CSV) and a ``negative_ids`` column; the data pipeline delivers
them when ``data.max_negatives`` > 0. The checkpoint is read as ``align eval`` reads it:
safetensors, YAML and JSON only, never a pickle.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
from typing import Dict, List, Optional

import numpy as np
import torch

from align.errors import ConfigError
from align.index.index import ExactIndex


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align prep mine-negatives", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint or its model/ folder (model.safetensors)")
    parser.add_argument("--manifest", required=True, help="CSV, JSONL or Parquet catalogue to mine")
    parser.add_argument("--out", required=True, help="output manifest (same format as the input)")
    parser.add_argument("--anchor", default="image", help="modality whose embedding queries the texts (image)")
    parser.add_argument("--k", type=int, default=32, help="neighbours retrieved per item before filtering")
    parser.add_argument("--per-item", type=int, default=4, help="negatives kept per item")
    parser.add_argument("--min-score", type=float, default=-1.0)
    parser.add_argument("--max-score", type=float, default=0.98)
    parser.add_argument("--margin", type=float, default=0.05, help="keep scores <= positive - margin")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default=None)
    return parser


def mine(anchor: np.ndarray, texts: np.ndarray, has_anchor: np.ndarray, has_text: np.ndarray,
         groups: List[Optional[str]], text_keys: List[Optional[str]], k: int, per_item: int,
         min_score: float, max_score: float, margin: float) -> List[List[int]]:
    """Indices of kept negatives per item. ``anchor`` (N, D) and ``texts`` (N, D) are L2-normalised."""
    # Items are rows here: the index's ids are row numbers, and only items with a text are candidates.
    index = ExactIndex(texts, [str(row) for row in range(len(texts))], allowed=has_text)
    queries = np.flatnonzero(has_anchor)
    scores, found = index.search(anchor[queries], k + 1)  # (Q, k + 1); one may be the item itself
    result: List[List[int]] = [[] for _ in range(len(anchor))]
    for row, item in enumerate(queries):
        positive = float(anchor[item] @ texts[item]) if has_text[item] else None
        for score, other in zip(scores[row], found[row].tolist()):
            if other < 0 or len(result[item]) >= per_item:
                continue
            same_group = groups[item] is not None and groups[item] == groups[other]
            same_text = text_keys[item] is not None and text_keys[item] == text_keys[other]
            if other == item or same_group or same_text:
                continue
            if not min_score <= score <= max_score:
                continue
            if positive is not None and score > positive - margin:
                continue
            result[item].append(other)
    return result


def main(argv: Optional[List[str]] = None) -> int:
    from align.encoding import embed_split
    from align.loading import load_model, read_saved_config
    from align.data.manifest import read_manifest
    from align.data.transforms import SampleProcessor
    from align.data.loader import loader_from_config

    args = _parser().parse_args(argv)
    if os.path.splitext(args.out)[1] != os.path.splitext(args.manifest)[1]:  # before the long embedding
        raise ConfigError(f"--out {args.out}: the output is written in the manifest's format; "
                          f"give it the suffix of {args.manifest}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(args.checkpoint, device=device)  # reads safetensors, YAML and JSON only
    config = read_saved_config(args.checkpoint, [f"eval.batch_size={args.batch_size}"])
    if "text" not in model.modalities or args.anchor not in model.modalities:
        raise ConfigError(f"--anchor {args.anchor}: the checkpoint needs text and {args.anchor} towers; it has "
                          f"{model.modalities}")
    loader = loader_from_config(config, SampleProcessor(model.preprocessors(train=False)), train=False,
                                spec=args.manifest)
    embedded = embed_split(model, loader, device)
    ids = embedded["ids"]
    texts = embedded["texts"]
    keys = [" ".join(t.lower().split()) if t else None for t in texts]
    rows = read_manifest(args.manifest, config.data.columns)
    by_id: Dict[str, dict] = {str(r["id"]): r for r in rows}
    groups = [by_id.get(i, {}).get("group") or None for i in ids]
    kept = mine(embedded["embeddings"][args.anchor].numpy(), embedded["embeddings"]["text"].numpy(),
                embedded["masks"][args.anchor].numpy(), embedded["masks"]["text"].numpy(), groups, keys,
                args.k, args.per_item, args.min_score, args.max_score, args.margin)
    negatives = {ids[i]: [j for j in kept[i]] for i in range(len(ids))}
    written = _write(args.manifest, args.out, negatives, ids, texts, config.data.columns.id,
                     config.data.columns.negatives)
    total = sum(len(v) for v in negatives.values())
    print(f"mined {total} negatives for {sum(1 for v in negatives.values() if v)} of {len(ids)} items -> {written}")
    return 0


def _write(source: str, out: str, negatives: Dict[str, List[int]], ids: List[str], texts: List[Optional[str]],
           id_column: str, column: str) -> str:
    """Copy the manifest row by row, adding the negatives' texts and ids (JSON lists in CSV,
    lists in JSONL and Parquet). Written atomically: a failed write leaves no partial file."""
    from align.errors import atomic_open

    def chosen(row: dict) -> List[int]:
        return negatives.get(str(row.get(id_column)), [])

    if source.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = pq.read_table(source).to_pylist()
        for row in rows:
            row[column] = [texts[j] for j in chosen(row)]
            row["negative_ids"] = [ids[j] for j in chosen(row)]
        with atomic_open(out, "wb") as dst:
            pq.write_table(pa.Table.from_pylist(rows), dst)
    elif source.endswith(".jsonl"):
        with open(source, encoding="utf-8") as src, atomic_open(out) as dst:
            for line in src:
                if not line.strip():
                    continue
                row = json.loads(line)
                row[column] = [texts[j] for j in chosen(row)]
                row["negative_ids"] = [ids[j] for j in chosen(row)]
                dst.write(json.dumps(row) + "\n")
    else:
        with open(source, newline="", encoding="utf-8") as src, atomic_open(out, newline="") as dst:
            reader = csv.DictReader(src)
            header = list(reader.fieldnames or [])
            fields = header + [f for f in (column, "negative_ids") if f not in header]
            writer = csv.DictWriter(dst, fieldnames=fields)
            writer.writeheader()
            for row in reader:
                row[column] = json.dumps([texts[j] for j in chosen(row)])
                row["negative_ids"] = json.dumps([ids[j] for j in chosen(row)])
                writer.writerow(row)
    # Media paths are relative to the manifest's folder: keep them valid next to the output.
    if os.path.dirname(os.path.abspath(out)) != os.path.dirname(os.path.abspath(source)):
        print(f"note: {out} is not beside {source}; set data.root={os.path.dirname(os.path.abspath(source))}")
    return out
