"""The audit's files: ``audit.csv`` (the findings, most severe first), ``agreement.csv`` (every
item's agreement scores), ``audit.json`` (counts and the thresholds used), ``report.html`` (the
flagged items with their photos and texts, one self-contained file: photos are embedded as base64
data URIs, nothing is fetched) and ``agreement.png`` (where the catalogue's items lie against the
thresholds, when matplotlib is installed). Each file is written atomically.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import math
from typing import Any, Dict, Optional, Sequence

import numpy as np

from align.audit.agreement import Agreement, Isolation
from align.audit.findings import FLAGS, SCORE_COLUMNS, Finding
from align.errors import atomic_open, write_json_atomic

AUDIT_CSV, AGREEMENT_CSV, AUDIT_JSON, REPORT_HTML, AGREEMENT_PNG = (
    "audit.csv", "agreement.csv", "audit.json", "report.html", "agreement.png")
THUMBNAIL = 112  # longest side of a report's photo, pixels


def write_findings_csv(findings: Sequence[Finding], ids: Sequence[str], path: str) -> None:
    """One row per finding, in the given (severity) order: item_id, flag, severity, reason, scores."""
    with atomic_open(path, newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["item_id", "flag", "severity", "reason", *SCORE_COLUMNS])
        for finding in findings:
            writer.writerow([ids[finding.row], finding.flag, f"{finding.severity:.3f}", finding.reason,
                             *(_cell(finding.scores.get(column)) for column in SCORE_COLUMNS)])


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_agreement_csv(agreement: Agreement, apart: Isolation, ids: Sequence[str], rows: Sequence[Dict[str, Any]],
                        path: str) -> None:
    """Every item: per view its agreement z and the worst, per pair of views the cosine and both
    ranks; per modality the nearest other product's cosine and z, and the mean (``isolation_z``)."""
    count = len(ids)
    columns: Dict[str, np.ndarray] = {f"z_{view}": agreement.scores[:, n] for n, view in enumerate(agreement.views)}
    columns["z_worst"], columns["z_baseline"] = agreement.worst, agreement.baseline
    for (a, b), stats in agreement.pairs.items():
        columns[f"sim_{a}_{b}"] = stats.at(count, stats.similarity)
        columns[f"rank_{a}_{b}"] = stats.at(count, stats.rank_ab)
        columns[f"rank_{b}_{a}"] = stats.at(count, stats.rank_ba)
    for n, modality in enumerate(apart.modalities):
        columns[f"nearest_cosine_{modality}"], columns[f"nearest_z_{modality}"] = apart.cosine[:, n], apart.z[:, n]
    columns["isolation_z"] = apart.score
    with atomic_open(path, newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["item_id", "where", "mismatch", "outlier", *columns])
        for row in range(count):
            cells = [_cell(int(values[row]) if name.startswith("rank_") and not math.isnan(values[row])
                           else float(values[row])) for name, values in columns.items()]
            writer.writerow([ids[row], rows[row].get("_where", ""), int(agreement.mismatch[row]),
                             int(apart.outlier[row]), *cells])


def write_summary(summary: Dict[str, Any], path: str) -> None:
    """``audit.json``."""
    write_json_atomic(summary, path)


def thumbnail_uri(path: Optional[str]) -> Optional[str]:
    """A photo as a ``data:image/jpeg;base64,...`` URI at most ``THUMBNAIL`` pixels a side; None when
    there is no path or the file cannot be read."""
    if not path:
        return None
    from align.data.manifest import open_image
    from align.data.sample import BadSample

    try:
        image = open_image(path, "", "")
    except BadSample:
        return None
    scale = THUMBNAIL / max(image.size)  # small photos are enlarged too, so that a person can see them
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=88)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #1d2330; background: #fafbfc; }
h1 { margin: 0 0 4px; font-size: 22px; } h2 { font-size: 17px; margin: 20px 0 4px; }
.meta { color: #5b6475; margin-bottom: 16px; }
.chips { margin-bottom: 14px; } .chips .flag { display: inline-block; margin: 0 8px 8px 0; padding: 6px 12px; }
table { border-collapse: collapse; width: 100%; background: white; }
th, td { border-bottom: 1px solid #e3e7ee; padding: 8px; vertical-align: top; text-align: left; }
th { background: #f0f3f8; position: sticky; top: 0; }
td.photo { width: 120px; }
img { display: block; max-width: 112px; max-height: 112px; border: 1px solid #d5dae3; background: #fff; }
.none { width: 112px; height: 84px; display: flex; align-items: center; justify-content: center;
  border: 1px dashed #c2563e; color: #c2563e; font-size: 12px; text-align: center; }
.flag { font-weight: 700; padding: 2px 8px; border-radius: 10px; color: white; white-space: nowrap; }
.missing, .unreadable { background: #b3261e; } .mismatch { background: #d9730d; }
.duplicate { background: #2f6fb3; } .outlier { background: #6b5ca5; }
.text { max-width: 260px; } td.why { max-width: 380px; } .id { font-family: ui-monospace, monospace; }
td { overflow-wrap: anywhere; }
.small { color: #5b6475; font-size: 12px; }
"""


def _photo_cell(uri: Optional[str], has_photo: bool) -> str:
    if uri:
        return f'<img src="{uri}" alt="photo">'
    return f'<div class="none">{"photo cannot be shown" if has_photo else "no photo"}</div>'


def write_html(findings: Sequence[Finding], ids: Sequence[str], rows: Sequence[Dict[str, Any]],
               photo_paths: Sequence[Optional[str]], summary: Dict[str, Any], path: str, limit: int) -> None:
    """``report.html``: the counts, then the ``limit`` most severe findings, each with the item's
    photo and text and, for a duplicate or an outlier, the other item's."""
    cache: Dict[int, Optional[str]] = {}

    def photo(row: int) -> str:
        if row not in cache:
            cache[row] = thumbnail_uri(photo_paths[row])
        return _photo_cell(cache[row], bool(photo_paths[row]))

    def item(row: int) -> str:
        return (f'<div class="id">{html.escape(ids[row])}</div>'
                f'<div class="text">{html.escape(rows[row].get("text") or "(no text)")}</div>'
                f'<div class="small">{html.escape(rows[row].get("_where", ""))}</div>')

    counts = summary["counts"]
    chips = "".join(f'<span class="flag {flag}">{flag}: {counts.get(flag, 0)}</span>' for flag in FLAGS)
    lines = [f"<tr><td>{f.severity:.2f}</td><td><span class=\"flag {f.flag}\">{f.flag}</span></td>"
             f"<td class=\"photo\">{photo(f.row)}</td><td>{item(f.row)}</td>"
             f"<td class=\"why\">{html.escape(f.reason)}</td>"
             + (f"<td class=\"photo\">{photo(f.related)}</td><td>{item(f.related)}</td>" if f.related is not None
                else "<td></td><td></td>") + "</tr>"
             for f in findings[:limit]]
    more = (f"<p class=\"small\">{len(findings) - limit} more findings are in {AUDIT_CSV}.</p>"
            if len(findings) > limit else "")
    spots = "".join(f"<li>{html.escape(spot['text'])} ({spot['items']} items, median z = {spot['median_z']})</li>"
                    for spot in summary.get("blind_spots", []))
    if spots:
        spots = ("<h2>Products the model does not know well</h2><p class=\"small\">All their listings disagree "
                 "alike, so the model, not the listings, is the likely cause; each item is judged against its "
                 f"look-alikes instead of the whole catalogue.</p><ul>{spots}</ul>")
    thresholds = html.escape(", ".join(f"{name} = {value}" for group in summary["thresholds"].values()
                                       for name, value in group.items()))
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Catalogue audit</title><style>{STYLE}</style></head>
<body>
<h1>Catalogue audit</h1>
<div class="meta">{summary['items']} items in {html.escape(', '.join(summary['manifests']))}; checkpoint
{html.escape(summary['checkpoint'])}; {summary['flagged_items']} items flagged.</div>
<div class="chips">{chips}</div>
<table>
<tr><th>severity</th><th>flag</th><th>photo</th><th>item</th><th>why</th><th>other item</th><th></th></tr>
{''.join(lines) or '<tr><td colspan="7">Nothing flagged.</td></tr>'}
</table>
{more}
{spots}
<p class="small">Thresholds: {thresholds}. {html.escape(summary['how_thresholds_were_chosen'])}</p>
</body></html>
"""
    with atomic_open(path) as handle:
        handle.write(page)


def write_plot(agreement: Agreement, isolation_z: np.ndarray, mismatch_z: float, outlier_z: float,
               path: str) -> Optional[str]:
    """``agreement.png``: histograms of the items' worst agreement z and isolation z, with the flags'
    thresholds; None when matplotlib is not installed."""
    from align.eval.plots import matplotlib_pyplot, save_figure

    plt = matplotlib_pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    corrected = agreement.worst - agreement.baseline  # what the mismatch flag reads
    for ax, values, threshold, title in ((axes[0], corrected, mismatch_z, "agreement of an item's views"),
                                         (axes[1], isolation_z, outlier_z, "nearness to other products")):
        finite = values[np.isfinite(values)]
        if len(finite):
            low = min(float(finite.min()), -threshold) - 1
            ax.hist(np.clip(finite, low, None), bins=80, color="#4a78b5")
        ax.axvline(-threshold, color="#c2563e", linestyle="--", label=f"flag at z <= -{threshold:g}")
        ax.set_yscale("log")
        ax.set_xlabel("robust z (0: this catalogue's typical item)")
        ax.set_ylabel("items")
        ax.set_title(title)
        ax.legend(fontsize=8)
    return save_figure(fig, path)
