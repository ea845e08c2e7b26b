"""The audit's findings: one per (item, flag), with a reason in words, a severity and its scores.

Severity orders the work: the integer part is the kind of fault, the fraction how clear the
evidence is (0 at the flag's threshold, towards 1 far beyond it).

    3  missing / unreadable   the listing names a file that cannot be shown (fraction 0.5)
    2  mismatch               the photo, title, description or sound shows another product
    1  duplicate              the same photo (or text) under another id; the later id is flagged
    0  outlier                far from every other product: unusual, or broken in a way not caught above
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from align.audit.agreement import Agreement, AgreementThresholds, Isolation
from align.audit.media import WORDS, MediaProblem

FLAGS = ("missing", "unreadable", "mismatch", "duplicate", "outlier")
LEVEL = {"missing": 3, "unreadable": 3, "mismatch": 2, "duplicate": 1, "outlier": 0}
# Score columns of audit.csv, after item_id, flag, severity, reason; empty where they do not apply.
SCORE_COLUMNS = ("where", "view", "agreement_z", "sim_image_text", "rank_image_text", "rank_text_image",
                 "related_id", "phash_bits", "image_cosine", "crop", "structure", "grain", "colour_shift",
                 "nearest_cosine", "nearest_z", "file", "error")


@dataclass
class Finding:
    """One flag on one item.

    Attributes:
        row: the item's catalogue row.
        flag: one of ``FLAGS``.
        severity: see the module docstring.
        reason: what is wrong, in words.
        scores: ``SCORE_COLUMNS`` entries that apply.
        related: the catalogue row of the other item the reason names (the original of a
            duplicate, the nearest product of an outlier), or None.
    """

    row: int
    flag: str
    severity: float
    reason: str
    scores: Dict[str, Any] = field(default_factory=dict)
    related: Optional[int] = None


def view_word(view: str) -> str:
    """How a reason names a view: photo, sound, text, or the text column's own name."""
    return WORDS.get(view, view)


def _clarity(z: float, threshold: float) -> float:
    """0 at the threshold, towards 1 as |z| grows past it."""
    return float(min(0.99, max(0.0, 1 - threshold / max(abs(z), 1e-9))))


def _listing(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def media_findings(problems: Sequence[MediaProblem], rows: Sequence[Dict[str, Any]]) -> List[Finding]:
    """A ``missing`` or ``unreadable`` finding per bad file."""
    out = []
    for problem in problems:
        what = view_word(problem.modality)
        cell = rows[problem.row].get(problem.modality) or problem.path
        reason = (f"its {what} file {cell} is missing" if problem.flag == "missing"
                  else f"its {what} file {cell} cannot be used: {problem.detail[:160]}")
        out.append(Finding(problem.row, problem.flag, LEVEL[problem.flag] + 0.5, reason,
                           {"where": rows[problem.row].get("_where", ""), "view": problem.modality,
                            "file": problem.path, "error": problem.detail[:300]}))
    return out


def mismatch_findings(agreement: Agreement, thresholds: AgreementThresholds, rows: Sequence[Dict[str, Any]],
                      scores: Dict[int, Dict[str, Any]], looks_like: Dict[int, str],
                      texts: Dict[str, Sequence[Optional[str]]]) -> List[Finding]:
    """A ``mismatch`` finding per flagged item. ``scores``: row -> its image-text columns;
    ``looks_like``: row -> the catalogue text nearest to a wrong photo or sound; ``texts``: text
    view -> its text per row (a wrong title is quoted)."""
    count = len(agreement.worst)
    pair_z = {pair: stats.at(count, stats.z) for pair, stats in agreement.pairs.items()}  # (N,) each
    out = []
    for row in np.nonzero(agreement.mismatch)[0].tolist():
        z = float(agreement.worst[row])
        culprit = agreement.culprit[row]
        present = agreement.present(row)
        if culprit is None:
            reason = (f"its {view_word(present[0])} and its {view_word(present[1])} show different products "
                      f"(agreement z = {z:.1f})")
        else:
            others = _listing([view_word(v) for v in present if v != culprit])
            wrong = view_word(culprit)
            rest = [values[row] for (a, b), values in pair_z.items()
                    if culprit not in (a, b) and not np.isnan(values[row])]
            agree = all(value > -thresholds.mismatch_z for value in rest)
            reason = (f"wrong {wrong}? its {wrong} disagrees with its {others} (mean agreement z = {z:.1f}), "
                      + ("which agree with each other" if agree else "and those disagree among themselves too"))
            if row in looks_like:
                reason += f"; the {wrong} looks like {looks_like[row]!r}"
            elif culprit in texts and texts[culprit][row]:
                reason += f"; the {wrong} reads {texts[culprit][row]!r}"
        if agreement.baseline[row] < 0:
            reason += f"; its look-alikes (same text) sit at z = {agreement.baseline[row]:.1f}, counted from there"
        reason += f" [flag at z <= -{thresholds.mismatch_z:g}; 0 is this catalogue's typical agreement]"
        clarity = _clarity(z - float(agreement.baseline[row]), thresholds.mismatch_z)
        out.append(Finding(row, "mismatch", LEVEL["mismatch"] + clarity, reason,
                           {"where": rows[row].get("_where", ""), "view": culprit or "+".join(present),
                            "agreement_z": round(z, 2), **scores.get(row, {})}))
    return out


def duplicate_findings(groups: Sequence[Sequence[int]], evidence: Dict[tuple, Dict[str, Any]],
                       rows: Sequence[Dict[str, Any]], ids: Sequence[str]) -> List[Finding]:
    """A ``duplicate`` finding for every item of a group but its first (catalogue order), naming the
    earliest item it was found the same as. ``evidence``: (row, later row) -> the pair's scores,
    with ``kind`` "photo" or "text"."""
    out = []
    for group in groups:
        for row in group[1:]:
            # the pair that ties it to the earliest item it was found with
            key = min(((min(other, row), max(other, row)) for other in group if other != row
                       and (min(other, row), max(other, row)) in evidence), key=lambda pair: pair[0] + pair[1] - row)
            scores = evidence[key]
            original = key[0] if key[1] == row else key[1]
            if scores["kind"] == "text":
                sound = "the same sound file" if scores.get("sound") else "no sound"
                reason = (f"same text as item {ids[original]!r} and {sound}; neither has a photo that could tell "
                          f"them apart")
                clarity = 0.99
            else:
                reason = (f"same photo as item {ids[original]!r}: after undoing a crop of {scores['crop']:.0%} and a "
                          f"resize the photos share their grain (correlation {scores['grain']:.2f}) and differ in "
                          f"colour by {scores['colour_shift']:.1f} grey levels; pHash {scores['phash_bits']} bits apart"
                          + (f", image cosine {scores['image_cosine']:.3f}" if scores.get("image_cosine") is not None
                             else ""))
                clarity = min(0.99, max(0.0, float(scores["grain"])))
            columns = {name: (round(value, 4) if isinstance(value, float) else value)
                       for name, value in scores.items() if name in SCORE_COLUMNS}
            out.append(Finding(row, "duplicate", LEVEL["duplicate"] + clarity, reason,
                               {"where": rows[row].get("_where", ""), "related_id": ids[original], **columns},
                               related=original))
    return out


def outlier_findings(apart: Isolation, thresholds: AgreementThresholds, rows: Sequence[Dict[str, Any]],
                     ids: Sequence[str]) -> List[Finding]:
    """An ``outlier`` finding per flagged item, naming its most isolated modality's nearest product."""
    out = []
    for row in np.nonzero(apart.outlier)[0].tolist():
        present = [n for n in range(len(apart.modalities)) if not np.isnan(apart.z[row, n])]
        worst = min(present, key=lambda n: apart.z[row, n])
        median = float(np.nanmedian(apart.cosine[:, worst]))
        other = int(apart.nearest[row, worst])
        words = _listing([view_word(apart.modalities[n]) for n in present])
        reason = (f"far from every other product (mean z = {apart.score[row]:.1f} over its {words}; flag at z <= "
                  f"-{thresholds.outlier_z:g}): its {view_word(apart.modalities[worst])}'s nearest is item "
                  f"{ids[other]!r} at cosine {apart.cosine[row, worst]:.3f}, where this catalogue's items have one at "
                  f"{median:.3f}")
        out.append(Finding(row, "outlier", LEVEL["outlier"] + _clarity(float(apart.score[row]), thresholds.outlier_z),
                           reason, {"where": rows[row].get("_where", ""), "view": apart.modalities[worst],
                                    "related_id": ids[other],
                                    "nearest_cosine": round(float(apart.cosine[row, worst]), 4),
                                    "nearest_z": round(float(apart.score[row]), 2)}, related=other))
    return out


def by_severity(findings: List[Finding]) -> List[Finding]:
    """Most severe first; ties in catalogue order."""
    return sorted(findings, key=lambda f: (-f.severity, f.row, FLAGS.index(f.flag)))
