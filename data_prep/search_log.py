"""``align prep search-log``: check a shop's search log against its catalogue, or simulate one.

    align prep search-log validate --log logs/search.csv --catalogue data/demo/train.csv data/demo/test.csv \\
        [--events view=1,click=1,cart=2,buy=3] [--max-bad-fraction 0.01] [--report report.json]
    align prep search-log simulate --catalogue data/demo/train.csv data/demo/test.csv \\
        --new data/demo/test.csv --out data/demo/search --seed 0 [--queries 3000]

``validate`` reads the log as training will (align/searchlog/log.py: columns, grades, reasons),
prints the rows it drops or merges by reason, with examples (row numbers count data rows from 1,
after the header), and what is left: queries by modality, judged pairs, grades. ``--report``
writes the same as JSON, also when the check fails. More than ``--max-bad-fraction`` dropped rows
ends with the message and exit code 1.

``simulate`` writes into ``--out`` (the story and every knob in align/searchlog/simulate.py;
``--queries`` is ``--n-queries``): ``log.csv`` (every event, with a ``split`` column), one file
per split with the same columns (``train.csv``, ``eval_in_domain.csv``, ``eval_novel_queries.csv``,
``eval_novel_products.csv``, ``eval_both_novel.csv``, and ``val.csv`` with ``--val-fraction``: a
held-out log for ``data.search_log.val``), the complete judgements of each evaluation split in ``<split>.truth.csv`` (``query, query_image, query_audio, item_id, relevance``: every
candidate that fits a query, its match level as the grade), then ``stats.json`` last (the knobs, the
held-out items and templates, the counts per split). Photo and voice query paths are written
relative to ``--out``, so every file there validates as it is. The items of ``--new`` are held out
as products (with their whole combinations). The same flags and ``--seed`` give the same files.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from align.errors import atomic_open, write_json_atomic
from align.data.tables import BadRows, read_columns
from align.rec.interactions import read_catalogue_columns, read_catalogue_ids
from align.searchlog.log import DEFAULT_EVENT_GRADES, EventGrades, SearchLog, SearchLogColumns, read_search_log
from align.searchlog.simulate import (DEFAULT_ATTRIBUTES, JUDGEMENT_COLUMNS, LOG_COLUMNS, TRUTH_SUFFIX,
                                      SearchSimConfig, SimCatalogue, simulate_search_log, split_stats, written_splits)
from data_prep.simulator_flags import add_knob_flags, config_from_flags, new_item_positions


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align prep search-log", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("validate", help="check a search log against the catalogue")
    defaults = SearchLogColumns()
    check.add_argument("--log", required=True, help="the search log: .csv, .jsonl or .parquet")
    check.add_argument("--catalogue", required=True, nargs="+", help="the catalogue manifest(s) the items belong to")
    check.add_argument("--events", default=",".join(f"{k}={v:g}" for k, v in DEFAULT_EVENT_GRADES.items()),
                       help="event=grade,... for rows without a relevance (%(default)s)")
    check.add_argument("--id-column", default="id", help="item id column of the catalogue (id)")
    for role in ("query", "query_image", "query_audio", "item", "relevance", "event", "time"):
        name = getattr(defaults, role)
        check.add_argument(f"--{role.replace('_', '-')}-column", dest=f"{role}_column", default=name,
                           help=f"({name}){'' if role == 'item' else '; empty to ignore the column'}")
    check.add_argument("--media-root", help="folder photo/voice query paths are relative to (the log's folder)")
    check.add_argument("--max-bad-fraction", type=float, default=0.01,
                       help="fail when more than this fraction of rows is dropped (0.01)")
    check.add_argument("--report", help="also write the report as JSON here")

    sim = commands.add_parser("simulate", help="simulate a search log over a catalogue")
    sim.add_argument("--catalogue", required=True, nargs="+", help="catalogue manifest(s): CSV, JSONL or Parquet")
    sim.add_argument("--new", nargs="+", default=[], help="manifest(s) whose items are held out as products")
    sim.add_argument("--out", required=True, help="output folder (log.csv, the split files, stats.json)")
    sim.add_argument("--id-column", default="id", help="item id column (id)")
    sim.add_argument("--attributes", default=",".join(DEFAULT_ATTRIBUTES),
                     help="comma-separated attribute columns in the order a query says them, "
                          "the noun last (%(default)s)")
    add_knob_flags(sim, SearchSimConfig, "simulator knobs (align/searchlog/simulate.py)", {"n_queries": "--queries"})
    return parser


# ------------------------------------------------------------------------------------------------
# validate
# ------------------------------------------------------------------------------------------------
def summarise(log: SearchLog, report: BadRows) -> Dict:
    """The report as a JSON-ready dict: rows dropped/merged by reason (with examples) and what is left."""
    grades, counts = np.unique(log.grades, return_counts=True)
    return {
        "log": report.source, "total_rows": report.total_rows, "dropped_rows": report.n_bad,
        "bad_fraction": report.fraction, "counts": report.counts,
        "examples": {k: v for k, v in report.examples.items() if v},
        "row_numbering": "data rows from 1, the header not counted",
        "queries": len(log.queries), "queries_by_modality": log.modality_counts(), "pairs": len(log),
        "items_judged": int(len(np.unique(log.items))), "catalogue_items": len(log.item_ids),
        "grades": {f"{g:g}": int(c) for g, c in zip(grades, counts)},
    }


def _validate(args: argparse.Namespace) -> int:
    columns = SearchLogColumns(**{role: getattr(args, f"{role}_column") or None
                                  for role in ("query", "query_image", "query_audio", "relevance", "event", "time")},
                               item=args.item_column)
    events = EventGrades.parse(args.events)  # refused before anything is read
    item_ids = read_catalogue_ids(args.catalogue, args.id_column)
    # Read without the limit, so the report is printed and written before a failing check.
    log, report = read_search_log(args.log, item_ids, events, columns, args.media_root, max_bad_fraction=1.0)
    summary = summarise(log, report)
    summary.update(catalogue=list(args.catalogue), max_bad_fraction=args.max_bad_fraction,
                   events=dict(events.grades), ok=report.fraction <= args.max_bad_fraction)
    if args.report:
        write_json_atomic(summary, args.report)
    if summary["ok"]:
        print(report.report())
    modalities = ", ".join(f"{m} {n}" for m, n in summary["queries_by_modality"].items())
    print(f"kept {len(log)} judged pairs of {len(log.queries)} queries ({modalities}) over "
          f"{summary['items_judged']} of {len(item_ids)} catalogue items; grades: "
          + ", ".join(f"{g} {n}" for g, n in summary["grades"].items()))
    if args.report:
        print(f"report -> {args.report}")
    report.check(args.max_bad_fraction)  # RunError (exit 1 from the CLI) with the report and rows
    return 0


# ------------------------------------------------------------------------------------------------
# simulate
# ------------------------------------------------------------------------------------------------
def read_sim_catalogue(manifests: List[str], attributes: List[str], id_column: str, out: str) -> SimCatalogue:
    """Ids and attributes of every item, and its image/audio path relative to ``out`` (where the
    log is written) when the manifest has one (manifest paths are relative to its own folder)."""
    item_ids, values = read_catalogue_columns(manifests, attributes, id_column)
    media: Dict[str, List[str]] = {"image": [], "audio": []}
    for path in manifests:
        table = read_columns(path, [id_column], ["image", "audio"])
        folder = os.path.dirname(os.path.abspath(path))
        for column, paths in media.items():
            cells = table.get(column, np.full(len(table[id_column]), "", dtype=object))
            paths += [os.path.relpath(os.path.join(folder, str(c)), os.path.abspath(out)) if isinstance(c, str) and c
                      else "" for c in cells]
    return SimCatalogue(item_ids=item_ids, attributes=values, images=media["image"], audio=media["audio"])


def _write_rows(rows: List[Dict[str, str]], path: str, columns: Sequence[str] = LOG_COLUMNS) -> None:
    with atomic_open(path, newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _simulate(args: argparse.Namespace) -> int:
    config = config_from_flags(SearchSimConfig, args)
    config.validate()  # before reading anything
    attributes = [a.strip() for a in args.attributes.split(",") if a.strip()]
    catalogue = read_sim_catalogue(args.catalogue, attributes, args.id_column, args.out)
    new_items = new_item_positions(catalogue.item_ids, args.new, args.id_column)

    sim = simulate_search_log(catalogue, config, new_items)
    os.makedirs(args.out, exist_ok=True)
    _write_rows(sim.rows, os.path.join(args.out, "log.csv"))
    splits = written_splits(config)
    for split in splits:
        _write_rows([r for r in sim.rows if r["split"] == split], os.path.join(args.out, f"{split}.csv"))
    for split, judged in sim.judgements.items():
        _write_rows(judged, os.path.join(args.out, f"{split}{TRUTH_SUFFIX}"), JUDGEMENT_COLUMNS)
    stats = split_stats(sim.rows, splits)
    write_json_atomic({"config": dataclasses.asdict(config), "attributes": attributes,
                       "catalogue": list(args.catalogue), "new": list(args.new), "rows": len(sim.rows),
                       "splits": stats, "held_out_items": sim.held_out_items,
                       "held_out_templates": sim.held_out_templates, "reserved_words": sim.reserved_words,
                       "complete_judgements": {split: len(j) for split, j in sim.judgements.items()}},
                      os.path.join(args.out, "stats.json"))  # last: its presence means the folder is complete
    print(f"simulated {len(sim.rows)} events of {config.n_queries} searches over {len(catalogue.item_ids)} items "
          f"({len(sim.held_out_items)} held out) -> {args.out}")
    for split, figures in stats.items():
        print(f"  {split}: {figures['queries']} queries, {figures['pairs']} pairs, grades {figures['grades']}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """``validate`` or ``simulate`` (see the module docstring); 0 on success (a bad log, catalogue
    or knob raises RunError/ConfigError, which the CLI turns into exit 1/2)."""
    args = _parser().parse_args(argv)
    return _validate(args) if args.command == "validate" else _simulate(args)


if __name__ == "__main__":
    raise SystemExit(main())
