"""Catalogue manifest -> webdataset shards, ``stats.json`` and ``sizes.json``; safe to re-run.

    align prep shards MANIFEST --out DIR [--samples-per-shard 1000] [--image-max-side 512]
        [--image-size 224] [--image-format jpg|png|webp] [--quality 90] [--sample-rate 16000] [--clip-seconds 10]
        [--workers 2] [--seed 0] [--col-id id --col-text title,description ...] [--root DIR]

Each sample ``{key}`` of a shard holds ``{key}.json`` (id, text, group, category, negatives),
``{key}.txt`` (the text, so open_clip's own loader reads the shards too), ``{key}.jpg|png|webp``
(RGB, longer side at most ``--image-max-side``; with ``--image-size S``, the model's input side,
also shrunk until the shorter side is S, so that a training worker decodes and resizes no more
pixels than the crop needs; never enlarged) and ``{key}.flac`` (mono 16-bit at
``--sample-rate``, the first ``--clip-seconds``), as align/data/shards.py reads them.

Stages (one shard per multiprocessing task)::

    read manifest -> permute rows with --seed -> cut into shards of --samples-per-shard rows
    -> per shard: open + re-encode media (bad rows reported, not written)
    -> tar with fixed mtime/uid/gid/order to shards-NNNNNN.tar.tmp -> rename when whole
    -> stats.json + sizes.json from the per-shard records

Re-running skips complete shards (tar and its record present) and redoes the rest, so an
interrupted job resumes; the row -> shard assignment and the tar bytes depend only on the
manifest, the media and the options, so the result is byte-identical to an uninterrupted run.
A different manifest or options in the same ``--out`` is an error rather than a silent mix.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import tarfile
import time
from collections import Counter
from pathlib import Path
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from align.errors import ConfigError, RunError

SHARD_PATTERN = "shards-{:06d}.tar"
RECORDS = ".prep"  # per-shard records (stats of one shard) and the job's settings


@dataclass(frozen=True)
class EncodeOptions:
    """How media are re-encoded into the shards (part of the job's fingerprint)."""

    image_max_side: int = 512
    image_format: str = "jpg"
    quality: int = 90
    sample_rate: int = 16000
    clip_seconds: float = 10.0
    image_size: Optional[int] = None  # shorter side shrunk to this (the model's input side)


# ---------------------------------------------------------------- per-sample encoding
def encode_image(path: str, options: EncodeOptions) -> Tuple[bytes, str]:
    """Decode, convert to RGB, shrink (longer side to ``image_max_side``, shorter side to
    ``image_size`` when set, whichever shrinks more; never enlarge), re-encode -> (bytes, extension)."""
    from PIL import Image

    with Image.open(path) as opened:
        image = opened.convert("RGB")  # full decode: truncated files fail here
    scale = options.image_max_side / max(image.size)
    if options.image_size:
        scale = min(scale, options.image_size / min(image.size))
    if scale < 1.0:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.BICUBIC)
    buffer = io.BytesIO()
    fmt = options.image_format.lower()
    if fmt in ("jpg", "jpeg"):
        image.save(buffer, format="JPEG", quality=options.quality)
        return buffer.getvalue(), "jpg"
    if fmt == "webp":
        image.save(buffer, format="WEBP", quality=options.quality, method=4)
        return buffer.getvalue(), "webp"
    if fmt == "png":
        image.save(buffer, format="PNG")
        return buffer.getvalue(), "png"
    raise ValueError(f"--image-format must be jpg, png or webp, got {options.image_format!r}")


def encode_audio(path: str, options: EncodeOptions) -> bytes:
    """Decode, resample to ``sample_rate``, keep the first ``clip_seconds``, FLAC 16-bit mono."""
    import soundfile
    import torch

    from align.data.audio_io import load_audio, resample

    wave, rate = load_audio(path)  # (T,) float32
    if rate != options.sample_rate:
        wave = resample(torch.from_numpy(wave), rate, options.sample_rate).numpy()
    wave = np.clip(wave[: int(round(options.clip_seconds * options.sample_rate))], -1.0, 1.0)
    buffer = io.BytesIO()
    soundfile.write(buffer, wave, options.sample_rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def _resolve(path: str, root: str) -> str:
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.join(root, path)


def encode_row(row: Dict[str, Any], root: str, options: EncodeOptions) -> Tuple[Optional[Dict[str, bytes]], Optional[dict]]:
    """Manifest row -> ({extension: bytes}, None), or (None, skip record) when it cannot be used."""
    files: Dict[str, bytes] = {}
    for modality in ("image", "audio"):
        if not row.get(modality):
            continue
        path = _resolve(row[modality], root)
        if not os.path.isfile(path):
            return None, _skip(row, "missing_file", f"{modality} file not found: {path}")
        try:
            if modality == "image":
                data, extension = encode_image(path, options)
                files[extension] = data
            else:
                files["flac"] = encode_audio(path, options)
        except Exception as error:  # PIL / soundfile raise many types for broken files
            return None, _skip(row, f"bad_{modality}", f"{path}: {error!r}"[:300])
    if not files and not row.get("text"):
        return None, _skip(row, "no_modality", "no text, image or audio")
    meta = {"id": row["id"], "text": row.get("text"), "group": row.get("group"),
            "category": row.get("category"), "negatives": list(row.get("negatives") or [])}
    files["json"] = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
    if row.get("text"):
        files["txt"] = row["text"].encode("utf-8")
    return files, None


def _skip(row: Dict[str, Any], reason: str, detail: str) -> dict:
    return {"id": row["id"], "row": row.get("_where", ""), "reason": reason, "detail": detail}


# ---------------------------------------------------------------- one shard
def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: byte-identical reruns
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


EXTENSION_ORDER = ("json", "txt", "jpg", "png", "webp", "flac")


def write_one_shard(task: Tuple[str, int, List[Tuple[int, Dict[str, Any]]], str, EncodeOptions]) -> dict:
    """Write ``shards-NNNNNN.tar`` (temp name, renamed when whole); return and store its record."""
    out, shard, rows, root, options = task
    name = SHARD_PATTERN.format(shard)
    written = 0
    skipped: List[dict] = []
    bytes_by: Counter = Counter()
    count_by: Counter = Counter()
    tmp = os.path.join(out, name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        for position, row in rows:
            files, skip = encode_row(row, root, options)
            if files is None:
                skipped.append(skip)
                continue
            key = f"{position:09d}"  # the row's place in the seeded order: unique, no dots
            for extension in sorted(files, key=EXTENSION_ORDER.index):
                _add(tar, f"{key}.{extension}", files[extension])
                modality = {"json": "meta", "txt": "text", "flac": "audio"}.get(extension, "image")
                bytes_by[modality] += len(files[extension])
                count_by[modality] += 1
            written += 1
    record = {"shard": name, "written": written, "skipped": skipped, "bytes": dict(bytes_by),
              "written_per_modality": {m: count_by[m] for m in ("text", "image", "audio")}}
    # The record first, the tar last: a tar under its final name always has its record.
    _write_json(os.path.join(out, RECORDS, name + ".json"), record)
    os.replace(tmp, os.path.join(out, name))
    return record


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # one process per core: resampling must not oversubscribe the CPUs


def _write_json(path: str, value: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as file:
        json.dump(value, file, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _fingerprint(manifest: str, rows: Sequence[Dict[str, Any]], options: EncodeOptions, samples_per_shard: int,
                 seed: int, root: str) -> dict:
    digest = hashlib.sha256(json.dumps([{k: v for k, v in r.items() if k != "_where"} for r in rows],
                                       sort_keys=True).encode()).hexdigest()
    settings = {k: v for k, v in asdict(options).items() if not (k == "image_size" and v is None)}  # as before it
    return {"manifest": os.path.abspath(manifest), "rows_sha256": digest, "options": settings,
            "samples_per_shard": samples_per_shard, "seed": seed, "root": os.path.abspath(root)}


# ---------------------------------------------------------------- the job
def write_shards(manifest: str, out: str, *, columns: Any = None, root: Optional[str] = None,
                 samples_per_shard: int = 1000, image_max_side: int = 512, image_format: str = "jpg",
                 quality: int = 90, sample_rate: int = 16000, clip_seconds: float = 10.0, workers: int = 2,
                 seed: int = 0, max_shards: Optional[int] = None, image_size: Optional[int] = None) -> Dict[str, Any]:
    """Write shards for ``manifest`` into ``out``; returns the stats (also in ``out/stats.json``).

    ``max_shards`` stops after writing that many new shards (to test resuming); stats and
    sizes are then written only for a complete job.
    """
    from align.data.manifest import read_manifest

    options = EncodeOptions(image_max_side, image_format, quality, sample_rate, clip_seconds, image_size)
    _check_options(manifest, samples_per_shard, options)
    started = time.time()
    rows = read_manifest(manifest, columns)
    root = root if root is not None else os.path.dirname(os.path.abspath(manifest))
    os.makedirs(os.path.join(out, RECORDS), exist_ok=True)
    fingerprint = _fingerprint(manifest, rows, options, samples_per_shard, seed, root)
    _check_same_job(out, fingerprint)

    # Deterministic row -> shard assignment: a seeded permutation mixes the catalogue across shards.
    order = np.random.default_rng(seed).permutation(len(rows))
    count = -(-len(rows) // samples_per_shard)
    tasks, done = [], []
    for shard in range(count):
        positions = order[shard * samples_per_shard:(shard + 1) * samples_per_shard]
        name = SHARD_PATTERN.format(shard)
        record = os.path.join(out, RECORDS, name + ".json")
        if os.path.isfile(os.path.join(out, name)) and os.path.isfile(record):
            done.append(shard)
            continue
        tasks.append((out, shard, [(int(p), rows[int(p)]) for p in positions], root, options))
    if max_shards is not None:
        tasks = tasks[:max_shards]
    if workers > 1 and len(tasks) > 1:
        with multiprocessing.get_context("fork").Pool(workers, initializer=_init_worker) as pool:
            for _ in pool.imap_unordered(write_one_shard, tasks):
                pass
    else:
        for task in tasks:
            write_one_shard(task)
    complete = all(os.path.isfile(os.path.join(out, SHARD_PATTERN.format(s))) for s in range(count))
    if not complete:
        return {"complete": False, "shards_done": len(done) + len(tasks), "shards": count}
    return _summarise(out, manifest, count, len(rows), len(tasks), time.time() - started)


def _check_options(manifest: str, samples_per_shard: int, options: EncodeOptions) -> None:
    """Refuse arguments no job can use, before anything is read or written (``ConfigError``, a
    ValueError, naming the flag: exit 2 from the cli)."""
    if not os.path.isfile(manifest):
        what = "is a folder, not a manifest file" if os.path.isdir(manifest) else "does not exist"
        raise ConfigError(f"manifest {manifest} {what}")
    positive = {"--samples-per-shard": samples_per_shard, "--image-max-side": options.image_max_side,
                "--sample-rate": options.sample_rate, "--clip-seconds": options.clip_seconds}
    if options.image_size is not None:
        positive["--image-size (the model's input side, e.g. 224)"] = options.image_size
    for flag, value in positive.items():
        if not value > 0:  # also refuses NaN (--clip-seconds nan)
            raise ConfigError(f"{flag} must be positive, got {value}")


def _check_same_job(out: str, fingerprint: dict) -> None:
    """Record the job's settings in a new ``out``; refuse an ``out`` whose shards another job
    (other manifest rows or options) wrote: resuming would mix the two."""
    settings = os.path.join(out, RECORDS, "settings.json")
    if not os.path.isfile(settings):
        _write_json(settings, fingerprint)
        return
    try:
        with open(settings, encoding="utf-8") as file:
            previous = json.load(file)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunError(f"{settings}: not valid JSON ({error}); its shards cannot be checked against this job, "
                       f"so use a new --out or delete {out}") from None
    if previous != fingerprint:
        changed = sorted(k for k in fingerprint if not isinstance(previous, dict) or previous.get(k) != fingerprint[k])
        raise ConfigError(f"--out {out} holds shards of a different job (changed: {changed}); use a new --out "
                          f"or delete it")


def _summarise(out: str, manifest: str, count: int, rows: int, new: int, seconds: float) -> Dict[str, Any]:
    records = []
    for shard in range(count):
        with open(os.path.join(out, RECORDS, SHARD_PATTERN.format(shard) + ".json"), encoding="utf-8") as file:
            records.append(json.load(file))
    sizes = {r["shard"]: r["written"] for r in records}
    skipped = [s for r in records for s in r["skipped"]]
    skipped.sort(key=lambda s: _row_number(s["row"]))
    stats = {
        "manifest": os.path.abspath(manifest), "rows": rows, "shards": count,
        "written": sum(sizes.values()), "skipped": len(skipped),
        "written_per_modality": dict(sum((Counter(r["written_per_modality"]) for r in records), Counter())),
        "bytes": dict(sum((Counter(r["bytes"]) for r in records), Counter())),
        "skipped_by_reason": dict(Counter(s["reason"] for s in skipped)),
        "skipped_rows": skipped,
        "shards_written_this_run": new, "seconds_this_run": round(seconds, 2),
    }
    _write_json(os.path.join(out, "sizes.json"), sizes)
    _write_json(os.path.join(out, "stats.json"), stats)
    return stats


def _row_number(where: str) -> int:
    tail = where.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align prep shards", description=__doc__.split("\n\n")[0])
    parser.add_argument("manifest", help="catalogue manifest (.csv, .jsonl or .parquet)")
    parser.add_argument("--out", required=True, help="folder for shards-NNNNNN.tar, stats.json, sizes.json")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--image-max-side", type=int, default=512)
    parser.add_argument("--image-size", type=int, help="the model's input side (e.g. 224): also shrink each image "
                        "until its shorter side is this, so training decodes and resizes no more than it needs")
    parser.add_argument("--image-format", choices=("jpg", "png", "webp"), default="jpg")
    parser.add_argument("--quality", type=int, default=90, help="jpg/webp quality")
    parser.add_argument("--sample-rate", type=int, default=16000)
    parser.add_argument("--clip-seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=2, help="processes, one shard per task")
    parser.add_argument("--seed", type=int, default=0, help="fixes the row -> shard assignment")
    parser.add_argument("--root", help="base of relative media paths (default: the manifest's folder)")
    for field, default in COLUMN_DEFAULTS.items():
        parser.add_argument(f"--col-{field}", default=default, help=f"manifest column of {field} (default {default})")
    return parser


COLUMN_DEFAULTS = {"id": "id", "text": "title,description", "image": "image", "audio": "audio", "group": "group",
                   "category": "category", "negatives": "negatives"}


def _check_named_columns(args: argparse.Namespace) -> None:
    """A ``--col-*`` given on the command line names a column the manifest must have (a ``ConfigError``
    naming the flag): absent, it was left out of every sample without a word (a default name that
    is absent only means the catalogue lacks that field)."""
    from align.data.manifest import read_table_rows

    if not os.path.isfile(args.manifest):
        return  # write_shards says so, naming the manifest
    try:
        header = read_table_rows(Path(args.manifest))[0]
    except ValueError:
        return  # not readable (encoding, a broken line): write_shards names the file and row
    for field, default in COLUMN_DEFAULTS.items():
        value = getattr(args, f"col_{field}")
        if value == default or field == "id":  # the reader refuses a missing id column itself
            continue
        missing = [c for c in value.split(",") if c and c not in header] if field == "text" else \
            ([value] if value and value not in header else [])
        if missing:
            raise ConfigError(f"--col-{field} {value}: {args.manifest} has no column {missing[0]!r}; its columns "
                              f"are {header}")


def main(argv: Optional[List[str]] = None) -> int:
    """``align prep shards``. A flag no job can use, a column the manifest lacks or an --out of
    another job is a ``ConfigError`` (exit 2); a manifest the reader refuses (a repeated or empty
    id, a broken line) a ``RunError`` (exit 1); both name the flag or the file and row."""
    from align.config import ColumnsConfig

    args = _parser().parse_args(argv)
    _check_named_columns(args)
    columns = ColumnsConfig(id=args.col_id, text=list(c for c in args.col_text.split(",") if c), image=args.col_image,
                        audio=args.col_audio, group=args.col_group, category=args.col_category,
                        negatives=args.col_negatives)
    try:
        stats = write_shards(args.manifest, args.out, columns=columns, root=args.root,
                             samples_per_shard=args.samples_per_shard, image_max_side=args.image_max_side,
                             image_format=args.image_format, quality=args.quality, sample_rate=args.sample_rate,
                             clip_seconds=args.clip_seconds, workers=args.workers, seed=args.seed,
                             image_size=args.image_size)
    except ConfigError:
        raise
    except ValueError as error:  # the manifest reader's: its message names the file and row
        raise RunError(str(error)) from None
    print(f"{stats['written']} samples in {stats['shards']} shards -> {args.out} "
          f"({stats['shards_written_this_run']} written now, {stats['seconds_this_run']} s); "
          f"skipped {stats['skipped']}: {stats['skipped_by_reason']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
