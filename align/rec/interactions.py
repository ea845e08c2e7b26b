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

Logs of millions of rows are read column-wise (align/data/tables.py: a few seconds for 1M rows),
not row by row as catalogue manifests are (align/data/manifest.py). Nothing read is unpickled.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from align.data.tables import (BadRows, RowChecks, as_numbers, as_seconds, as_text, catalogue_index,
                               describe_item_or_time, first_reason, read_columns, table_suffix)
from align.errors import RunError, atomic_open

log = logging.getLogger(__name__)

BAD_ROW_REASONS = ("empty_user", "empty_item", "unknown_item", "bad_timestamp", "bad_weight", "duplicate")
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


INTERACTION_ROW_CHECKS = RowChecks(
    table="interaction log", reasons=BAD_ROW_REASONS, to_check="the column names and the catalogue",
    limit_hint="align prep interactions --max-bad-fraction, read_interactions(max_bad_fraction=...)")


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
        table = read_columns(path, [id_column, *columns],
                              hint="Name the id column with id_column (align prep: --id-column).")
        file_ids = as_text(table[id_column])
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
            values[column].extend(as_text(table[column]).tolist())
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
    checks = {
        "empty_user": users == "",
        "empty_item": items == "",
        "unknown_item": item_codes < 0,
        "bad_timestamp": ~np.isfinite(times),
        "bad_weight": ~(np.isfinite(weights) & (weights >= 0)),
    }
    reason = first_reason(checks, BAD_ROW_REASONS[:-1], len(users))
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


def _describe(reason: str, row: int, columns: InteractionColumns, items: np.ndarray, raw_times: np.ndarray,
              raw_weights: Optional[np.ndarray], earlier: np.ndarray) -> str:
    """One example line for ``BadRows``: the 1-based data row and what is wrong with it."""
    shared = describe_item_or_time(reason, row, columns.item, items, raw_times)
    if shared is not None:
        return shared
    if reason == "empty_user":
        return f"row {row + 1}: empty user id (column {columns.user!r})"
    if reason == "bad_weight":
        return f"row {row + 1}: weight {raw_weights[row]!r} is not a finite number >= 0"
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
    catalogue = catalogue_index(item_ids, path)
    must, may = _optional_columns(columns)
    hint = ("Name the columns (align prep interactions: --user-column, --item-column, --time-column, "
            "--event-column, --weight-column).")
    table = read_columns(path, [columns.user, columns.item, columns.time, *must], may, hint)
    has_event = columns.event is not None and columns.event in table
    has_weight = columns.weight is not None and columns.weight in table

    users = as_text(table[columns.user])
    items = as_text(table[columns.item])
    total = len(users)
    if total == 0:
        raise RunError(f"{path}: the log has no data rows")
    item_codes = catalogue.get_indexer(items).astype(np.int64)
    times = as_seconds(table[columns.time])
    weights = as_numbers(table[columns.weight]) if has_weight else np.ones(total)
    events = as_text(table[columns.event]) if has_event else None

    reason, earlier = _classify_rows(users, items, item_codes, times, weights, events)
    raw_weights = table.get(columns.weight) if has_weight else None
    bad = BadRows.tally(INTERACTION_ROW_CHECKS, reason, lambda name, row: _describe(
        name, row, columns, items, table[columns.time], raw_weights, earlier), path)
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


def write_interactions(inter: Interactions, path: str, columns: InteractionColumns = InteractionColumns()) -> None:
    """Write ``inter`` as CSV/JSONL/Parquet (by suffix) with the columns ``columns`` names (by
    default user_id, item_id, timestamp, event, weight): timestamps as float seconds, written so
    they read back exactly; atomically (see ``atomic_open``). The event column is left out when
    ``inter.events`` is None or ``columns.event`` is, and the weight column when ``columns.weight``
    is None (such a log's rows all weigh 1.0), so the log reads back as it was with ``columns``."""
    path = os.fspath(path)
    suffix = table_suffix(path)
    data = {
        columns.user: np.asarray(inter.user_ids, dtype=object)[inter.users] if len(inter) else np.array([], object),
        columns.item: np.asarray(inter.item_ids, dtype=object)[inter.items] if len(inter) else np.array([], object),
        columns.time: np.asarray(inter.times, dtype=np.float64),
    }
    if inter.events is not None and columns.event is not None:
        data[columns.event] = np.asarray(inter.events, dtype=object)
    if columns.weight is not None:
        data[columns.weight] = np.asarray(inter.weights, dtype=np.float32)
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


def merge_logs(old: Interactions, new: Interactions) -> Tuple[Interactions, np.ndarray]:
    """(old and new rows in one log sorted by time, (M,) bool: the row came from ``new``).

    Both logs must speak the same catalogue. Users are matched by id. A new row that repeats an
    old one exactly (user, item, time, weight, event) is kept once, as a new row (a target)."""
    if old.item_ids != new.item_ids:
        raise ValueError("merge_logs: the two logs were read against different catalogues")
    parts = (new, old)  # new first: of a repeated row, the new copy is kept
    users = np.concatenate([np.asarray(p.user_ids, dtype=object)[p.users] for p in parts])
    has_events = any(p.events is not None for p in parts)
    events = np.concatenate([p.events if p.events is not None else np.full(len(p), "") for p in parts])
    frame = pd.DataFrame({"user": users, "item": np.concatenate([p.items for p in parts]),
                          "time": np.concatenate([p.times for p in parts]),
                          "weight": np.concatenate([p.weights for p in parts]), "event": events})
    keep = np.flatnonzero(~frame.duplicated().to_numpy())
    keep = keep[np.argsort(frame["time"].to_numpy()[keep], kind="stable")]  # time order, new first on ties
    codes, user_ids = pd.factorize(pd.Series(users[keep], dtype=object), sort=False)
    merged = Interactions(users=codes.astype(np.int64), items=frame["item"].to_numpy()[keep],
                          times=frame["time"].to_numpy()[keep], weights=frame["weight"].to_numpy()[keep],
                          events=np.asarray(events[keep].tolist(), dtype=str) if has_events else None,
                          user_ids=[str(u) for u in user_ids], item_ids=new.item_ids)
    return merged, keep < len(new)
