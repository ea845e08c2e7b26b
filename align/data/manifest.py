"""Catalogue manifests (CSV, JSONL, Parquet) read into raw samples.

A manifest has one row per item; ``ColumnsConfig`` (``data.columns``) says which columns hold what::

    id,title,description,image,audio,group
    sku-1,Red shoe,Leather upper,img/1.jpg,,shoes

Media paths are relative to ``root`` (by default the manifest's folder); an empty cell is a
missing modality. ``ManifestDataset`` opens the media inside dataloader workers, applies the
``SampleProcessor`` and, when a row cannot be used, returns a ``Skipped`` marker instead of raising,
so one broken file never stops training (see align/data/bad_samples.py).
Skip reasons: ``missing_file``, ``bad_image``, ``bad_audio`` (here), ``empty_text``,
``no_modality``, ``bad_<modality>`` (from ``SampleProcessor``).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import Dataset

from align.config import ColumnsConfig
from align.data.bad_samples import Skipped
from align.data.sample import BadSample, CheckedJpeg
from align.errors import ConfigError

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".csv", ".jsonl", ".parquet")
# UTF-8 that drops a leading byte-order mark: Excel's "CSV UTF-8" starts with one, which plain
# utf-8 would keep in the first column's name ('\ufeffid') or read as invalid JSON.
MANIFEST_ENCODING = "utf-8-sig"
TEXT_SEPARATOR = ". "


def is_manifest(spec: Union[str, os.PathLike]) -> bool:
    """True when ``spec`` names a manifest file (by suffix) rather than shards."""
    return os.fspath(spec).lower().endswith(MANIFEST_SUFFIXES)


def join_text(parts: Sequence[Optional[str]], separator: str = TEXT_SEPARATOR) -> Optional[str]:
    """Join non-empty text fields; ``None`` when all are empty.

    A part already ending in punctuation is joined with a space, so "Shoe." + "Red" gives
    "Shoe. Red", not "Shoe.. Red".
    """
    kept = [str(p).strip() for p in parts if _present(p) and str(p).strip()]
    if not kept:
        return None
    out = kept[0]
    for part in kept[1:]:
        out += (" " if out[-1] in ".!?;:" else separator) + part
    return out


def parse_negatives(value: Any) -> List[str]:
    """A JSON list, a ``|``-separated string, or a list -> list of non-empty strings."""
    if not _present(value):
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"negatives look like JSON but do not parse: {text[:80]!r} ({error})") from None
        else:
            value = text.split("|")
    if not isinstance(value, (list, tuple)):
        value = list(value)  # numpy arrays from Parquet list columns
    return [str(v).strip() for v in value if _present(v) and str(v).strip()]


def _present(value: Any) -> bool:
    """False for None, NaN and empty strings (how CSV/Parquet/pandas spell a missing cell)."""
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    if isinstance(value, str) and value.strip() == "":
        return False
    return True


def jsonl_objects(path: Any) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """(line number, object) for every non-blank line of a JSONL file; a line that is not a JSON
    object is a ValueError naming the file and line."""
    with open(path, encoding=MANIFEST_ENCODING) as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({error}); fix or delete the line") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_number}: expected a JSON object (one key per column), "
                                 f"got {type(row).__name__}")
            yield line_number, row


def read_table_rows(path: Path) -> Tuple[List[str], List[Tuple[int, Dict[str, Any]]]]:
    """(columns, [(line_or_row_number, row dict)]) for CSV / JSONL / Parquet."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="", encoding=MANIFEST_ENCODING) as handle:
            reader = csv.DictReader(handle)
            columns = list(reader.fieldnames or [])
            # line numbers as a user sees them in an editor: header is line 1
            rows = [(reader.line_num, dict(row)) for row in reader]
        return columns, rows
    if suffix == ".jsonl":
        rows, columns, seen = [], [], set()
        for line_number, row in jsonl_objects(path):
            for key in row:
                if key not in seen:
                    seen.add(key)
                    columns.append(key)
            rows.append((line_number, row))
        return columns, rows
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError("reading Parquet manifests needs pyarrow: pip install 'align[parquet]'") from None
        table = pq.read_table(path)
        return list(table.column_names), list(enumerate(table.to_pylist(), start=1))
    raise ValueError(f"{path}: unknown manifest format {suffix!r}; use one of {MANIFEST_SUFFIXES}")


def read_manifest(path: Union[str, os.PathLike], columns: Optional[ColumnsConfig] = None) -> List[Dict[str, Any]]:
    """Read a manifest into row dicts.

    Each row: ``{"id": str, "text": str | None, "image": str | None (path as written),
    "audio": str | None, "group": str | None, "category": str | None,
    "negatives": list[str], "_where": "file:row"}``. Negatives that name another row's id are
    replaced by that row's text.

    Raises:
        ConfigError (a ValueError) naming the file and the setting when a column ``columns``
        names is missing: the id column, or every modality column. ValueError naming the file
        when it is not UTF-8, and the file and row (CSV/JSONL: line number, header = line 1;
        Parquet: 1-based row) when a row has no id or its id repeats an earlier row's.
    """
    path = Path(path)
    columns = columns or ColumnsConfig()
    if not path.exists():
        raise FileNotFoundError(f"manifest {path} does not exist")
    try:
        header, rows = read_table_rows(path)
    except UnicodeDecodeError as error:  # its own message names neither the file nor a remedy
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8 "
                         f"(Excel: CSV UTF-8)") from None
    present = set(header)
    unit = "line" if path.suffix.lower() in (".csv", ".jsonl") else "row"
    # A missing column is a setting that does not fit the file (exit 2 in the cli), not a bad row.
    if columns.id not in present:
        raise ConfigError(
            f"{path}: required id column {columns.id!r} is missing; columns are {header}. "
            f"Rename it or set data.columns.id (align prep shards: --col-id)."
        )
    text_cols = [c for c in columns.text if c in present]
    image_col = columns.image if columns.image in present else None
    audio_col = columns.audio if columns.audio in present else None
    missing = [c for c in columns.text if c not in present]
    missing += [c for c in (columns.image, columns.audio) if c is not None and c not in present]
    if not text_cols and image_col is None and audio_col is None:
        raise ConfigError(
            f"{path}: none of the modality columns {list(columns.text) + [columns.image, columns.audio]} "
            f"is present; columns are {header}. Set data.columns to name your columns."
        )
    if missing:
        log.warning("%s: columns %s are absent; those fields are treated as missing", path, missing)

    def cell(row: Dict[str, Any], column: Optional[str]) -> Optional[str]:
        if column is None or column not in row or not _present(row[column]):
            return None
        return str(row[column]).strip()

    out: List[Dict[str, Any]] = []
    seen_ids: Dict[str, str] = {}
    for number, row in rows:
        where = f"{path}:{number}"
        sample_id = cell(row, columns.id)
        if sample_id is None:
            raise ValueError(f"{where}: empty {unit} id (column {columns.id!r}); every row needs an id")
        if sample_id in seen_ids:
            raise ValueError(f"duplicate id {sample_id!r} at {seen_ids[sample_id]} and {where}; ids must be unique")
        seen_ids[sample_id] = where
        try:
            negatives = parse_negatives(row.get(columns.negatives)) if columns.negatives else []
        except ValueError as error:
            raise ValueError(f"{where}: column {columns.negatives!r}: {error}") from None
        out.append(
            {
                "id": sample_id,
                "text": join_text([row.get(c) for c in text_cols], columns.text_separator),
                "image": cell(row, image_col),
                "audio": cell(row, audio_col),
                "group": cell(row, columns.group),
                "category": cell(row, columns.category),
                "negatives": negatives,
                "_where": where,
            }
        )
    text_by_id = {r["id"]: r["text"] for r in out if r["text"]}
    for r in out:
        if r["negatives"]:
            r["negatives"] = [text_by_id.get(n, n) for n in r["negatives"]]
    return out


def open_image(source: Union[str, os.PathLike, bytes], sample_id: str, where: str,
               draft_side: Optional[int] = None, keep_jpeg: bool = False):
    """PIL RGB image from a path or encoded bytes; with ``draft_side`` a JPEG is decoded at the
    smallest of 1/8, 1/4, 1/2 or full scale whose shorter side is still >= ``draft_side``
    (libjpeg's DCT scaling, ``data.jpeg_draft``). Other formats are decoded whole.

    ``keep_jpeg`` (``data.image_decode: device``): a JPEG the tower's decoder reads as PIL does
    (``device_decodable``) and that the draft would not shrink comes back undecoded, as a
    ``CheckedJpeg`` (see ``check_jpeg``); everything else as above. A JPEG the draft shrinks
    keeps that cheaper decode here: no device decoder scales in the DCT, and decoding it whole
    there would crop another image than the worker path's.

    Raises BadSample ``missing_file`` (path absent) or ``bad_image`` (does not decode).
    """
    from PIL import Image

    if isinstance(source, (str, os.PathLike)) and not os.path.isfile(source):
        raise BadSample(sample_id, "missing_file", where, f"image file not found: {source}")
    try:
        if keep_jpeg and isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as handle:
                source = handle.read()
        handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
        with Image.open(handle) as image:
            drafted = bool(draft_side) and image.format == "JPEG" and min(image.size) >= 2 * draft_side
            if keep_jpeg and not drafted and device_decodable(image):
                return check_jpeg(bytes(source), image)
            if drafted:
                image.draft("RGB", (draft_side, draft_side))  # both sides stay >= draft_side
            return image.convert("RGB")  # forces a full decode: truncated files fail here
    except Exception as error:
        raise BadSample(sample_id, "bad_image", where, repr(error)) from error


def device_decodable(image: Any) -> bool:
    """A JPEG (not MPO or another JPEG-based container) in RGB or greyscale: torchvision's
    ``decode_jpeg(mode=RGB)`` gives what PIL's ``convert("RGB")`` gives. CMYK and YCCK JPEGs are
    left to PIL, which undoes Adobe's inverted CMYK; the decoders disagree there."""
    return image.format == "JPEG" and image.mode in ("RGB", "L")


def check_jpeg(data: bytes, image: Any) -> CheckedJpeg:
    """``data``'s JPEG checked without a full decode: libjpeg decodes it at 1/8 scale (DC
    coefficients only: no inverse DCT beyond them, no upsampling at full size), yet still walks all
    of its entropy-coded data, so a truncated or broken file fails here as a full decode would.
    ``image`` is the opened file (it is loaded at 1/8 scale); the header comes from a second,
    lazy open, as it describes the stored size the crop is drawn on.

    What it costs (libjpeg-turbo 3.2, one core, three real photos re-encoded at 1000 px, q90):
    1.1-2.4 ms against 2.7-4.4 ms for a full decode, 43-56% (66% on a noisy synthetic photo):
    entropy decoding is most of a decode's work. With the pixel copies it saves, a worker spends
    31-43% of the pixel path's time on such an image, and ships a tenth of the bytes."""
    from PIL import Image

    header = Image.open(io.BytesIO(data))  # not loaded: size and mode only
    image.draft(image.mode, (1, 1))  # the smallest scale libjpeg offers: 1/8
    image.load()
    return CheckedJpeg(data, header)


def open_audio(source: Union[str, os.PathLike, bytes], sample_id: str, where: str):
    """(waveform float32 (T,), sample_rate) from a path or encoded bytes.

    Raises BadSample ``missing_file`` or ``bad_audio``.
    """
    from align.data.audio_io import load_audio  # lazy: soundfile only where audio is read

    if isinstance(source, (str, os.PathLike)) and not os.path.isfile(source):
        raise BadSample(sample_id, "missing_file", where, f"audio file not found: {source}")
    try:
        return load_audio(source)
    except Exception as error:
        raise BadSample(sample_id, "bad_audio", where, repr(error)) from error


def load_raw(row: Dict[str, Any], root: Union[str, os.PathLike],
             modalities: Sequence[str] = ("text", "image", "audio"), draft_side: Optional[int] = None,
             keep_jpeg: bool = False) -> Dict[str, Any]:
    """Manifest row -> raw sample (align/data/sample.py) with its media opened; raises BadSample.

    Only ``modalities`` are opened (the others are None): an image-text model neither pays for
    nor trips over a catalogue's audio files. ``draft_side``, ``keep_jpeg``: see ``open_image``.
    """
    sample_id, where = row["id"], row["_where"]
    image = (open_image(os.path.join(root, row["image"]), sample_id, where, draft_side, keep_jpeg)
             if row["image"] and "image" in modalities else None)
    audio = (open_audio(os.path.join(root, row["audio"]), sample_id, where)
             if row["audio"] and "audio" in modalities else None)
    return {"id": sample_id, "group": row["group"], "text": row["text"], "image": image, "audio": audio,
            "negatives": list(row["negatives"]), "_where": where}


def _mix64(key: Sequence[int]) -> int:
    """A 64-bit seed from integers (splitmix64 steps): cheap, and far apart for nearby keys."""
    value = 0x9E3779B97F4A7C15
    for k in key:
        value = (value ^ (int(k) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        value = (value ^ (value >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return value ^ (value >> 29)


@contextlib.contextmanager
def seeded_sample(key: Sequence[int], processor: Any) -> Iterator[None]:
    """Seed torch's CPU generator and the processor's own generators from ``key`` for one
    sample, and restore torch's stream afterwards.

    Random augmentations (crops, audio windows) then depend on ``key`` = (seed, epoch, sample)
    only, not on which worker ran them or what came before, so a resumed run redoes them
    exactly; restoring leaves the trainer's random stream alone when ``num_workers=0``.
    torchvision transforms draw from torch's generator; preprocessors with generators of their
    own (``AudioPreprocessor``) are reseeded through their ``reseed(key)``. Python's and NumPy's
    global streams are left alone: no preprocessor of ours draws from them, and seeding them
    costs more than the crop itself.
    Only torch's CPU generator is seeded: ``torch.manual_seed`` would also queue CUDA seeding,
    which records a stack trace per call (~2 ms a sample).
    """
    seed = _mix64(key)
    generator = torch.default_generator
    saved = generator.get_state()
    generator.manual_seed(seed)
    for index, pre in enumerate(getattr(processor, "preprocessors", {}).values()):
        if hasattr(pre, "reseed"):
            pre.reseed([seed & 0xFFFFFFFF, seed >> 32, index])
    try:
        yield
    finally:
        generator.set_state(saved)


class ManifestDataset(Dataset):
    """Map-style dataset over a manifest; item ``i`` is the processed sample of row ``i``.

    A row that cannot be used (missing or corrupt file, empty text, processor failure) comes
    back as a ``Skipped`` marker (align/data/bad_samples.py) that the loader's collate drops and
    counts, so the dataloader never crashes on data. Indexing with ``(row, epoch)`` seeds the
    row's random augmentations from (seed, epoch, row) (see ``seeded_sample``).

    Args:
        path: .csv, .jsonl or .parquet manifest.
        processor: raw sample -> processed sample (``SampleProcessor``); ``None`` returns raw.
        columns: column names (``ColumnsConfig``).
        root: folder media paths are relative to; defaults to the manifest's folder.
        seed: base seed of the augmentations.
    """

    def __init__(self, path: Union[str, os.PathLike], processor: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]],
                 columns: Optional[ColumnsConfig] = None, root: Optional[Union[str, os.PathLike]] = None,
                 seed: int = 0) -> None:
        self.path = str(path)
        self.processor = processor
        self.columns = columns or ColumnsConfig()
        self.root = str(root) if root is not None else os.path.dirname(os.path.abspath(self.path))
        self.seed = seed
        self.rows = read_manifest(self.path, self.columns)

    def __len__(self) -> int:
        return len(self.rows)

    def raw(self, index: int) -> Dict[str, Any]:
        """The raw sample of row ``index`` (media opened, not processed); raises BadSample."""
        modalities = tuple(getattr(self.processor, "preprocessors", None) or ("text", "image", "audio"))
        return load_raw(self.rows[index], self.root, modalities, getattr(self.processor, "image_draft_side", None),
                        getattr(self.processor, "image_keep_jpeg", False))

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> Union[Dict[str, Any], Skipped]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        row = self.rows[index]
        try:
            raw = self.raw(index)
            if self.processor is None:
                return raw
            with seeded_sample((self.seed, epoch, index), self.processor):
                return self.processor(raw)
        except Exception as error:  # BadSample, or a processor bug on one sample: skip, do not crash
            return Skipped.from_error(error, row["id"], row["_where"])
