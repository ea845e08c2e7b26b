"""``align audit``: which listings of a catalogue are broken, and why.

    align audit --checkpoint runs/demo --manifest data/demo/train.csv data/demo/test.csv --out runs/demo/audit
    align audit ... --items runs/demo/items    (reuse what `align embed` wrote there)

Every item is embedded as ``align embed`` embeds it (align/audit/vectors.py), or its vectors are read
from ``--items``, the folder ``align embed`` wrote for the same checkpoint and manifests (checked:
model folder, item ids and their order, width, modalities, and that no model file, manifest or media
file changed since; the same results, without embedding the catalogue again). Every media file is
opened by the loaders' own readers (align/audit/media.py), and each item is checked for

  missing / unreadable  a photo or sound file that is not there or does not decode
  mismatch              a view (photo, title, description, sound) that shows another product than
                        the item's other views (align/audit/agreement.py)
  duplicate             the same photo under another id, possibly re-encoded, resized or cropped
                        by up to 10%; or the same text when no photo tells two items apart
                        (align/audit/duplicates.py); distinct photos of look-alike products are not
  outlier               far from every other product (align/audit/agreement.py)

Writes into --out: audit.csv (one row per finding: item_id, flag, severity, reason, scores; most
severe first), agreement.csv (every item's agreement scores), audit.json (counts, the thresholds
used and how they were chosen), report.html (the findings with their photos and texts; one
self-contained file) and agreement.png (the catalogue against the thresholds).

The defaults are catalogue-relative where the model is involved (robust z-scores of this
catalogue's own similarities, not cosines of one checkpoint) and in pixels and grey levels where
it is not (the duplicate check); each can be overridden.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import asdict, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from align.audit.agreement import (Agreement, AgreementThresholds, Isolation, View, isolation, measure_agreement,
                                   pair_stats, text_groups)
from align.audit.duplicates import (DuplicateThresholds, candidate_pairs, compare_pairs, duplicate_groups, hamming,
                                    text_duplicates)
from align.audit.findings import (FLAGS, Finding, by_severity, duplicate_findings, media_findings,
                                  mismatch_findings, outlier_findings)
from align.audit.media import Media, read_media, refused_by_model
from align.audit.report import (AGREEMENT_PNG, AUDIT_CSV, AUDIT_JSON, REPORT_HTML, AGREEMENT_CSV, write_agreement_csv,
                                write_findings_csv, write_html, write_plot, write_summary)
from align.audit.vectors import AuditVectors, embed_for_audit
from align.errors import ConfigError

HOW_CHOSEN = ("Mismatch and outlier thresholds are robust z-scores, (cosine - median) / (1.4826 MAD) over this "
              "catalogue's own items, so they do not depend on the checkpoint's cosine scale; the defaults sit "
              "beyond the 0.1% tail of the correct items of the demo catalogue. The duplicate check's thresholds "
              "are in pixels and grey levels, set so that none of the demo's 20 290 pairs of distinct look-alike "
              "renders passes while 99% of crops (<= 10%), resizes and JPEG re-encodes of its photos do.")


def audit_views(vectors: AuditVectors) -> Dict[str, View]:
    """The views compared (align/audit/vectors.py): the product's fields, a lone text field split by column."""
    return {name: View(vectors.vectors[name], vectors.masks[name]) for name in vectors.views}


def image_text_columns(vectors: AuditVectors, agreement: Agreement, groups: np.ndarray) -> Dict[int, Dict[str, Any]]:
    """row -> audit.csv's sim_image_text, rank_image_text, rank_text_image (joined text)."""
    items = vectors.items
    if "image" not in items.vectors or "text" not in items.vectors:
        return {}
    stats = agreement.pairs.get(("image", "text")) or pair_stats(
        View(items.vectors["image"], items.masks["image"]), View(items.vectors["text"], items.masks["text"]), groups)
    return {int(row): {"sim_image_text": round(float(sim), 4), "rank_image_text": int(ab), "rank_text_image": int(ba)}
            for row, sim, ab, ba in zip(stats.rows, stats.similarity, stats.rank_ab, stats.rank_ba)}


def looks_like(vectors: AuditVectors, agreement: Agreement) -> Dict[int, str]:
    """row -> the catalogue text nearest to the item's photo or sound, where that view is the wrong one."""
    items = vectors.items
    if "text" not in items.vectors:
        return {}
    texts = items.masks["text"].nonzero().flatten()
    if not len(texts):
        return {}
    out = {}
    for row, culprit in enumerate(agreement.culprit):
        if culprit is not None and vectors.views[culprit] != "text" and bool(vectors.masks[culprit][row]):
            best = int(texts[(items.vectors["text"][texts] @ vectors.vectors[culprit][row]).argmax()])
            out[row] = vectors.rows[best]["text"]
    return out


def find_duplicates(vectors: AuditVectors, media: Media, groups: np.ndarray, thresholds: DuplicateThresholds,
                    progress: bool = False) -> Tuple[List[List[int]], Dict[tuple, Dict[str, Any]], Dict[str, int]]:
    """(groups of catalogue rows, evidence per (row, later row), counts) of duplicates by photo and by text."""
    digests, items = media.digests, vectors.items
    photo_vectors = None
    if "image" in items.vectors and len(digests.rows):
        rows = torch.from_numpy(digests.rows)
        photo_vectors = items.vectors["image"][rows] * items.masks["image"][rows, None]  # zero rows: no neighbours
    pairs = candidate_pairs(digests, photo_vectors, thresholds)
    checked = compare_pairs(digests, pairs, thresholds, progress=progress)
    evidence: Dict[tuple, Dict[str, Any]] = {}
    for n in np.nonzero(checked["same"])[0].tolist():
        a, b = (int(digests.rows[i]) for i in pairs[n])
        cosine = float(photo_vectors[pairs[n, 0]] @ photo_vectors[pairs[n, 1]]) if photo_vectors is not None else None
        evidence[(min(a, b), max(a, b))] = {
            "kind": "photo", "crop": float(checked["crop"][n]), "structure": float(checked["structure"][n]),
            "grain": float(checked["grain"][n]), "colour_shift": float(checked["colour_shift"][n]),
            "phash_bits": int(hamming(digests.hashes[pairs[n, :1]], digests.hashes[pairs[n, 1:]])[0, 0]),
            "image_cosine": cosine}
    has_text = np.array([bool(row.get("text")) for row in vectors.rows])
    no_photo = np.array([not row.get("image") for row in vectors.rows])
    sound_known = np.array([not row.get("audio") or media.sounds[n] is not None for n, row in enumerate(vectors.rows)])
    for a, b in text_duplicates(groups, has_text & no_photo & sound_known, media.sounds):
        evidence.setdefault((a, b), {"kind": "text", "sound": media.sounds[a] is not None})
    counts = {"photos": int(len(digests.rows)), "candidate_pairs": int(len(pairs)),
              "same_photo_pairs": int(checked["same"].sum()),
              "same_text_pairs": sum(1 for e in evidence.values() if e["kind"] == "text")}
    return duplicate_groups(len(vectors.rows), list(evidence)), evidence, counts


def run_audit(checkpoint: str, manifests: Sequence[str], out: str, agreement_thresholds: AgreementThresholds,
              duplicate_thresholds: DuplicateThresholds, batch_size: int = 256, device: Optional[str] = None,
              report_limit: int = 300, progress: bool = True, items: Optional[str] = None) -> Dict[str, Any]:
    """Audit ``manifests`` with ``checkpoint`` and write the files into ``out``; returns audit.json's content.
    ``items``: an ``align embed`` folder of the same checkpoint and manifests whose vectors are reused."""
    seconds: Dict[str, float] = {}
    start = time.perf_counter()
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vectors = embed_for_audit(checkpoint, manifests, batch_size, target, progress, items)
    rows, ids = vectors.rows, vectors.items.ids
    seconds["embed"] = time.perf_counter() - start
    media = read_media(rows, vectors.roots, progress)
    problems = media.problems + refused_by_model(rows, vectors.roots, vectors.items.masks, media.problems)
    seconds["media"] = time.perf_counter() - start - sum(seconds.values())

    groups = text_groups([row.get("text") for row in rows])
    agreement = measure_agreement(audit_views(vectors), groups, agreement_thresholds)
    findings: List[Finding] = media_findings(problems, rows)
    findings += mismatch_findings(agreement, agreement_thresholds, rows, image_text_columns(vectors, agreement, groups),
                                  looks_like(vectors, agreement), vectors.texts)
    seconds["agreement"] = time.perf_counter() - start - sum(seconds.values())
    duplicate_sets, evidence, duplicate_counts = find_duplicates(vectors, media, groups, duplicate_thresholds,
                                                                 progress)
    findings += duplicate_findings(duplicate_sets, evidence, rows, ids)
    seconds["duplicates"] = time.perf_counter() - start - sum(seconds.values())

    broken = np.zeros(len(rows), dtype=bool)
    broken[[p.row for p in problems]] = True
    items = vectors.items
    apart = isolation({m: View(items.vectors[m], items.masks[m]) for m in items.modalities}, groups,
                      ~agreement.mismatch & ~broken, agreement_thresholds)
    findings += outlier_findings(apart, agreement_thresholds, rows, ids)
    findings = by_severity(findings)

    os.makedirs(out, exist_ok=True)
    summary = _summary(checkpoint, manifests, rows, findings, agreement, agreement_thresholds, duplicate_thresholds,
                       duplicate_counts, apart)
    summary["reused_embeddings"] = vectors.reused
    write_findings_csv(findings, ids, os.path.join(out, AUDIT_CSV))
    write_agreement_csv(agreement, apart, ids, rows, os.path.join(out, AGREEMENT_CSV))
    photo_paths = [os.path.join(vectors.roots[n], row["image"]) if row.get("image") else None
                   for n, row in enumerate(rows)]
    write_html(findings, ids, rows, photo_paths, summary, os.path.join(out, REPORT_HTML), report_limit)
    plot = write_plot(agreement, apart.score, agreement_thresholds.mismatch_z, agreement_thresholds.outlier_z,
                      os.path.join(out, AGREEMENT_PNG))
    seconds["report"] = time.perf_counter() - start - sum(seconds.values())
    summary["seconds"] = {key: round(value, 1) for key, value in seconds.items()}
    summary["files"] = [AUDIT_CSV, AGREEMENT_CSV, AUDIT_JSON, REPORT_HTML] + ([AGREEMENT_PNG] if plot else [])
    write_summary(summary, os.path.join(out, AUDIT_JSON))
    return summary


def _summary(checkpoint: str, manifests: Sequence[str], rows: Sequence[Dict[str, Any]], findings: Sequence[Finding],
             agreement: Agreement, agreement_thresholds: AgreementThresholds,
             duplicate_thresholds: DuplicateThresholds, duplicate_counts: Dict[str, int],
             apart: Isolation) -> Dict[str, Any]:
    counts = {flag: sum(1 for f in findings if f.flag == flag) for flag in FLAGS}
    return {
        "format": "align-audit/1", "checkpoint": os.path.abspath(checkpoint),
        "manifests": [os.path.abspath(m) for m in manifests], "items": len(rows),
        "flagged_items": len({f.row for f in findings}), "counts": counts,
        "thresholds": {"agreement": asdict(agreement_thresholds), "duplicates": asdict(duplicate_thresholds)},
        "how_thresholds_were_chosen": HOW_CHOSEN,
        "catalogue": {
            "views": agreement.views,
            "pairs": {f"{a}-{b}": {"items": int(len(s.rows)), "median_cosine": round(s.median, 4),
                                   "robust_scale": round(s.scale, 4)} for (a, b), s in agreement.pairs.items()},
            "nearest_other_product": {m: {"median_cosine": _median(apart.cosine[:, n])}
                                      for n, m in enumerate(apart.modalities)},
        },
        "blind_spots": _blind_spots(agreement, rows, agreement_thresholds),
        "duplicates": duplicate_counts,
    }


def _blind_spots(agreement: Agreement, rows: Sequence[Dict[str, Any]],
                 thresholds: AgreementThresholds) -> List[Dict[str, Any]]:
    """Texts whose look-alikes all disagree alike (``group_baseline`` <= -mismatch_z): products the
    model does not know well, not faulty listings; their items are judged against each other."""
    spots: Dict[str, Dict[str, Any]] = {}
    for row in np.nonzero(agreement.baseline <= -thresholds.mismatch_z)[0].tolist():
        text = rows[row].get("text") or ""
        spot = spots.setdefault(text, {"text": text, "items": 0, "median_z": round(float(agreement.baseline[row]), 2)})
        spot["items"] += 1
    return sorted(spots.values(), key=lambda spot: spot["median_z"])


def _median(values: np.ndarray) -> Optional[float]:
    finite = values[np.isfinite(values)]
    return round(float(np.median(finite)), 4) if len(finite) else None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align audit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint or its model/ folder (model.safetensors)")
    parser.add_argument("--manifest", required=True, nargs="+", help="CSV, JSONL or Parquet catalogue(s)")
    parser.add_argument("--out", required=True, help="folder for audit.csv, audit.json, report.html ...")
    parser.add_argument("--items", help="the --out folder of `align embed` for the same checkpoint and manifests: "
                                        "its item vectors are read, not embedded again (per-column text views "
                                        "are still embedded); refused when it does not match")
    parser.add_argument("--batch-size", type=int, default=256, help="samples per embedding batch (give --items' "
                                                                    "own, for the same vectors bit for bit)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--report-limit", type=int, default=300,
                        help="findings shown in report.html (all are in audit.csv)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    agreement = parser.add_argument_group("agreement thresholds (robust z-scores over this catalogue)")
    duplicates = parser.add_argument_group("duplicate thresholds (pixels and grey levels; align/audit/duplicates.py)")
    for group, thresholds in ((agreement, AgreementThresholds), (duplicates, DuplicateThresholds)):
        for item in fields(thresholds):
            group.add_argument("--" + item.name.replace("_", "-"), type=type(item.default), default=item.default,
                               help=f"{item.metadata['help']} (default {item.default})")
    return parser


def _check(args: argparse.Namespace) -> None:
    """A ``ConfigError`` for an argument that cannot be used, before anything is embedded."""
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ConfigError(f"--out {args.out}: a file is in the way; name a folder")
    if args.items is not None and not os.path.isdir(args.items):
        raise ConfigError(f"--items {args.items}: no such folder; give the --out folder of `align embed`")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: must be positive")
    for item in fields(AgreementThresholds) + fields(DuplicateThresholds):
        _check_threshold(item.name, getattr(args, item.name))


def _check_threshold(name: str, value: float) -> None:
    """A ``ConfigError`` naming the flag unless ``value`` is usable. NaN passes no comparison, so each
    test says what a usable value satisfies."""
    flag = f"--{name.replace('_', '-')} {value}"
    if isinstance(value, int):  # pHash bits, neighbours: 0 turns that source of candidates off
        if not value >= 0:
            raise ConfigError(f"{flag}: a count, must be >= 0")
        return
    if not (math.isfinite(value) and value > 0):  # z-scores, shares, grey levels, correlations
        raise ConfigError(f"{flag}: must be finite and > 0")
    if name == "max_crop" and not value < 0.5:  # a crop of half a side leaves nothing to compare
        raise ConfigError(f"{flag}: a share of a side, in (0, 0.5)")
    if name in ("min_grain", "weak_grain") and not value <= 1:
        raise ConfigError(f"{flag}: a correlation, at most 1 (above, no pair passes)")


def _print_summary(summary: Dict[str, Any], out: str) -> None:
    counts = summary["counts"]
    print(f"audited {summary['items']} items: {summary['flagged_items']} flagged "
          + "(" + ", ".join(f"{flag} {counts[flag]}" for flag in FLAGS) + ")")
    if summary["reused_embeddings"]:
        print(f"  item vectors read from {summary['reused_embeddings']} (align embed), not embedded again")
    print(f"  duplicates: {summary['duplicates']['candidate_pairs']} candidate pairs of "
          f"{summary['duplicates']['photos']} photos checked")
    print("  " + ", ".join(f"{k} {v:.0f} s" for k, v in summary["seconds"].items()))
    print(f"  -> {os.path.join(out, AUDIT_CSV)} (most severe first), {', '.join(summary['files'][1:])}")


def main(argv: Optional[List[str]] = None) -> int:
    """``align audit``; a ``ConfigError`` or ``RunError`` is left to align/cli.py to report."""
    args = _parser().parse_args(argv)
    _check(args)
    agreement = AgreementThresholds(**{f.name: getattr(args, f.name) for f in fields(AgreementThresholds)})
    duplicates = DuplicateThresholds(**{f.name: getattr(args, f.name) for f in fields(DuplicateThresholds)})
    summary = run_audit(args.checkpoint, args.manifest, args.out, agreement, duplicates, args.batch_size, args.device,
                        args.report_limit, progress=not args.no_progress, items=args.items)
    _print_summary(summary, args.out)
    return 0
