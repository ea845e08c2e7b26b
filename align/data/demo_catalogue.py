"""The embedded demo catalogue: synthetic products whose text, image and audio all say the same
four attributes, so a tiny tri-modal model trained from scratch on 2 CPU cores can learn them.

Every item is one combination of

    kind     circle, square, triangle, star, ring, cross        (shape / timbre)
    colour   red, orange, yellow, green, blue, purple           (fill colour / pitch)
    pattern  solid, stripes, dots, checks                       (fill pattern / rhythm)
    size     small, medium, large                               (drawn size / register)

(6 * 6 * 4 * 3 = 432 combinations) and carries

* text: ``title`` ("large red striped star") and ``description`` (one templated sentence). Both
  are functions of the attributes only, so items of one combination have identical text, which
  the retrieval evaluation counts as shared positives.
* image: a PNG of the shape in its colour, its pattern drawn in a darker shade of that colour, at
  its size, on a light background. Nuisance per item: position jitter, rotation up to
  +-12 degrees, background tint, mild pixel noise.
* audio: a mono FLAC clip. What drives what (the mapping is documented so tests can check it
  independently):

  - colour -> pitch: ``COLOUR_SEMITONES`` = red 0, orange 3, yellow 6, green 9, blue 12,
    purple 15 semitones above the register's base;
  - size -> register: ``SIZE_SEMITONES`` = large 0, medium 18, small 36 (big things sound low;
    the 18-semitone step is wider than the colour range, so no two (colour, size) pairs share
    a pitch);
  - fundamental ``f0 = BASE_HZ * 2 ** ((COLOUR_SEMITONES[c] + SIZE_SEMITONES[s]) / 12)`` with
    ``BASE_HZ`` = 110 Hz (so 110 Hz ... 2093 Hz); the fundamental is always the loudest partial;
  - kind -> timbre: the partials' frequency ratios and amplitudes (``TIMBRES``), e.g. a circle is
    a pure sine, a square has strong odd harmonics, a ring is an inharmonic bell;
  - pattern -> rhythm: solid = one continuous tone, stripes = 2 long notes, dots = 4 short
    notes, checks = 8 short decaying ticks;
  - nuisance per item: random phases, detune up to +-15 cents (a colour step is 300), onset
    jitter, loudness, background noise.

Missing modalities: about 5% of items have no image and about 10% no audio (an empty cell),
never both. The test split holds only combinations that never occur in training (3-5 items
each), while every attribute value does occur in training: retrieval on it is zero-shot
composition.

Everything is drawn from a per-item generator seeded by ``(seed, item index)``, so the output is
byte-identical for the same arguments whatever the number of worker processes. The folder is a
cache: ``catalogue.json`` is written last, and a later call with the same parameters returns at
once without touching the files.
"""
from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
import shutil
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

FORMAT_VERSION = 2  # bump when the rendering changes, so stale caches are rebuilt

ATTRIBUTES: Dict[str, List[str]] = {
    "kind": ["circle", "square", "triangle", "star", "ring", "cross"],
    "colour": ["red", "orange", "yellow", "green", "blue", "purple"],
    "pattern": ["solid", "stripes", "dots", "checks"],
    "size": ["small", "medium", "large"],
}

COLUMNS = ["id", "title", "description", "image", "audio", "group", "kind", "colour", "pattern", "size"]

# --- image -------------------------------------------------------------------------------------
COLOUR_RGB: Dict[str, Tuple[int, int, int]] = {
    "red": (215, 30, 30),
    "orange": (245, 135, 10),
    "yellow": (235, 205, 0),
    "green": (30, 160, 50),
    "blue": (30, 80, 225),
    "purple": (140, 40, 185),
}
PATTERN_SHADE = 0.45  # the pattern is drawn in the colour scaled by this (a darker shade)
SIZE_RADIUS = {"small": 0.2, "medium": 0.29, "large": 0.4}  # shape radius / image side
MAX_ROTATION_DEGREES = 12.0
PATTERN_PERIOD = 1 / 8  # stripes/dots/checks repeat every image_side / 8 pixels (8 px at 64)

# --- audio -------------------------------------------------------------------------------------
BASE_HZ = 110.0
COLOUR_SEMITONES = {"red": 0, "orange": 3, "yellow": 6, "green": 9, "blue": 12, "purple": 15}
SIZE_SEMITONES = {"large": 0, "medium": 18, "small": 36}
# kind -> partials as (frequency ratio to f0, amplitude); the fundamental is always loudest.
TIMBRES: Dict[str, List[Tuple[float, float]]] = {
    "circle": [(1, 1.0)],  # pure sine
    "square": [(1, 1.0), (3, 0.6), (5, 0.45), (7, 0.3)],  # odd harmonics, hollow
    "triangle": [(1, 1.0), (2, 0.5), (3, 0.25), (4, 0.12)],  # soft, all harmonics
    "star": [(n, 1.0 if n == 1 else 0.8 - 0.05 * n) for n in range(1, 9)],  # bright, buzzy
    "ring": [(1, 1.0), (2.76, 0.6), (5.40, 0.4), (8.93, 0.25)],  # inharmonic bell
    "cross": [(1, 1.0), (2, 0.85), (4, 0.7), (8, 0.5)],  # octave partials, organ-like
}
RHYTHM_NOTES = {"solid": 1, "stripes": 2, "dots": 4, "checks": 8}  # notes per clip
MAX_DETUNE_CENTS = 15.0


def item_title(kind: str, colour: str, pattern: str, size: str) -> str:
    """``"large red striped star"``: the same for every item of one combination."""
    adjective = {"solid": "solid", "stripes": "striped", "dots": "dotted", "checks": "checked"}[pattern]
    return f"{size} {colour} {adjective} {kind}"


def item_description(kind: str, colour: str, pattern: str, size: str) -> str:
    """One templated sentence naming all four attributes (deterministic, like the title)."""
    fill = {"solid": "a plain solid fill", "stripes": "bold stripes", "dots": "round dots",
            "checks": "a checkerboard pattern"}[pattern]
    return f"A {size} {kind} in {colour}, decorated with {fill}."


def fundamental_hz(colour: str, size: str) -> float:
    """The note's fundamental before detuning: ``BASE_HZ * 2 ** ((colour + size semitones) / 12)``."""
    return BASE_HZ * 2.0 ** ((COLOUR_SEMITONES[colour] + SIZE_SEMITONES[size]) / 12.0)


# ------------------------------------------------------------------------------------------------
# image
# ------------------------------------------------------------------------------------------------
def _shape_polygon(kind: str, radius: float) -> List[Tuple[float, float]]:
    """Vertices around the origin (y down) of the polygonal kinds, before rotation."""
    if kind == "square":
        h = radius * 0.85
        return [(-h, -h), (h, -h), (h, h), (-h, h)]
    if kind == "triangle":
        return [(radius * math.cos(a), radius * math.sin(a) + radius * 0.15)
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if kind == "star":
        points = []
        for i in range(10):
            r = radius if i % 2 == 0 else radius * 0.45
            a = -math.pi / 2 + i * math.pi / 5
            points.append((r * math.cos(a), r * math.sin(a)))
        return points
    if kind == "cross":
        a, w = radius * 0.95, radius * 0.38
        return [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w),
                (-a, -w), (-w, -w)]
    raise ValueError(f"no polygon for kind {kind!r}")


def _shape_mask(kind: str, size_px: int, centre: Tuple[float, float], radius: float,
                angle: float, supersample: int = 4) -> np.ndarray:
    """(H, W) float coverage in [0, 1], antialiased by drawing at ``supersample`` times the size."""
    big = size_px * supersample
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = centre[0] * supersample, centre[1] * supersample
    r = radius * supersample
    if kind in ("circle", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if kind == "ring":
            inner = r * 0.5
            draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    else:
        cos, sin = math.cos(angle), math.sin(angle)
        points = [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in _shape_polygon(kind, r)]
        draw.polygon(points, fill=255)
    small = canvas.resize((size_px, size_px), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _pattern_mask(pattern: str, size_px: int, centre: Tuple[float, float], angle: float) -> np.ndarray:
    """(H, W) bool: where the darker pattern shade goes, in the shape's own (rotated) frame."""
    if pattern == "solid":
        return np.zeros((size_px, size_px), dtype=bool)
    period = max(size_px * PATTERN_PERIOD, 3.0)
    y, x = np.mgrid[0:size_px, 0:size_px].astype(np.float32) + 0.5
    x, y = x - centre[0], y - centre[1]
    cos, sin = math.cos(-angle), math.sin(-angle)
    u, v = x * cos - y * sin, x * sin + y * cos  # pixel centres in the shape's frame
    fu, fv = np.mod(u, period) / period, np.mod(v, period) / period  # position in the cell, [0, 1)
    if pattern == "stripes":  # horizontal bands covering ~40% of the fill
        return fv < 0.4
    if pattern == "dots":  # a disc in every cell, ~30% of the fill
        return (fu - 0.5) ** 2 + (fv - 0.5) ** 2 < 0.31 ** 2
    if pattern == "checks":  # every other cell, inset so the shade covers < 50% and the colour dominates
        # Cells 1.5 periods wide: big dark squares on a diagonal lattice, which a small model
        # tells apart from the small round dots (same-size cells made both read as "dark blobs").
        cell = period * 1.5
        gu, gv = np.mod(u, cell) / cell, np.mod(v, cell) / cell
        cells = (np.floor(u / cell) + np.floor(v / cell)) % 2 == 0
        inset = 1.0 / cell  # a 1 px rim of the main colour round each dark cell
        return cells & (gu > inset) & (gu < 1 - inset) & (gv > inset) & (gv < 1 - inset)
    raise ValueError(f"unknown pattern {pattern!r}; expected one of {ATTRIBUTES['pattern']}")


def render_image(kind: str, colour: str, pattern: str, size: str, rng: np.random.Generator,
                 image_size: int = 64) -> Image.Image:
    """An RGB image of one item: the shape in ``colour`` with ``pattern`` at ``size`` on a light
    background, with per-item nuisance drawn from ``rng`` (jitter, rotation, tint, noise)."""
    radius = SIZE_RADIUS[size] * image_size
    slack = max(image_size / 2 - radius - 1, 0.0)
    centre = (image_size / 2 + rng.uniform(-0.8, 0.8) * slack, image_size / 2 + rng.uniform(-0.8, 0.8) * slack)
    angle = math.radians(rng.uniform(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES))
    background = 242.0 + rng.uniform(-10, 10, size=3)  # light, slightly tinted
    main = np.asarray(COLOUR_RGB[colour], dtype=np.float32)
    fill = np.where(_pattern_mask(pattern, image_size, centre, angle)[..., None], main * PATTERN_SHADE, main)
    coverage = _shape_mask(kind, image_size, centre, radius, angle)[..., None]  # (H, W, 1)
    pixels = coverage * fill + (1 - coverage) * background  # (H, W, 3)
    pixels = pixels + rng.normal(0.0, 4.0, size=pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")


# ------------------------------------------------------------------------------------------------
# audio
# ------------------------------------------------------------------------------------------------
def _envelope(pattern: str, n: int, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """(n,) amplitude envelope: the rhythm. Notes are evenly spaced over the clip."""
    notes = RHYTHM_NOTES[pattern]
    t = np.arange(n) / sample_rate
    clip = n / sample_rate
    slot = clip / notes
    shift = rng.uniform(-0.01, 0.01) * clip  # onset jitter
    ramp = min(0.01, slot / 10)  # 10 ms attack/release, no clicks
    env = np.zeros(n)
    for i in range(notes):
        start = i * slot + shift
        if pattern == "checks":  # a tick: fast attack, exponential decay
            local = np.maximum(t - start, 0)
            tick = np.minimum(local / 0.003, 1.0) * np.exp(-local / (slot * 0.18))  # 3 ms attack
            env += np.where(t >= start, tick, 0)
        else:
            length = {"solid": 1.0, "stripes": 0.75, "dots": 0.5}[pattern] * slot
            local = t - start
            rise = np.clip(local / ramp, 0, 1)
            fall = np.clip((length - local) / ramp, 0, 1)
            env += np.where((local >= 0) & (local <= length), rise * fall, 0)
    return np.clip(env, 0, 1)


def render_audio(kind: str, colour: str, pattern: str, size: str, rng: np.random.Generator,
                 sample_rate: int = 16000, clip_seconds: float = 1.0) -> np.ndarray:
    """(n,) float32 mono waveform in [-1, 1] of one item (see the module docstring for the mapping):
    colour -> pitch, size -> register, kind -> timbre, pattern -> rhythm."""
    n = int(round(sample_rate * clip_seconds))
    t = np.arange(n) / sample_rate
    f0 = fundamental_hz(colour, size) * 2.0 ** (rng.uniform(-MAX_DETUNE_CENTS, MAX_DETUNE_CENTS) / 1200)
    tone = np.zeros(n)
    partials = TIMBRES[kind]
    phases = rng.uniform(0, 2 * math.pi, size=len(partials))
    for (ratio, amplitude), phase in zip(partials, phases):
        if f0 * ratio < 0.45 * sample_rate:  # drop partials that would alias
            tone += amplitude * np.sin(2 * math.pi * f0 * ratio * t + phase)
    tone /= sum(a for _, a in partials)
    wave = tone * _envelope(pattern, n, sample_rate, rng) * rng.uniform(0.5, 0.9)
    wave += rng.normal(0.0, rng.uniform(0.001, 0.003), size=n)  # faint hiss (more bloats the FLACs)
    return np.clip(wave, -1, 1).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# the catalogue
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Item:
    index: int
    split: str
    kind: str
    colour: str
    pattern: str
    size: str


def all_combinations() -> List[Tuple[str, str, str, str]]:
    """Every (kind, colour, pattern, size), in a fixed order."""
    return [(k, c, p, s) for k in ATTRIBUTES["kind"] for c in ATTRIBUTES["colour"]
            for p in ATTRIBUTES["pattern"] for s in ATTRIBUTES["size"]]


def split_combinations(seed: int, n_test_combinations: int) -> Tuple[list, list]:
    """(train, test) combinations: test ones never appear in training, and every attribute value
    keeps at least one training combination (redrawn until it does)."""
    combos = all_combinations()
    n_test_combinations = min(max(n_test_combinations, 0), len(combos) // 2)
    for attempt in range(1000):
        order = np.random.default_rng([seed, 1_000_000_007, attempt]).permutation(len(combos))
        test = [combos[i] for i in sorted(order[:n_test_combinations])]
        train = [combos[i] for i in sorted(order[n_test_combinations:])]
        if all({c[a] for c in train} == set(values) for a, values in enumerate(ATTRIBUTES.values())):
            return train, test
    raise RuntimeError("could not split the combinations so that training sees every attribute value")


def _plan(seed: int, n_train: int, n_test: int) -> List[_Item]:
    """Which combination every item gets. Test: ~4 items per held-out combination (3-5);
    train: the training combinations cycled in a shuffled order, so they are balanced."""
    n_test_combos = max(1, round(n_test / 4)) if n_test > 0 else 0
    train_combos, test_combos = split_combinations(seed, n_test_combos)
    rng = np.random.default_rng([seed, 1_000_000_009])
    order = rng.permutation(len(train_combos))
    train = [train_combos[order[i % len(order)]] for i in range(n_train)]
    train = [train[i] for i in rng.permutation(n_train)]
    test = []
    if test_combos:
        base, extra = divmod(n_test, len(test_combos))
        for j, combo in enumerate(test_combos):
            test += [combo] * (base + (1 if j < extra else 0))
    items = [_Item(i, "train", *combo) for i, combo in enumerate(train)]
    items += [_Item(n_train + i, "test", *combo) for i, combo in enumerate(test)]
    return items


def _make_item(job: Tuple[str, _Item, int, int, int, float]) -> Dict[str, str]:
    """Render and write one item's files; returns its manifest row. Runs in worker processes."""
    import soundfile as sf

    out_dir, item, seed, image_size, sample_rate, clip_seconds = job
    rng = np.random.default_rng([seed, item.index])
    draw = rng.uniform()
    has_image, has_audio = draw >= 0.05, not (0.05 <= draw < 0.15)  # 5% no image, 10% no audio
    attrs = (item.kind, item.colour, item.pattern, item.size)
    name = f"{item.index:06d}"
    row = {"id": name, "title": item_title(*attrs), "description": item_description(*attrs),
           "image": "", "audio": "", "group": "", "kind": item.kind, "colour": item.colour,
           "pattern": item.pattern, "size": item.size}
    # Separate streams per modality: dropping one modality never changes the other's pixels/samples.
    image_rng, audio_rng = (np.random.default_rng([seed, item.index, stream]) for stream in (1, 2))
    if has_image:
        row["image"] = f"images/{name}.png"
        render_image(*attrs, image_rng, image_size).save(os.path.join(out_dir, row["image"]), format="PNG")
    if has_audio:
        row["audio"] = f"audio/{name}.flac"
        wave = render_audio(*attrs, audio_rng, sample_rate, clip_seconds)
        sf.write(os.path.join(out_dir, row["audio"]), wave, sample_rate, format="FLAC", subtype="PCM_16")
    return row


def _write_csv(path: str, rows: Sequence[Dict[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


OUTPUTS = ("catalogue.json", "train.csv", "test.csv", "images", "audio")


def _summary(out_dir: str, record: Dict) -> Dict:
    return {"out": out_dir, "train": os.path.join(out_dir, "train.csv"),
            "test": os.path.join(out_dir, "test.csv"), **record}


def build_demo_catalogue(out_dir: str, seed: int = 0, n_train: int = 4000, n_test: int = 400,
                         image_size: int = 64, sample_rate: int = 16000, clip_seconds: float = 1.0,
                         force: bool = False, workers: Optional[int] = None) -> Dict:
    """Write ``{out_dir}/train.csv`` and ``test.csv`` (columns ``COLUMNS``; image/audio paths
    relative to the CSV's folder) with ``images/*.png`` and ``audio/*.flac``, then
    ``catalogue.json`` (parameters and counts) last.

    Cached: when ``catalogue.json`` exists with the same parameters, nothing is written and its
    summary is returned at once (``"cached": True``). Otherwise (or with ``force``) the previous
    outputs in ``out_dir`` (only the files named in ``OUTPUTS``) are removed and everything is
    regenerated. The files are byte-identical for the same parameters; ``workers`` (default: up
    to 2 processes) changes only the speed.

    Returns a dict with ``out``, ``train``, ``test`` (paths), ``parameters`` and ``counts``.
    """
    if n_train < 1 or n_test < 0:
        raise ValueError(f"need n_train >= 1 and n_test >= 0, got n_train={n_train}, n_test={n_test}")
    parameters = {"format_version": FORMAT_VERSION, "seed": seed, "n_train": n_train, "n_test": n_test,
                  "image_size": image_size, "sample_rate": sample_rate, "clip_seconds": float(clip_seconds)}
    out_dir = os.path.abspath(out_dir)
    record_path = os.path.join(out_dir, "catalogue.json")
    if not force and os.path.exists(record_path):
        try:
            with open(record_path, encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError):
            record = {}
        if record.get("parameters") == parameters:
            return {**_summary(out_dir, record), "cached": True}

    for name in OUTPUTS:  # clean our own previous outputs only: out_dir may hold other things
        path = os.path.join(out_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    os.makedirs(os.path.join(out_dir, "images"))
    os.makedirs(os.path.join(out_dir, "audio"))

    items = _plan(seed, n_train, n_test)
    jobs = [(out_dir, item, seed, image_size, sample_rate, clip_seconds) for item in items]
    workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    if workers > 1 and len(jobs) > 64:
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
        with multiprocessing.get_context(method).Pool(workers) as pool:
            rows = pool.map(_make_item, jobs, chunksize=64)
    else:
        rows = [_make_item(job) for job in jobs]

    splits = {"train": [r for r, it in zip(rows, items) if it.split == "train"],
              "test": [r for r, it in zip(rows, items) if it.split == "test"]}
    counts = {}
    for split, split_rows in splits.items():
        _write_csv(os.path.join(out_dir, f"{split}.csv"), split_rows)
        counts[split] = {"items": len(split_rows),
                         "combinations": len({(r["kind"], r["colour"], r["pattern"], r["size"]) for r in split_rows}),
                         "without_image": sum(not r["image"] for r in split_rows),
                         "without_audio": sum(not r["audio"] for r in split_rows)}
    record = {"parameters": parameters, "counts": counts, "columns": COLUMNS, "attributes": ATTRIBUTES}
    with open(record_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(record_path + ".tmp", record_path)  # last: its presence means the folder is complete
    return {**_summary(out_dir, record), "cached": False}
