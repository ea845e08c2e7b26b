"""A shop's search log read, checked and merged into graded (query, item, grade) judgements.

A search log is a table with one row per judgement or event, in CSV, JSONL or Parquet (chosen
by the suffix), read beside the catalogue manifest(s) whose ids the items must be::

    query,query_image,query_audio,item_id,event,relevance,timestamp
    red striped star,,,000123,cart,,2024-03-01T10:15:00Z
    ,photos/q17.jpg,,000123,buy,,1709288100
    ,,voice/q18.flac,000456,,2.5,

The query is in exactly one of three columns, which says its modality:

* ``query``: the text a customer typed (a text query);
* ``query_image``: the path of the photo a customer searched with (a photo query);
* ``query_audio``: the path of the recording a customer searched with (a voice query).

Media paths are relative to ``media_root`` (by default the log's folder, as catalogue paths are
relative to the manifest's). Text queries are compared with their whitespace collapsed and case
folded ("Red  Star" and "red star" are one query); the first spelling seen is kept.

The grade of a row: ``relevance`` (a finite number >= 0; 0 is an explicit "not relevant") when
the row has one, otherwise its ``event`` through ``EventGrades`` (default view 1, click 1,
cart 2, buy 3, purchase 3; event names compared case-folded). ``timestamp`` (optional) is unix
seconds or ISO-8601 text, as in interaction logs (align/rec/interactions.py).

Rows that cannot be used are dropped and counted by reason (``DROPPED_REASONS``, checked in that
order, so a row is counted once, under the first reason that applies): ``empty_query`` (none of
the three query columns has a value), ``mixed_query`` (more than one has), ``empty_item``,
``unknown_item`` (an id not in the catalogue), ``bad_relevance`` (a relevance cell that is not a
finite number >= 0), ``unknown_event`` (no relevance, and an event that is empty or not in the
mapping), ``bad_timestamp`` (a timestamp cell that is neither seconds nor ISO-8601),
``missing_media`` (a photo or voice query whose file does not exist). More than
``max_bad_fraction`` dropped rows is a ``RunError`` naming the file and example rows: a log that
is 5% garbage usually means a wrong column or a broken export.

A ``duplicate`` (same query and item as an earlier good row) is merged, not dropped: the pair
keeps the highest grade and the earliest time. Duplicates are counted and shown with examples but
do not count towards the bad fraction, since an event log holds one row per event (a view, then
a cart, then a buy of one item after one query) and merging them loses nothing.
"""
from __future__ import annotations

import math
import os
import unicodedata
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from align.data.tables import (BadRows, RowChecks, as_numbers, as_seconds, as_text, catalogue_index,
                               describe_item_or_time, first_reason, read_columns)
from align.errors import ConfigError, RunError

QueryModality = Literal["text", "image", "audio"]
DROPPED_REASONS = ("empty_query", "mixed_query", "empty_item", "unknown_item", "bad_relevance",
                   "unknown_event", "bad_timestamp", "missing_media")
REASONS = DROPPED_REASONS + ("duplicate",)
DEFAULT_EVENT_GRADES: Dict[str, float] = {"view": 1.0, "click": 1.0, "cart": 2.0, "buy": 3.0, "purchase": 3.0}


@dataclass(frozen=True)
class EventGrades:
    """Event name -> graded relevance (a finite number >= 0); names are compared case-folded.

    ``EventGrades.parse("view=1,cart=2,buy=3")`` reads the command-line form."""

    grades: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_EVENT_GRADES))

    def __post_init__(self) -> None:
        clean: Dict[str, float] = {}
        for name, grade in dict(self.grades).items():
            if not isinstance(name, str) or not name.strip():
                raise ConfigError(f"search log events: event name {name!r} must be non-empty text")
            if isinstance(grade, bool) or not isinstance(grade, (int, float)) or not math.isfinite(grade) or grade < 0:
                raise ConfigError(f"search log events: {name} = {grade!r} must be a finite number >= 0 "
                                  f"(e.g. --events view=1,cart=2,buy=3)")
            key = name.strip().casefold()
            if key in clean:
                raise ConfigError(f"search log events: event {name!r} is given twice (names are compared case-folded)")
            clean[key] = float(grade)
        if not clean:
            raise ConfigError("search log events: the mapping is empty; give at least one event=grade")
        object.__setattr__(self, "grades", clean)

    @classmethod
    def parse(cls, spec: str) -> "EventGrades":
        """``"view=1,cart=2,buy=3"`` -> EventGrades; a malformed piece is a ``ConfigError`` naming it."""
        grades: Dict[str, float] = {}
        for piece in (p.strip() for p in spec.split(",")):
            if not piece:
                continue
            name, sep, value = piece.partition("=")
            try:
                if not sep:
                    raise ValueError
                grade = float(value)
            except ValueError:
                raise ConfigError(f"search log events: {piece!r} is not event=grade "
                                  f"(e.g. view=1,cart=2,buy=3)") from None
            if name.strip().casefold() in {k.casefold() for k in grades}:
                raise ConfigError(f"search log events: event {name.strip()!r} is given twice in {spec!r}")
            grades[name.strip()] = grade
        return cls(grades)


@dataclass(frozen=True)
class SearchLogColumns:
    """Which column holds what (see the module docstring); ``None`` ignores a column. At least
    one query column and one of ``relevance``/``event`` must be in the file."""

    query: Optional[str] = "query"
    query_image: Optional[str] = "query_image"
    query_audio: Optional[str] = "query_audio"
    item: str = "item_id"
    relevance: Optional[str] = "relevance"
    event: Optional[str] = "event"
    time: Optional[str] = "timestamp"


@dataclass(frozen=True)
class Query:
    """One distinct query of a log.

    Attributes:
        modality: "text" (typed), "image" (a photo query) or "audio" (a voice query).
        text: the typed text, whitespace collapsed, as first spelled in the log; "" otherwise.
        media: the photo or recording as written in the log; "" for a text query.
        path: ``media`` resolved against the media root (what a loader opens); "" for text.
    """

    modality: QueryModality
    text: str = ""
    media: str = ""
    path: str = ""

    @property
    def key(self) -> str:
        """What makes two rows the same query: modality + case-folded text, or the resolved path."""
        return f"text:{self.text.casefold()}" if self.modality == "text" else f"{self.modality}:{self.path}"


@dataclass
class SearchLog:
    """A search log merged into one graded judgement per (query, item) pair.

    Attributes:
        queries: the distinct queries, in order of first appearance in the log.
        query_codes: (P,) int64 index into ``queries``, one entry per pair, pairs in order of
            first appearance.
        items: (P,) int64 index into ``item_ids`` (catalogue order, so codes line up with item
            embeddings).
        grades: (P,) float32 graded relevance (the highest of the pair's rows).
        times: (P,) float64 earliest time of the pair in seconds; NaN when the log has none.
        item_ids: the catalogue's ids.
    """

    queries: List[Query]
    query_codes: np.ndarray
    items: np.ndarray
    grades: np.ndarray
    times: np.ndarray
    item_ids: List[str]

    def __len__(self) -> int:
        return len(self.query_codes)

    def judgements(self) -> List[Tuple[Query, np.ndarray, np.ndarray]]:
        """(query, item codes (J,), grades (J,)) for every query, judged items by grade, highest
        first (ties in log order)."""
        order = np.lexsort((np.arange(len(self)), -self.grades, self.query_codes))
        bounds = np.searchsorted(self.query_codes[order], np.arange(len(self.queries) + 1))
        return [(query, self.items[order[a:b]], self.grades[order[a:b]])
                for query, a, b in zip(self.queries, bounds[:-1], bounds[1:])]

    def modality_counts(self) -> Dict[str, int]:
        """Distinct queries per modality."""
        counts = {"text": 0, "image": 0, "audio": 0}
        for query in self.queries:
            counts[query.modality] += 1
        return counts


SEARCH_LOG_ROW_CHECKS = RowChecks(
    table="search log", reasons=REASONS, merged=("duplicate",),
    to_check="the column names, the event mapping and the catalogue",
    limit_hint="align prep search-log validate --max-bad-fraction, read_search_log(max_bad_fraction=...)")


def _given(raw: Optional[np.ndarray], n: int) -> np.ndarray:
    """(n,) bool: the cell has a value (text: non-empty; numbers: not NaN); all False without a column."""
    if raw is None:
        return np.zeros(n, dtype=bool)
    return raw != "" if raw.dtype == object else ~np.isnan(raw.astype(np.float64))


def _query_columns(table: Dict[str, np.ndarray], columns: SearchLogColumns, n: int) -> Dict[str, np.ndarray]:
    """{"text", "image", "audio"} -> (n,) object array of the cell text ("" where empty or absent)."""
    out = {}
    for modality, name in (("text", columns.query), ("image", columns.query_image), ("audio", columns.query_audio)):
        values = as_text(table[name]) if name and name in table else np.full(n, "", dtype=object)
        if modality == "text":  # "red  star " and "red star" are one query, as are "café" and "cafe\u0301"
            values = np.asarray([" ".join(unicodedata.normalize("NFKC", v).split()) for v in values], dtype=object)
        out[modality] = values
    return out


def read_search_log(path: str, item_ids: Sequence[str], events: EventGrades = EventGrades(),
                    columns: SearchLogColumns = SearchLogColumns(), media_root: Optional[str] = None,
                    max_bad_fraction: float = 0.01) -> Tuple[SearchLog, BadRows]:
    """Read a CSV/JSONL/Parquet search log against the catalogue's ``item_ids``.

    Returns the judgements (``SearchLog``: one graded pair per query and item) and the rows
    dropped or merged, by reason (``BadRows``; reasons in the module docstring, duplicates merged).

    Raises:
        RunError: unknown suffix, missing file, a missing item column, no query column or no
            grade column (naming the file and the columns looked for), an empty log, or more
            than ``max_bad_fraction`` dropped rows (naming the file, the counts and rows).
    """
    path = os.fspath(path)
    item_ids = [str(i) for i in item_ids]
    catalogue = catalogue_index(item_ids, path)
    root = os.path.abspath(media_root if media_root is not None else os.path.dirname(os.path.abspath(path)))
    query_names = [c for c in (columns.query, columns.query_image, columns.query_audio) if c]
    optional = [c for c in (*query_names, columns.relevance, columns.event, columns.time) if c]
    table = read_columns(path, [columns.item], optional,
                          hint="Name the columns (align prep search-log validate --item-column ...).")
    if not any(c in table for c in query_names):
        raise RunError(f"{path}: none of the query columns {query_names} is in the file; a search log "
                       f"needs the query text (or a photo/recording path) of every row")
    if not any(c and c in table for c in (columns.relevance, columns.event)):
        raise RunError(f"{path}: neither a {columns.relevance!r} nor an {columns.event!r} column is in the "
                       f"file; every row needs a relevance grade or an event (view, cart, buy ...)")

    items = as_text(table[columns.item])
    n = len(items)
    if n == 0:
        raise RunError(f"{path}: the log has no data rows")
    query = _query_columns(table, columns, n)
    filled = sum((query[m] != "").astype(np.int64) for m in query)  # (n,) query columns with a value
    item_codes = catalogue.get_indexer(items).astype(np.int64)

    relevance_raw = table.get(columns.relevance) if columns.relevance else None
    relevance_given = _given(relevance_raw, n)
    relevance = as_numbers(relevance_raw) if relevance_raw is not None else np.full(n, np.nan)
    event_raw = table.get(columns.event) if columns.event else None
    event_text = as_text(event_raw) if event_raw is not None else np.full(n, "", dtype=object)
    event_grade = pd.Series(event_text, dtype=object).str.casefold().map(events.grades).to_numpy(np.float64)
    grade = np.where(relevance_given, relevance, event_grade)
    time_raw = table.get(columns.time) if columns.time else None
    times = as_seconds(time_raw) if time_raw is not None else np.full(n, np.nan)

    modality = np.where(query["image"] != "", "image", np.where(query["audio"] != "", "audio", "text"))
    media = np.where(modality == "image", query["image"], np.where(modality == "audio", query["audio"], ""))
    resolved = np.asarray([os.path.normpath(os.path.join(root, m)) if m else "" for m in media], dtype=object)
    exists = {p: os.path.isfile(p) for p in set(resolved.tolist()) if p}

    checks = {
        "empty_query": filled == 0,
        "mixed_query": filled > 1,
        "empty_item": items == "",
        "unknown_item": item_codes < 0,
        "bad_relevance": relevance_given & ~(np.isfinite(relevance) & (relevance >= 0)),
        "unknown_event": ~relevance_given & np.isnan(event_grade),
        "bad_timestamp": _given(time_raw, n) & ~np.isfinite(times),
        "missing_media": np.asarray([bool(p) and not exists[p] for p in resolved], dtype=bool),
    }
    reason = first_reason(checks, DROPPED_REASONS, n)

    # Query identity: modality + case-folded text, or the resolved media path.
    query_key = np.where(modality == "text", "text:" + pd.Series(query["text"], dtype=object).str.casefold().to_numpy(),
                         modality.astype(object) + ":" + resolved)
    good = np.flatnonzero(reason < 0)
    pair_code, _ = pd.factorize(pd.Series(query_key[good] + "\x00" + items[good], dtype=object), sort=False)
    repeat = pd.Series(pair_code).duplicated().to_numpy()
    reason[good[repeat]] = REASONS.index("duplicate")
    first_row = good[np.unique(pair_code, return_index=True)[1]]  # (P,) the first row of each pair

    report = BadRows.tally(SEARCH_LOG_ROW_CHECKS, reason,
                           lambda name, row: _describe(name, row, items, query, relevance_raw, event_text, time_raw,
                                                       resolved, good, pair_code, first_row, columns), path)
    report.check(max_bad_fraction)
    return _merge(good, pair_code, first_row, query_key, modality, query, media, resolved,
                  item_codes, grade, times, item_ids), report


def _merge(good: np.ndarray, pair_code: np.ndarray, first_row: np.ndarray, query_key: np.ndarray,
           modality: np.ndarray, query: Dict[str, np.ndarray], media: np.ndarray, resolved: np.ndarray,
           item_codes: np.ndarray, grade: np.ndarray, times: np.ndarray, item_ids: List[str]) -> SearchLog:
    """The good rows as one judgement per pair: the highest grade, the earliest time."""
    n_pairs = len(first_row)
    best = np.full(n_pairs, -np.inf)
    np.maximum.at(best, pair_code, grade[good])
    earliest = np.full(n_pairs, np.inf)
    np.minimum.at(earliest, pair_code, np.where(np.isnan(times[good]), np.inf, times[good]))
    query_codes, _ = pd.factorize(pd.Series(query_key[first_row], dtype=object), sort=False)
    _, first_of_query = np.unique(query_codes, return_index=True)  # factorize numbers queries in order
    queries = [Query(modality=str(modality[r]), text=str(query["text"][r]) if modality[r] == "text" else "",
                     media=str(media[r]), path=str(resolved[r]))
               for r in first_row[first_of_query]]
    return SearchLog(queries=queries, query_codes=query_codes.astype(np.int64), items=item_codes[first_row],
                     grades=best.astype(np.float32), times=np.where(np.isinf(earliest), np.nan, earliest),
                     item_ids=item_ids)


def _describe(reason: str, row: int, items: np.ndarray, query: Dict[str, np.ndarray],
              relevance_raw: Optional[np.ndarray], event_text: np.ndarray, time_raw: Optional[np.ndarray],
              resolved: np.ndarray, good: np.ndarray, pair_code: np.ndarray, first_row: np.ndarray,
              columns: SearchLogColumns) -> str:
    """One example line: the 1-based data row and what is wrong with it."""
    shared = describe_item_or_time(reason, row, columns.item, items, time_raw)
    if shared is not None:
        return shared
    at = f"row {row + 1}"
    if reason == "empty_query":
        return f"{at}: no query text, photo or recording (columns {columns.query!r}, {columns.query_image!r}, " \
               f"{columns.query_audio!r} all empty)"
    if reason == "mixed_query":
        given = [m for m in ("text", "image", "audio") if query[m][row] != ""]
        return f"{at}: the query has {' and '.join(given)}; give exactly one of them per row"
    if reason == "bad_relevance":
        return f"{at}: relevance {relevance_raw[row]!r} is not a finite number >= 0"
    if reason == "unknown_event":
        if event_text[row] == "":
            return f"{at}: no relevance and no event"
        return f"{at}: event {event_text[row]!r} is not in the event mapping (--events)"
    if reason == "missing_media":
        return f"{at}: query file {resolved[row]!r} does not exist"
    position = int(np.searchsorted(good, row))
    return f"{at}: same query and item as row {first_row[pair_code[position]] + 1} (merged, highest grade kept)"
