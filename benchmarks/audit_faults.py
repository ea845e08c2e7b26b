"""Plant faults in a copy of the demo catalogue and measure how well ``align audit`` finds them.

The demo catalogue (``align prep demo``: 4000 + 400 items, up to 13 renders of one attribute
combination with identical text) is copied, then, on disjoint random items (``--seed``):

  swap      5% of the items, in pairs: the two items exchange photos; the two are of different
            kinds (shape), so each photo shows another product than its text;
  title     5%: the title is replaced by the title of an item of another kind (the description
            stays, so the text contradicts itself);
  duplicate 3%: a copy of the item under a new id ``dup-<id>``, appended to the item's manifest:
            same title and description, no sound, and the photo cropped by up to 10% of each side
            (a random share of the width and of the height, split at random between the sides),
            resized by 0.75-1.5x and re-encoded as JPEG at quality 60-90;
  unreadable 2%: the item's photo (three in four) or sound (one in four) is truncated to a third
            of its bytes, or replaced by random bytes (half each).

The audit then runs at its default thresholds (``align audit --checkpoint C --manifest train.csv
test.csv --out A``), and each flag is scored against the planted faults:

  mismatch    truth: both sides of every swap (each shows a wrong photo) and every retitled item.
  duplicate   truth: the planted copies. The audit flags the later item of a duplicate group and
              names the earlier one; a flag on a planted copy's original (never the case when the
              copy comes later) would count as a false positive.
  unreadable  truth: the items with a broken file (missing files are a flag of their own and
              none is planted).

Precision = flagged and planted / flagged; recall = flagged and planted / planted. The untouched
items are the test of the look-alikes: flagging any of them lowers precision.

    make demo && python benchmarks/audit_faults.py          # a few minutes on 2 cores
    python benchmarks/audit_faults.py --checkpoint runs/demo --keep /tmp/audit-bench

The last line is JSON: {"mismatch_precision", "mismatch_recall", "duplicate_precision",
"duplicate_recall", "unreadable_recall"}. Targets: each >= 0.9.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Dict, List, Set, Tuple

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SHARES = {"swap": 0.05, "title": 0.05, "duplicate": 0.03, "unreadable": 0.02}
FLAGS = ("mismatch", "duplicate", "unreadable")


def read_csv(path: str) -> Tuple[List[str], List[Dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def write_csv(path: str, columns: List[str], rows: List[Dict[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def degrade_photo(source: str, target: str, rng: np.random.Generator) -> None:
    """Crop up to 10% of each side's length, resize 0.75-1.5x, re-encode as JPEG at quality 60-90."""
    from PIL import Image

    with Image.open(source) as opened:
        image = opened.convert("RGB")
    width, height = image.size
    crop_x, crop_y = rng.uniform(0, 0.1), rng.uniform(0, 0.1)  # share of the width / height removed
    left, top = rng.uniform(0, crop_x), rng.uniform(0, crop_y)
    image = image.crop((round(left * width), round(top * height),
                        round(width - (crop_x - left) * width), round(height - (crop_y - top) * height)))
    scale = rng.uniform(0.75, 1.5)
    image = image.resize((max(8, round(image.width * scale)), max(8, round(image.height * scale))))
    image.save(target, format="JPEG", quality=int(rng.integers(60, 91)))


def break_file(path: str, rng: np.random.Generator) -> None:
    """Truncate to a third of its bytes, or overwrite with as many random bytes (half each)."""
    with open(path, "rb") as handle:
        data = handle.read()
    if rng.uniform() < 0.5:
        broken = data[: len(data) // 3]
    else:
        broken = rng.integers(0, 256, len(data), dtype=np.uint8).tobytes()
    os.remove(path)  # the copy may share its inode with the source folder; never write through it
    with open(path, "wb") as handle:
        handle.write(broken)


def plant_faults(source: str, target: str, seed: int) -> Dict[str, Set[str]]:
    """Copy the catalogue in ``source`` to ``target`` with faults planted (module docstring);
    returns the planted item ids by fault: swap, title, duplicate (the new ids), unreadable."""
    rng = np.random.default_rng(seed)
    os.makedirs(target, exist_ok=True)
    for folder in ("images", "audio"):
        shutil.copytree(os.path.join(source, folder), os.path.join(target, folder), dirs_exist_ok=True,
                        copy_function=os.link if _same_device(source, target) else shutil.copy2)
    manifests = {name: read_csv(os.path.join(source, name)) for name in ("train.csv", "test.csv")}
    rows = [(name, row) for name, (_, items) in manifests.items() for row in items]
    count = len(rows)
    order = list(rng.permutation(count))
    taken: Set[int] = set()
    truth: Dict[str, Set[str]] = {key: set() for key in SHARES}

    def draw(wanted: int, accept) -> List[int]:
        chosen = []
        for n in order:
            if len(chosen) == wanted:
                break
            if n not in taken and accept(rows[n][1]):
                chosen.append(n)
                taken.add(n)
        return chosen

    with_photo = lambda row: bool(row["image"])  # noqa: E731
    # swaps: pairs of items of different kinds, both with a photo
    firsts = draw(round(SHARES["swap"] * count / 2), with_photo)
    for n in firsts:
        partner = draw(1, lambda row, kind=rows[n][1]["kind"]: with_photo(row) and row["kind"] != kind)[0]
        a, b = rows[n][1], rows[partner][1]
        a["image"], b["image"] = b["image"], a["image"]
        truth["swap"] |= {a["id"], b["id"]}
    for n in draw(round(SHARES["title"] * count), lambda row: True):
        row = rows[n][1]
        donors = [other for _, other in rows if other["kind"] != row["kind"]]
        row["title"] = donors[int(rng.integers(len(donors)))]["title"]
        truth["title"].add(row["id"])
    copies: Dict[str, List[Dict[str, str]]] = {name: [] for name in manifests}
    for n in draw(round(SHARES["duplicate"] * count), with_photo):
        name, row = rows[n]
        copy = dict(row, id=f"dup-{row['id']}", image=f"images/dup-{row['id']}.jpg", audio="")
        degrade_photo(os.path.join(source, row["image"]), os.path.join(target, copy["image"]), rng)
        copies[name].append(copy)
        truth["duplicate"].add(copy["id"])
    for n in draw(round(SHARES["unreadable"] * count), lambda row: bool(row["image"]) and bool(row["audio"])):
        row = rows[n][1]
        break_file(os.path.join(target, row["image" if rng.uniform() < 0.75 else "audio"]), rng)
        truth["unreadable"].add(row["id"])
    for name, (columns, items) in manifests.items():
        write_csv(os.path.join(target, name), columns, items + copies[name])
    return truth


def _same_device(a: str, b: str) -> bool:
    return os.stat(a).st_dev == os.stat(os.path.dirname(os.path.abspath(b)) or ".").st_dev


def flagged(audit_csv: str) -> Dict[str, Set[str]]:
    """Item ids by flag, from audit.csv."""
    out: Dict[str, Set[str]] = {}
    for row in read_csv(audit_csv)[1]:
        out.setdefault(row["flag"], set()).add(row["item_id"])
    return out


def score(found: Set[str], planted: Set[str]) -> Tuple[float, float]:
    """(precision, recall); 1.0 for an empty denominator."""
    hits = len(found & planted)
    return (hits / len(found) if found else 1.0), (hits / len(planted) if planted else 1.0)


def main(argv: List[str] = None) -> Dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(REPO, "data", "demo"),
                        help="the demo catalogue (built with align prep demo when missing)")
    parser.add_argument("--checkpoint", default=os.path.join(REPO, "runs", "demo"), help="a trained demo checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", help="write the faulty catalogue and the audit here (default: a temporary folder)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.data, "train.csv")):
        from data_prep.demo import main as prep_demo

        prep_demo(["--out", args.data])
    if not os.path.isdir(args.checkpoint):
        parser.error(f"--checkpoint {args.checkpoint}: no such folder; train one with `make demo` or name one")
    work = args.keep or tempfile.mkdtemp(prefix="audit-faults-")
    catalogue, audit = os.path.join(work, "catalogue"), os.path.join(work, "audit")
    shutil.rmtree(catalogue, ignore_errors=True)
    start = time.perf_counter()
    truth = plant_faults(args.data, catalogue, args.seed)
    print(f"planted in {time.perf_counter() - start:.1f} s: " + ", ".join(f"{k} {len(v)}" for k, v in truth.items()),
          flush=True)
    from align.audit.command import main as audit_main

    start = time.perf_counter()
    code = audit_main(["--checkpoint", args.checkpoint, "--manifest", os.path.join(catalogue, "train.csv"),
                       os.path.join(catalogue, "test.csv"), "--out", audit, "--device", args.device])
    seconds = time.perf_counter() - start
    if code:
        raise SystemExit(f"align audit failed with exit code {code}")
    found = flagged(os.path.join(audit, "audit.csv"))
    planted = {"mismatch": truth["swap"] | truth["title"], "duplicate": truth["duplicate"],
               "unreadable": truth["unreadable"]}
    result: Dict[str, float] = {}
    items = sum(len(read_csv(os.path.join(catalogue, name))[1]) for name in ("train.csv", "test.csv"))
    print(f"\naudit of {items} items in {seconds:.0f} s -> {audit}")
    print(f"{'flag':<12}{'planted':>9}{'flagged':>9}{'hits':>7}{'precision':>11}{'recall':>8}")
    for flag in FLAGS:
        precision, recall = score(found.get(flag, set()), planted[flag])
        hits = len(found.get(flag, set()) & planted[flag])
        print(f"{flag:<12}{len(planted[flag]):>9}{len(found.get(flag, set())):>9}{hits:>7}"
              f"{precision:>11.3f}{recall:>8.3f}")
        result[f"{flag}_precision"], result[f"{flag}_recall"] = round(precision, 4), round(recall, 4)
    swaps, titles = truth["swap"], truth["title"]
    print(f"  mismatch recall by fault: swapped photo {score(found.get('mismatch', set()), swaps)[1]:.3f}, "
          f"replaced title {score(found.get('mismatch', set()), titles)[1]:.3f}")
    others = {flag: len(ids) for flag, ids in found.items() if flag not in FLAGS}
    if others:
        print("  other flags: " + ", ".join(f"{flag} {n}" for flag, n in sorted(others.items())))
    summary = {key: result[key] for key in ("mismatch_precision", "mismatch_recall", "duplicate_precision",
                                            "duplicate_recall", "unreadable_recall")}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
