"""``align prep shop-sim``: simulate a shop's interaction log over a catalogue.

    align prep shop-sim --catalogue data/demo/train.csv data/demo/test.csv \\
        --new data/demo/test.csv --out data/demo/shop

Writes ``<out>/interactions.csv`` (user_id, item_id, timestamp, event, weight), the users'
tastes ``<out>/tastes.safetensors`` (what ``align.explain`` checks explanations against) and then
``<out>/items.json`` ({"ids", "release_time", "cutoff", "config"}), each atomically, and prints a
summary. The story and every knob are in align/rec/simulate.py; each knob is a flag below
(``--users`` is ``--n-users``). The items of the ``--new`` manifests are released after the
cutoff (the cold-start block). The same flags and ``--seed`` give the same files.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import List, Optional

import numpy as np

from align.errors import write_json_atomic
from align.rec.interactions import read_catalogue_columns, write_interactions
from align.rec.simulate import DAY, DEFAULT_ATTRIBUTES, TASTES_FILE, ShopSimConfig, simulate_shop, write_tastes
from data_prep.simulator_flags import add_knob_flags, config_from_flags, new_item_positions


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align prep shop-sim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalogue", required=True, nargs="+", help="catalogue manifest(s): CSV, JSONL or Parquet")
    parser.add_argument("--new", nargs="+", default=[], help="manifest(s) whose items are released after the cutoff")
    parser.add_argument("--out", required=True, help="output folder (interactions.csv, tastes.safetensors, items.json)")
    parser.add_argument("--id-column", default="id", help="item id column (id)")
    parser.add_argument("--attributes", default=",".join(DEFAULT_ATTRIBUTES),
                        help=f"comma-separated attribute columns that drive tastes ({','.join(DEFAULT_ATTRIBUTES)}); "
                             f"'' for popularity only")
    add_knob_flags(parser, ShopSimConfig, "simulator knobs (align/rec/simulate.py)", {"n_users": "--users"})
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Simulate and write the log; returns 0 (a bad catalogue or knob raises RunError/ConfigError)."""
    args = _parser().parse_args(argv)
    config = config_from_flags(ShopSimConfig, args)
    config.validate()  # before reading anything
    attributes = [a.strip() for a in args.attributes.split(",") if a.strip()]
    item_ids, values = read_catalogue_columns(args.catalogue, attributes, args.id_column)
    new_items = new_item_positions(item_ids, args.new, args.id_column)

    log, release, cutoff, tastes = simulate_shop(item_ids, values, config, np.asarray(new_items, dtype=np.int64))
    write_interactions(log, os.path.join(args.out, "interactions.csv"))
    write_tastes(tastes, os.path.join(args.out, TASTES_FILE))  # what explanations are checked against
    write_json_atomic({"ids": item_ids, "release_time": release.tolist(), "cutoff": cutoff,
                       "config": dataclasses.asdict(config), "attributes": attributes,
                       "catalogue": list(args.catalogue), "new": list(args.new)},
                      os.path.join(args.out, "items.json"))  # last: its presence means the folder is complete

    counts = np.bincount(log.users, minlength=len(log.user_ids))
    late = release >= cutoff
    touched_before = np.bincount(log.items[log.times < cutoff], minlength=len(item_ids)) > 0
    print(f"simulated {len(log)} interactions of {len(log.user_ids)} users over {len(item_ids)} items "
          f"-> {args.out}")
    print(f"cold items: {int(late.sum())} released after the cutoff (day {cutoff / DAY:.1f}), "
          f"{int((~touched_before).sum())} with no interaction before it; "
          f"cold users: {int((counts <= 2).sum())} with 1-2 interactions")
    if len(log):
        print(f"time span: {log.times.min() / DAY:.1f} .. {log.times.max() / DAY:.1f} days; events: "
              + ", ".join(f"{e} {int((log.events == e).sum())}" for e in np.unique(log.events)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
