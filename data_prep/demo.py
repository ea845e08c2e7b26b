"""``align prep demo --out data/demo``: build the embedded demo catalogue (deterministic, cached).

Synthetic items that are one combination of kind x colour x pattern x size, each with a title,
a description, a PNG and a FLAC clip (see align/data/demo_catalogue.py for what drives what).
The test split holds only attribute combinations never seen in training. Re-running with the
same arguments returns at once; ``--force`` rebuilds.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from typing import List, Optional

from align.data.demo_catalogue import build_demo_catalogue
from align.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align prep demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (train.csv, test.csv, images/, audio/)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=4000, help="training items (default 4000)")
    parser.add_argument("--n-test", type=int, default=400, help="test items, ~4 per held-out combination (400)")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels (64)")
    parser.add_argument("--sample-rate", type=int, default=16000, help="audio sample rate in Hz (16000)")
    parser.add_argument("--clip-seconds", type=float, default=1.0, help="audio clip length (1.0)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: up to 2)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the cache matches")
    return parser


def _check_arguments(args: argparse.Namespace) -> None:
    """A ``ConfigError`` naming the flag for a count or size the builder cannot use, before any work."""
    for flag, value, least in (("--n-train", args.n_train, 1), ("--n-test", args.n_test, 0),
                               ("--image-size", args.image_size, 16), ("--sample-rate", args.sample_rate, 1000)):
        if value < least:
            raise ConfigError(f"{flag} {value}: must be at least {least}")
    if not (math.isfinite(args.clip_seconds) and args.clip_seconds > 0):
        raise ConfigError(f"--clip-seconds {args.clip_seconds}: must be a positive number of seconds")
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: must be at least 1")


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    _check_arguments(args)
    start = time.perf_counter()
    summary = build_demo_catalogue(args.out, seed=args.seed, n_train=args.n_train, n_test=args.n_test,
                                   image_size=args.image_size, sample_rate=args.sample_rate,
                                   clip_seconds=args.clip_seconds, force=args.force, workers=args.workers)
    what = "up to date (cached)" if summary["cached"] else f"built in {time.perf_counter() - start:.1f}s"
    message = f"demo catalogue {summary['out']} {what}: {json.dumps(summary['counts'])}"
    print(message)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
