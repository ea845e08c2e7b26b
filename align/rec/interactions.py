"""Interaction logs (who touched which catalogue item, when, how) read, checked and written.

A log is a table with one row per event, in CSV, JSONL or Parquet (chosen by the suffix)::

    user_id,item_id,timestamp,event,weight
    u17,000123,2024-03-01T10:15:00Z,click,2

* ``timestamp``: seconds (unix time, or any clock that only moves forward) or ISO-8601 text,
  with or without a timezone; a naive time is read as UTC. Milliseconds are *not* detected: a
  log in milliseconds must be divided by 1000 first (a warning says when times look like it).
* ``event`` (optional): any label (view, click, purchase ...), kept as text.
* ``weight`` (optional): a finite number >= 0; every row weighs 1.0 when the log has none.

``InteractionColumns`` says which column holds what. ``event`` and ``weight`` may be absent when
they keep their default names; a column named otherwise must exist (a typo such as
``--weight-column ratng`` would otherwise silently weigh every row 1.0), and ``None`` ignores the
column even where it exists.

Rows that cannot be used are dropped and counted by reason (``BAD_ROW_REASONS``, checked in that
order, so a row is counted once, under the first reason that applies): ``empty_user``,
``empty_item``, ``unknown_item`` (an id not in the catalogue), ``bad_timestamp``, ``bad_weight``
(not a finite number >= 0, an empty cell included), ``duplicate`` (same user, item, time, event
and weight as an earlier good row, compared after parsing, so ``1704067200`` and
``2024-01-01T00:00:00Z`` are the same time). More than ``max_bad_fraction`` bad rows is a
``RunError``: a log that is 5% garbage usually means a wrong column or a broken export, and
training on the rest would hide it.

Logs of millions of rows are read column-wise with pandas/pyarrow (a few seconds for 1M rows),
not row by row as catalogue manifests are (align/data/manifest.py). Nothing read is unpickled.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from align.data.manifest import jsonl_objects
from align.errors import RunError, atomic_open

log = logging.getLogger(__name__)

SUFFIXES = (".csv", ".jsonl", ".parquet")
BAD_ROW_REASONS = ("empty_user", "empty_item", "unknown_item", "bad_timestamp", "bad_weight", "duplicate")
MAX_EXAMPLES = 5
WRITTEN_COLUMNS = ("user_id", "item_id", "timestamp", "event", "weight")
_MILLISECONDS_LIKELY = 1e11  # seconds after 1970 in the year 5138: such a log is in milliseconds


@dataclass
class InteractionColumns:
    """Which column of a log holds what (see the module docstring for the optional ones)."""

    user: str = "user_id"
    item: str = "item_id"
    time: str = "timestamp"
    event: Optional[str] = "event"
    weight: Optional[str] = "weight"


@dataclass
class Interactions:
    """An interaction log as integer codes, one entry per kept row, in the log's row order.

    Attributes:
        users: (N,) int64 index into ``user_ids``.
        items: (N,) int64 index into ``item_ids``: the catalogue's ids in catalogue order,
            items nobody touched included (so item codes line up with the item embeddings).
        times: (N,) float64 seconds (unix time or any monotone clock).
        weights: (N,) float32, 1.0 when the log has no weight column.
        events: (N,) numpy unicode array of the event labels ("" where a cell was empty), or
            ``None`` when the log has no event column; compare with ``inter.events == "click"``.
        user_ids: user id per user code, in order of first appearance in the log.
        item_ids: catalogue item id per item code.
    """

    users: np.ndarray
    items: np.ndarray
    times: np.ndarray
    weights: np.ndarray
    events: Optional[np.ndarray]
    user_ids: List[str]
    item_ids: List[str]

    def __post_init__(self) -> None:
        n = len(self.users)
        lengths = {"items": len(self.items), "times": len(self.times), "weights": len(self.weights)}
        if self.events is not None:
            lengths["events"] = len(self.events)
        wrong = {k: v for k, v in lengths.items() if v != n}
        if wrong:
            raise ValueError(f"Interactions: users has {n} entries but {wrong}; all arrays need one entry per row")

    def __len__(self) -> int:
        return len(self.users)

    @property
    def n_users(self) -> int:
        """Number of user codes (``len(user_ids)``), users without rows in this subset included."""
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        """Number of catalogue items (``len(item_ids)``)."""
        return len(self.item_ids)

    def subset(self, mask_or_index: Union[np.ndarray, Sequence[int], Sequence[bool]]) -> "Interactions":
        """The rows selected by a boolean mask (N,) or an integer index, in that order; the id
        lists are shared, so codes mean the same in the subset as in the whole log."""
        index = np.asarray(mask_or_index)
        if index.dtype == bool and index.shape != (len(self),):
            raise ValueError(f"Interactions.subset: mask has shape {index.shape}, the log has {len(self)} rows")
        if index.dtype != bool:
            index = index.astype(np.int64, copy=False)
        return Interactions(
            users=self.users[index], items=self.items[index], times=self.times[index],
            weights=self.weights[index], events=None if self.events is None else self.events[index],
            user_ids=self.user_ids, item_ids=self.item_ids,
        )


@dataclass
class BadRows:
    """Rows of a log that were dropped, counted by reason (every reason of ``BAD_ROW_REASONS``
    is a key, 0 when none), with up to ``MAX_EXAMPLES`` examples each such as
    ``"row 17: item 'x9' not in the catalogue"``. Rows are numbered from 1 after the header
    (row 1 is the first data row; in a JSONL file without blank lines that is line 1)."""

    counts: Dict[str, int]
    examples: Dict[str, List[str]]
    total_rows: int
    source: str = ""

    @property
    def n_bad(self) -> int:
        """Number of dropped rows (each counted under one reason)."""
        return int(sum(self.counts.values()))

    @property
    def fraction(self) -> float:
        """Dropped rows / all data rows (0 for an empty log)."""
        return self.n_bad / self.total_rows if self.total_rows else 0.0

    def report(self) -> str:
        """A human-readable summary: how many rows were dropped and why, with examples."""
        where = f"{self.source}: " if self.source else ""
        if not self.n_bad:
            return f"{where}all {self.total_rows} rows are good"
        lines = [f"{where}{self.n_bad} of {self.total_rows} rows dropped ({self.fraction:.2%}); "
                 f"rows are numbered from 1 after the header:"]
        for reason in BAD_ROW_REASONS:
            if self.counts.get(reason):
                lines.append(f"  {reason}: {self.counts[reason]}")
                lines += [f"    {example}" for example in self.examples.get(reason, [])]
        return "\n".join(lines)

    def check(self, max_bad_fraction: float) -> None:
        """Raise ``RunError`` (naming the file, the fraction, the counts and examples) when
        more than ``max_bad_fraction`` of the rows are bad."""
        if self.fraction > max_bad_fraction:
            raise RunError(
                f"{self.source or 'interaction log'}: {self.fraction:.2%} of the rows are bad, more than "
                f"the {max_bad_fraction:.2%} allowed.\n{self.report()}\n"
                f"Check the column names and the catalogue; if dropping these rows is right, raise the "
                f"limit (align prep interactions --max-bad-fraction, read_interactions(max_bad_fraction=...))."
            )


# ------------------------------------------------------------------------------------------------
# reading tables column-wise
# ------------------------------------------------------------------------------------------------
# Every column comes back as a numpy array in one of two forms, so the checks below handle two
# cases only: text (object array of stripped str, "" for a missing cell; CSV cells are always
# text, so "007" keeps its zeros) or numbers (float64/int64, NaN for a missing cell; JSON numbers,
# Parquet numbers, and Parquet/JSON timestamps already turned into float seconds).
_SECONDS_PER_UNIT = {"s": 1.0, "ms": 1e3, "us": 1e6, "ns": 1e9}


def _suffix(path: str) -> str:
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in SUFFIXES:
        raise RunError(f"{path}: unknown file format {suffix or '(no suffix)'!r}; use one of {SUFFIXES}")
    return suffix


def _read_columns(path: str, required: Sequence[str], optional: Sequence[str] = (),
                  hint: str = "") -> Dict[str, np.ndarray]:
    """{column: array} (text or numbers, see above) for the ``required`` columns and those
    ``optional`` ones the file has. A required column the file lacks is a ``RunError`` naming
    the file, the column and the columns the file has; so is a file that does not parse."""
    import pyarrow as pa

    suffix = _suffix(path)
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
        with open(path, newline="", encoding="utf-8-sig") as handle:
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


def _text(values: np.ndarray) -> np.ndarray:
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


def _numbers(values: np.ndarray) -> np.ndarray:
    """(N,) float64, NaN where a cell is not a number."""
    if values.dtype != object:
        return values.astype(np.float64)
    numbers = pd.to_numeric(pd.Series(values, dtype=object, copy=False), errors="coerce")
    return np.array(numbers.to_numpy(dtype=np.float64, na_value=np.nan))  # a writable copy


def _seconds(values: np.ndarray) -> np.ndarray:
    """(N,) float64 seconds from numbers or ISO-8601 text (naive = UTC); NaN where neither."""
    seconds = _numbers(values)
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

# ------------------------------------------------------------------------------------------------
# catalogue ids
# ------------------------------------------------------------------------------------------------
def read_catalogue_columns(manifests: Sequence[str], columns: Sequence[str] = (),
                           id_column: str = "id") -> Tuple[List[str], Dict[str, List[str]]]:
    """Item ids in file order across ``manifests`` (CSV/JSONL/Parquet), and the text of each of
    ``columns`` per item ("" where a cell is empty).

    Raises:
        RunError naming the file (and row, 1-based after the header) for a missing column, an
        empty id, or an id that repeats: within one file (both rows) or across files (both files).
    """
    ids: List[str] = []
    values: Dict[str, List[str]] = {c: [] for c in columns}
    first_seen: Dict[str, str] = {}
    for path in manifests:
        path = os.fspath(path)
        table = _read_columns(path, [id_column, *columns],
                              hint="Name the id column with id_column (align prep: --id-column).")
        file_ids = _text(table[id_column])
        empty = np.flatnonzero(file_ids == "")
        if empty.size:
            raise RunError(f"{path}: row {empty[0] + 1} has an empty id (column {id_column!r}); "
                           f"every catalogue row needs an id")
        repeated = pd.Series(file_ids).duplicated().to_numpy()
        if repeated.any():
            second = int(np.flatnonzero(repeated)[0])
            first = int(np.flatnonzero(file_ids == file_ids[second])[0])
            raise RunError(f"{path}: id {file_ids[second]!r} is used by rows {first + 1} and {second + 1}; "
                           f"item ids must be unique")
        clash = [i for i in file_ids if i in first_seen]
        if clash:
            raise RunError(f"item id {clash[0]!r} is in both {first_seen[clash[0]]} and {path} "
                           f"({len(clash)} shared ids); ids must be unique across the catalogue's manifests")
        first_seen.update(dict.fromkeys(file_ids.tolist(), path))
        ids.extend(file_ids.tolist())
        for column in columns:
            values[column].extend(_text(table[column]).tolist())
    return ids, values


def read_catalogue_ids(manifests: Sequence[str], id_column: str = "id") -> List[str]:
    """Item ids in file order across several manifests (CSV/JSONL/Parquet); a duplicate id is a
    ``RunError`` naming both files (or both rows of one file). See ``read_catalogue_columns``."""
    return read_catalogue_columns(manifests, (), id_column)[0]


# ------------------------------------------------------------------------------------------------
# interaction logs
# ------------------------------------------------------------------------------------------------
def _optional_columns(columns: InteractionColumns) -> Tuple[List[str], List[str]]:
    """(event/weight columns that must exist, those that may be absent): see the module docstring."""
    defaults = InteractionColumns()
    must, may = [], []
    for role in ("event", "weight"):
        name = getattr(columns, role)
        if name is not None:
            (may if name == getattr(defaults, role) else must).append(name)
    return must, may


def _classify_rows(users: np.ndarray, items: np.ndarray, item_codes: np.ndarray, times: np.ndarray,
                   weights: np.ndarray, events: Optional[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """(reason code per row: index into ``BAD_ROW_REASONS``, -1 for a good row; the first earlier
    row with the same key per row, for describing duplicates). The first reason that applies
    wins, so every bad row is counted exactly once."""
    reason = np.full(len(users), -1, dtype=np.int8)
    checks = {
        "empty_user": users == "",
        "empty_item": items == "",
        "unknown_item": item_codes < 0,
        "bad_timestamp": ~np.isfinite(times),
        "bad_weight": ~(np.isfinite(weights) & (weights >= 0)),
    }
    for code, name in enumerate(BAD_ROW_REASONS[:-1]):
        reason[(reason < 0) & checks[name]] = code
    good = np.flatnonzero(reason < 0)
    # Duplicates are judged on parsed values among good rows: same user, item, time, weight, event.
    keys = pd.DataFrame({"user": users[good], "item": item_codes[good], "time": times[good], "weight": weights[good]})
    if events is not None:
        keys["event"] = events[good]
    group = keys.groupby(list(keys.columns), sort=False, dropna=False).ngroup().to_numpy()
    _, first_position = np.unique(group, return_index=True)  # ngroup numbers the groups 0..G-1
    earlier = np.arange(len(users))
    earlier[good] = good[first_position[group]]
    reason[good[earlier[good] != good]] = BAD_ROW_REASONS.index("duplicate")
    return reason, earlier


def _describe(reason: str, row: int, columns: InteractionColumns, items: np.ndarray,
              raw: Optional[np.ndarray], earlier: np.ndarray) -> str:
    """One example line for ``BadRows``: the 1-based data row and what is wrong with it."""
    if reason == "empty_user":
        return f"row {row + 1}: empty user id (column {columns.user!r})"
    if reason == "empty_item":
        return f"row {row + 1}: empty item id (column {columns.item!r})"
    if reason == "unknown_item":
        return f"row {row + 1}: item {items[row]!r} not in the catalogue"
    if reason == "bad_timestamp":
        return f"row {row + 1}: timestamp {raw[row]!r} is neither a number of seconds nor an ISO-8601 time"
    if reason == "bad_weight":
        return f"row {row + 1}: weight {raw[row]!r} is not a finite number >= 0"
    return f"row {row + 1}: exact duplicate of row {earlier[row] + 1}"


def read_interactions(path: str, item_ids: Sequence[str], columns: InteractionColumns = InteractionColumns(),
                      max_bad_fraction: float = 0.01) -> Tuple[Interactions, BadRows]:
    """Read a CSV/JSONL/Parquet log against the catalogue's ``item_ids``; bad rows are dropped.

    Returns the kept rows (``Interactions``, in file order, users coded by first appearance) and
    the dropped ones counted by reason (``BadRows``; reasons in the module docstring).

    Raises:
        RunError: unknown suffix, missing file, a missing column (naming it and the columns the
            file has), an empty log, or more than ``max_bad_fraction`` bad rows (naming the
            file, the fraction, the counts and examples).
    """
    path = os.fspath(path)
    item_ids = [str(i) for i in item_ids]
    catalogue = pd.Index(item_ids, dtype=object)
    if not catalogue.is_unique:
        repeated = catalogue[catalogue.duplicated()][0]
        raise RunError(f"the catalogue given for {path} lists item id {repeated!r} more than once; ids must be unique")
    must, may = _optional_columns(columns)
    hint = ("Name the columns (align prep interactions: --user-column, --item-column, --time-column, "
            "--event-column, --weight-column).")
    table = _read_columns(path, [columns.user, columns.item, columns.time, *must], may, hint)
    has_event = columns.event is not None and columns.event in table
    has_weight = columns.weight is not None and columns.weight in table

    users = _text(table[columns.user])
    items = _text(table[columns.item])
    total = len(users)
    if total == 0:
        raise RunError(f"{path}: the log has no data rows")
    item_codes = catalogue.get_indexer(items).astype(np.int64)
    times = _seconds(table[columns.time])
    weights = _numbers(table[columns.weight]) if has_weight else np.ones(total)
    events = _text(table[columns.event]) if has_event else None

    reason, earlier = _classify_rows(users, items, item_codes, times, weights, events)
    counts = np.bincount(reason[reason >= 0], minlength=len(BAD_ROW_REASONS))
    examples: Dict[str, List[str]] = {}
    for code, name in enumerate(BAD_ROW_REASONS):
        rows = np.flatnonzero(reason == code)[:MAX_EXAMPLES]
        raw = {"bad_timestamp": table[columns.time], "bad_weight": table.get(columns.weight)}.get(name)
        examples[name] = [_describe(name, int(r), columns, items, raw, earlier) for r in rows]
    bad = BadRows(counts={n: int(c) for n, c in zip(BAD_ROW_REASONS, counts)}, examples=examples,
                  total_rows=total, source=path)
    bad.check(max_bad_fraction)

    kept = reason < 0
    user_codes, user_ids = pd.factorize(pd.Series(users[kept], dtype=object), sort=False)
    inter = Interactions(
        users=user_codes.astype(np.int64), items=item_codes[kept], times=times[kept],
        weights=weights[kept].astype(np.float32),
        events=None if events is None else np.asarray(events[kept].tolist(), dtype=str),
        user_ids=[str(u) for u in user_ids], item_ids=item_ids,
    )
    if len(inter) and np.median(inter.times) > _MILLISECONDS_LIKELY:
        log.warning("%s: timestamps look like milliseconds (median %.0f); they are read as seconds",
                    path, np.median(inter.times))
    return inter, bad


def write_interactions(inter: Interactions, path: str) -> None:
    """Write ``inter`` as CSV/JSONL/Parquet (by suffix) with columns user_id, item_id, timestamp
    (float seconds, written so they read back exactly), event, weight, atomically (see
    ``atomic_open``). The event column is left out when ``inter.events`` is None, so the log
    reads back without events."""
    path = os.fspath(path)
    suffix = _suffix(path)
    data = {
        "user_id": np.asarray(inter.user_ids, dtype=object)[inter.users] if len(inter) else np.array([], object),
        "item_id": np.asarray(inter.item_ids, dtype=object)[inter.items] if len(inter) else np.array([], object),
        "timestamp": np.asarray(inter.times, dtype=np.float64),
    }
    if inter.events is not None:
        data["event"] = np.asarray(inter.events, dtype=object)
    data["weight"] = np.asarray(inter.weights, dtype=np.float32)
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({k: pa.array(v, type=pa.string() if v.dtype == object else None) for k, v in data.items()})
        with atomic_open(path, "wb") as handle:
            pq.write_table(table, handle)
    elif suffix == ".csv":
        with atomic_open(path, newline="") as handle:
            pd.DataFrame(data).to_csv(handle, index=False, lineterminator="\n")  # floats as repr: exact
    else:
        names = list(data)
        columns = [v.tolist() for v in data.values()]  # Python floats: json writes their exact repr
        with atomic_open(path) as handle:
            for values in zip(*columns):
                handle.write(json.dumps(dict(zip(names, values))) + "\n")
