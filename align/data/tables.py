"""Log tables (CSV, JSONL, Parquet) read column-wise into typed arrays, and their bad rows counted.

Interaction logs (align/rec/interactions.py) and search logs (align/searchlog/log.py) are read
the same way: ``read_columns`` gives every wanted column as a numpy array in one of two forms, so
the checks after it handle two cases only:

* text: an object array of stripped ``str``, "" for a missing cell. CSV cells are always text,
  so "007" keeps its zeros.
* numbers: float64/int64, NaN for a missing cell: JSON numbers, Parquet numbers, and
  Parquet/JSON timestamps already turned into float seconds since 1970 UTC.

``as_text``, ``as_numbers`` and ``as_seconds`` turn either form into what a check needs.
Millions of rows take a few seconds (pandas/pyarrow), not row by row as catalogue manifests are
read (align/data/manifest.py). Nothing read is unpickled.

``BadRows`` counts the rows a reader drops by reason, with a few examples each, and refuses a
table with too many of them (``RowChecks`` says which reasons a kind of table has, and what to
tell its user).
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from align.data.manifest import MANIFEST_ENCODING, MANIFEST_SUFFIXES, jsonl_objects
from align.errors import RunError

SUFFIXES = MANIFEST_SUFFIXES
MAX_EXAMPLES = 5  # example rows kept per reason
_SECONDS_PER_UNIT = {"s": 1.0, "ms": 1e3, "us": 1e6, "ns": 1e9}


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
def table_suffix(path: str) -> str:
    """The lower-case suffix of a table file; one that is not CSV/JSONL/Parquet is a ``RunError``."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in SUFFIXES:
        raise RunError(f"{path}: unknown file format {suffix or '(no suffix)'!r}; use one of {SUFFIXES}")
    return suffix


def read_columns(path: str, required: Sequence[str], optional: Sequence[str] = (),
                 hint: str = "") -> Dict[str, np.ndarray]:
    """{column: (N,) array} (text or numbers, see the module docstring) for the ``required``
    columns and those ``optional`` ones the file has. A required column the file lacks is a
    ``RunError`` naming the file, the column, the columns the file has and then ``hint`` (how to
    name the columns); so is a file that does not parse."""
    import pyarrow as pa

    suffix = table_suffix(path)
    if not os.path.isfile(path):
        raise RunError(f"{path} does not exist")
    try:
        table = _read_table(path, suffix, [*required, *optional])
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError, ValueError) as error:
        raise RunError(f"{path}: cannot be read as {suffix[1:].upper()} ({error})") from None
    missing = [c for c in required if c not in table["columns"]]
    if missing:
        raise RunError(f"{path}: column {missing[0]!r} is missing; the file has columns "
                       f"{table['header']}. {hint}".strip())
    return table["columns"]


def _read_table(path: str, suffix: str, wanted: Sequence[str]) -> Dict:
    """{"header": all column names, "columns": {name: array} for the ``wanted`` ones present}."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    if suffix == ".csv":
        with open(path, newline="", encoding=MANIFEST_ENCODING) as handle:
            header = next(csv.reader(handle), [])
        present = [c for c in dict.fromkeys(wanted) if c in header]
        parse = pcsv.ParseOptions(newlines_in_values=True)  # a quoted description may span lines
        convert = pcsv.ConvertOptions(include_columns=present, column_types={c: pa.string() for c in present},
                                      strings_can_be_null=False)  # all text: "007" keeps its zeros
        table = pcsv.read_csv(path, parse_options=parse, convert_options=convert)
    elif suffix == ".parquet":
        header = list(pq.read_schema(path).names)
        present = [c for c in dict.fromkeys(wanted) if c in header]
        table = pq.read_table(path, columns=present)
    else:
        return _read_jsonl(path, wanted)
    return {"header": header, "columns": {c: _arrow_to_numpy(table.column(c)) for c in present}}


def _read_jsonl(path: str, wanted: Sequence[str]) -> Dict:
    """JSONL through pyarrow's reader (fast); a file it refuses, such as a column holding
    numbers in some rows and text in others, line by line with ``json`` (slow, but it names
    the line that is not a JSON object)."""
    import pyarrow as pa
    import pyarrow.json as pj

    try:
        table = pj.read_json(path)
        header = list(table.column_names)
        present = [c for c in dict.fromkeys(wanted) if c in header]
        return {"header": header, "columns": {c: _arrow_to_numpy(table.column(c)) for c in present}}
    except pa.ArrowInvalid:
        pass
    try:
        rows = [row for _, row in jsonl_objects(path)]
    except ValueError as error:
        raise RunError(str(error)) from None
    present = [c for c in dict.fromkeys(wanted) if any(c in row for row in rows)]
    columns = {}
    for name in present:
        columns[name] = np.empty(len(rows), dtype=object)
        columns[name][:] = [_json_text(row.get(name)) for row in rows]
    if any(c not in present for c in wanted):  # the union of keys only when it may be reported
        return {"header": list(dict.fromkeys(key for row in rows for key in row)), "columns": columns}
    return {"header": present, "columns": columns}


def _json_text(value: object) -> str:
    """One JSON value as text: 17 and 17.0 -> "17", null -> "", text stripped."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return json.dumps(value) if isinstance(value, (bool, list, dict)) else str(value)


def _arrow_to_numpy(column) -> np.ndarray:
    """A pyarrow column as text (stripped str, "" for null) or numbers (NaN for null);
    timestamps become float seconds since 1970 UTC (a naive one is taken as UTC)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = column.type
    if pa.types.is_dictionary(kind):  # Parquet's categorical columns: their values, not the codes
        return _arrow_to_numpy(column.cast(kind.value_type))
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or str(kind) == "string_view":
        return pc.utf8_trim_whitespace(column.cast(pa.string())).fill_null("").to_numpy(zero_copy_only=False)
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        if column.null_count:
            return pc.cast(column, pa.float64()).fill_null(np.nan).to_numpy()
        return column.to_numpy()
    if pa.types.is_timestamp(kind):  # arrow stores UTC epoch counts; a naive one is read as UTC
        counts = pc.cast(column, pa.int64()).to_numpy(zero_copy_only=False)
        seconds = np.asarray(counts, dtype=np.float64) / _SECONDS_PER_UNIT[kind.unit]
        seconds[column.is_null().to_numpy(zero_copy_only=False)] = np.nan
        return seconds
    values = np.empty(len(column), dtype=object)  # dates, booleans, lists: their JSON text
    values[:] = [_json_text(v) for v in column.to_pylist()]
    return values


# ------------------------------------------------------------------------------------------------
# typed values
# ------------------------------------------------------------------------------------------------
def as_text(values: np.ndarray) -> np.ndarray:
    """(N,) object array of str: text as it is; numbers written as ids are (whole floats without
    ".0", so 17.0 from a column with gaps matches "17"), "" for NaN."""
    if values.dtype == object:
        return values
    out = np.full(len(values), "", dtype=object)
    if np.issubdtype(values.dtype, np.integer):
        out[:] = values.astype(str)
        return out
    finite = np.isfinite(values)
    whole = finite & (values == np.round(values)) & (np.abs(values) < 2.0 ** 53)
    out[whole] = values[whole].astype(np.int64).astype(str)
    out[finite & ~whole] = values[finite & ~whole].astype(str)
    return out


def as_numbers(values: np.ndarray) -> np.ndarray:
    """(N,) float64, NaN where a cell is not a number."""
    if values.dtype != object:
        return values.astype(np.float64)
    numbers = pd.to_numeric(pd.Series(values, dtype=object, copy=False), errors="coerce")
    return np.array(numbers.to_numpy(dtype=np.float64, na_value=np.nan))  # a writable copy


def as_seconds(values: np.ndarray) -> np.ndarray:
    """(N,) float64 seconds from numbers or ISO-8601 text (naive = UTC); NaN where neither."""
    seconds = as_numbers(values)
    if values.dtype != object:
        return seconds
    need = np.isnan(seconds) & (values != "")
    if need.any():
        stamps = pd.to_datetime(pd.Series(values[need], dtype=object), format="ISO8601", utc=True, errors="coerce")
        moments = stamps.dt.tz_localize(None).to_numpy()  # (n,) datetime64 UTC, NaT where not a time
        # One division of the exact integer count, so "…00.250Z" is exactly .25 s, not .2499998.
        counts = moments.astype(np.int64).astype(np.float64) / _SECONDS_PER_UNIT[np.datetime_data(moments.dtype)[0]]
        seconds[need] = np.where(np.isnat(moments), np.nan, counts)
    return seconds


def catalogue_index(item_ids: Sequence[str], source: str) -> pd.Index:
    """The catalogue's ids as an index (``get_indexer`` codes rows against it); an id listed
    twice is a ``RunError`` naming ``source``, the table being read against the catalogue."""
    catalogue = pd.Index(item_ids, dtype=object)
    if not catalogue.is_unique:
        repeated = catalogue[catalogue.duplicated()][0]
        raise RunError(f"the catalogue given for {source} lists item id {repeated!r} more than once; ids must be unique")
    return catalogue


# ------------------------------------------------------------------------------------------------
# bad rows
# ------------------------------------------------------------------------------------------------
def describe_item_or_time(reason: str, row: int, item_column: str, items: np.ndarray,
                          raw_times: Optional[np.ndarray]) -> Optional[str]:
    """The example line (``row`` 0-based, written 1-based) of the reasons every log read against
    a catalogue shares: ``empty_item``, ``unknown_item``, ``bad_timestamp`` (``raw_times``: the
    cells as read); None for another reason."""
    if reason == "empty_item":
        return f"row {row + 1}: empty item id (column {item_column!r})"
    if reason == "unknown_item":
        return f"row {row + 1}: item {items[row]!r} not in the catalogue"
    if reason == "bad_timestamp":
        return f"row {row + 1}: timestamp {raw_times[row]!r} is neither a number of seconds nor an ISO-8601 time"
    return None


@dataclass(frozen=True)
class RowChecks:
    """What the rows of one kind of table are checked for, and what its user is told.

    Attributes:
        table: what the table is ("interaction log"), naming it in messages without a file.
        reasons: every reason a row is counted under, in the order they are checked (a row is
            counted once, under the first that applies) and reported.
        to_check: what to look at when many rows are bad ("the column names and the catalogue").
        limit_hint: where the limit is raised: the command's flag and the function's argument.
        merged: reasons whose rows are merged into an earlier row rather than dropped: counted
            and shown, but not bad.
    """

    table: str
    reasons: Tuple[str, ...]
    to_check: str
    limit_hint: str
    merged: Tuple[str, ...] = ()


def first_reason(checks: Mapping[str, np.ndarray], reasons: Sequence[str], n_rows: int) -> np.ndarray:
    """(n_rows,) int64 index into ``reasons`` of the first whose check (an (n_rows,) bool array
    in ``checks``) holds for the row, -1 where none does: every bad row is counted once."""
    reason = np.full(n_rows, -1, dtype=np.int64)
    for code, name in enumerate(reasons):
        reason[(reason < 0) & checks[name]] = code
    return reason


@dataclass
class BadRows:
    """Rows of a table that were dropped (or merged), counted by reason (every reason of
    ``checks.reasons`` is a key, 0 when none), with up to ``MAX_EXAMPLES`` examples each such
    as ``"row 17: item 'x9' not in the catalogue"``. Rows are numbered from 1 after the header
    (row 1 is the first data row; in a JSONL file without blank lines that is line 1)."""

    counts: Dict[str, int]
    examples: Dict[str, List[str]]
    total_rows: int
    checks: RowChecks
    source: str = ""

    @classmethod
    def tally(cls, checks: RowChecks, reason: np.ndarray, describe: Callable[[str, int], str],
              source: str = "") -> "BadRows":
        """Count ``reason`` ((N,) index into ``checks.reasons`` per row, -1 for a good row) and
        describe the first ``MAX_EXAMPLES`` rows of each reason with ``describe(reason, row)``
        (``row`` 0-based)."""
        counts = np.bincount(reason[reason >= 0], minlength=len(checks.reasons))
        examples = {name: [describe(name, int(row)) for row in np.flatnonzero(reason == code)[:MAX_EXAMPLES]]
                    for code, name in enumerate(checks.reasons)}
        return cls(counts={name: int(c) for name, c in zip(checks.reasons, counts)}, examples=examples,
                   total_rows=len(reason), checks=checks, source=source)

    @property
    def n_bad(self) -> int:
        """Number of dropped rows (each counted under one reason; merged rows not included)."""
        return int(sum(c for r, c in self.counts.items() if r not in self.checks.merged))

    @property
    def n_merged(self) -> int:
        """Number of rows merged into an earlier row (0 for a table that merges none)."""
        return int(sum(self.counts.get(r, 0) for r in self.checks.merged))

    @property
    def fraction(self) -> float:
        """Dropped rows / all data rows (0 for an empty table)."""
        return self.n_bad / self.total_rows if self.total_rows else 0.0

    def report(self) -> str:
        """A human-readable summary: how many rows were dropped (and merged) and why, with examples."""
        where = f"{self.source}: " if self.source else ""
        dropped = f"{where}{self.n_bad} of {self.total_rows} rows dropped ({self.fraction:.2%})"
        if self.checks.merged:
            merged = "/".join(f"{r}s" for r in self.checks.merged)
            lines = [f"{dropped}, {self.n_merged} merged as {merged}; rows are numbered from 1 after the header"]
        elif self.n_bad:
            lines = [f"{dropped}; rows are numbered from 1 after the header:"]
        else:
            return f"{where}all {self.total_rows} rows are good"
        for reason in self.checks.reasons:
            if self.counts.get(reason):
                lines.append(f"  {reason}: {self.counts[reason]}")
                lines += [f"    {example}" for example in self.examples.get(reason, [])]
        return "\n".join(lines)

    def check(self, max_bad_fraction: float) -> None:
        """Raise ``RunError`` (naming the file, the fraction, the counts and examples) when
        more than ``max_bad_fraction`` of the rows were dropped."""
        if self.fraction > max_bad_fraction:
            raise RunError(
                f"{self.source or self.checks.table}: {self.fraction:.2%} of the rows are bad, more than the "
                f"{max_bad_fraction:.2%} allowed.\n{self.report()}\nCheck {self.checks.to_check}; if dropping "
                f"these rows is right, raise the limit ({self.checks.limit_hint})."
            )
