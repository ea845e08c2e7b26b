"""``align prep interactions``: check an interaction log against the catalogue before training.

    align prep interactions --interactions logs/events.csv --catalogue data/demo/train.csv data/demo/test.csv

Reads the log (CSV, JSONL or Parquet) as the recommender will (align/rec/interactions.py), prints
the rows it drops by reason, with examples (row numbers count data rows from 1, after the header),
and a summary: rows kept, users, items touched and never touched, time range. ``--report`` writes
the same as JSON (atomically), also when the check fails. More than ``--max-bad-fraction`` bad
rows ends with the message and exit code 1.
"""
from __future__ import annotations

import argparse
import datetime
from typing import Dict, List, Optional

import numpy as np

from align.errors import write_json_atomic
from align.rec.interactions import BadRows, InteractionColumns, Interactions, read_catalogue_ids, read_interactions


def _parser() -> argparse.ArgumentParser:
    defaults = InteractionColumns()
    parser = argparse.ArgumentParser(prog="align prep interactions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interactions", required=True, help="the log: .csv, .jsonl or .parquet")
    parser.add_argument("--catalogue", required=True, nargs="+", help="the catalogue manifest(s) the items belong to")
    parser.add_argument("--id-column", default="id", help="item id column of the catalogue (id)")
    parser.add_argument("--user-column", default=defaults.user, help=f"({defaults.user})")
    parser.add_argument("--item-column", default=defaults.item, help=f"({defaults.item})")
    parser.add_argument("--time-column", default=defaults.time, help=f"seconds or ISO-8601 ({defaults.time})")
    parser.add_argument("--event-column", default=defaults.event,
                        help=f"event label, optional under its default name; '' to ignore it ({defaults.event})")
    parser.add_argument("--weight-column", default=defaults.weight,
                        help=f"weight >= 0, optional under its default name; '' to ignore it ({defaults.weight})")
    parser.add_argument("--max-bad-fraction", type=float, default=0.01,
                        help="fail when more than this fraction of rows is bad (0.01)")
    parser.add_argument("--report", help="also write the report as JSON here")
    return parser


def _iso(seconds: float) -> str:
    """Seconds as a UTC ISO-8601 time, or the number when it is out of the calendar's range."""
    try:
        return datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc).isoformat()
    except (OverflowError, OSError, ValueError):
        return f"{seconds} s"


def summarise(inter: Interactions, bad: BadRows) -> Dict:
    """The report as a JSON-ready dict: bad rows by reason (with examples) and what was kept."""
    touched = np.bincount(inter.items, minlength=inter.n_items) > 0
    summary = {
        "interactions": bad.source,
        "total_rows": bad.total_rows,
        "kept_rows": len(inter),
        "bad_rows": bad.n_bad,
        "bad_fraction": bad.fraction,
        "bad_counts": bad.counts,
        "bad_examples": {k: v for k, v in bad.examples.items() if v},
        "row_numbering": "data rows from 1, the header not counted",
        "users": len(inter.user_ids),
        "catalogue_items": inter.n_items,
        "items_touched": int(touched.sum()),
        "items_never_touched": int((~touched).sum()),
        "time_min": float(inter.times.min()) if len(inter) else None,
        "time_max": float(inter.times.max()) if len(inter) else None,
    }
    if inter.events is not None:
        labels, counts = np.unique(inter.events, return_counts=True)
        summary["events"] = {str(k): int(v) for k, v in zip(labels, counts)}
    return summary


def main(argv: Optional[List[str]] = None) -> int:
    """Check the log; print the report; 0 when it passes (RunError, exit 1 from the CLI, otherwise)."""
    args = _parser().parse_args(argv)
    columns = InteractionColumns(user=args.user_column, item=args.item_column, time=args.time_column,
                                 event=args.event_column or None, weight=args.weight_column or None)
    item_ids = read_catalogue_ids(args.catalogue, args.id_column)
    # Read without the limit, so the report is printed and written before a failing check.
    inter, bad = read_interactions(args.interactions, item_ids, columns, max_bad_fraction=1.0)
    summary = summarise(inter, bad)
    summary["catalogue"] = list(args.catalogue)
    summary["max_bad_fraction"] = args.max_bad_fraction
    summary["ok"] = bad.fraction <= args.max_bad_fraction
    print(bad.report())
    print(f"kept {len(inter)} of {bad.total_rows} rows: {summary['users']} users, "
          f"{summary['items_touched']} of {inter.n_items} catalogue items touched "
          f"({summary['items_never_touched']} never)")
    if len(inter):
        print(f"time range: {_iso(summary['time_min'])} .. {_iso(summary['time_max'])} "
              f"({(summary['time_max'] - summary['time_min']) / 86400:.1f} days)")
    if "events" in summary:
        print("events: " + ", ".join(f"{k} {v}" for k, v in summary["events"].items()))
    if args.report:
        write_json_atomic(summary, args.report)
        print(f"report -> {args.report}")
    bad.check(args.max_bad_fraction)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
