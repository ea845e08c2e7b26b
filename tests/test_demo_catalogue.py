"""The demo catalogue: deterministic, cached, a zero-shot split, and media that really carry the
attributes (checked against the documented mappings, written out again here)."""
import csv
import hashlib
import itertools
import os
from collections import defaultdict

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from align.data.demo_catalogue import ATTRIBUTES, build_demo_catalogue, render_audio, render_image
from data_prep.demo import main as demo_main

TINY = dict(seed=0, n_train=70, n_test=12, image_size=32, sample_rate=8000, clip_seconds=0.25)
HEADER = ["id", "title", "description", "image", "audio", "group", "kind", "colour", "pattern", "size"]

# The documented audio mapping: colour -> semitone step of 3, size -> register 18 semitones apart.
EXPECTED_SEMITONES = {"red": 0, "orange": 3, "yellow": 6, "green": 9, "blue": 12, "purple": 15}
EXPECTED_REGISTER = {"large": 0, "medium": 18, "small": 36}
# Rough reference colours (not the palette itself): the dominant colour must be nearest its own.
REFERENCE_RGB = {"red": (255, 0, 0), "orange": (255, 140, 0), "yellow": (255, 230, 0),
                 "green": (0, 160, 0), "blue": (0, 60, 255), "purple": (140, 0, 200)}


def file_hashes(folder):
    hashes = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                hashes[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return hashes


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == HEADER
        return list(reader)


def combo(row):
    return row["kind"], row["colour"], row["pattern"], row["size"]


def dominant_hz(wave, sample_rate):
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return np.fft.rfftfreq(len(wave), 1 / sample_rate)[np.argmax(spectrum)]


def dominant_colour_name(image):
    pixels = np.asarray(image.convert("RGB"), dtype=np.int32).reshape(-1, 3)
    corners = np.asarray(image.convert("RGB"), dtype=np.int32)[[0, 0, -1, -1], [0, -1, 0, -1]]
    background = np.median(corners, axis=0)
    foreground = pixels[np.abs(pixels - background).max(axis=1) > 60]
    assert len(foreground) > 20, "no shape found in the image"
    bins, counts = np.unique(foreground // 32, axis=0, return_counts=True)
    dominant = bins[np.argmax(counts)] * 32 + 16
    return min(REFERENCE_RGB, key=lambda name: np.sum((np.asarray(REFERENCE_RGB[name]) - dominant) ** 2))


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    summary = build_demo_catalogue(str(out), seed=3, n_train=600, n_test=60, image_size=32,
                                   sample_rate=8000, clip_seconds=0.25)
    return out, summary, read_rows(summary["train"]), read_rows(summary["test"])


def test_same_arguments_give_identical_files_whatever_the_workers(tmp_path):
    one = build_demo_catalogue(str(tmp_path / "a"), workers=1, **TINY)
    two = build_demo_catalogue(str(tmp_path / "b"), workers=2, **TINY)
    assert not one["cached"] and not two["cached"]
    hashes = file_hashes(tmp_path / "a")
    assert len(hashes) > 100 and hashes == file_hashes(tmp_path / "b")
    build_demo_catalogue(str(tmp_path / "c"), workers=1, **{**TINY, "seed": 1})
    assert file_hashes(tmp_path / "c")["train.csv"] != hashes["train.csv"]  # the seed matters


def test_cache_hit_rewrites_nothing_and_new_arguments_rebuild_cleanly(tmp_path):
    out = tmp_path / "demo"
    build_demo_catalogue(str(out), **TINY)
    mtimes = {p: os.stat(out / p).st_mtime_ns for p in file_hashes(out)}
    again = demo_main(["--out", str(out), "--n-train", "70", "--n-test", "12", "--image-size", "32",
                       "--sample-rate", "8000", "--clip-seconds", "0.25"])
    assert again == 0
    assert build_demo_catalogue(str(out), **TINY)["cached"]
    assert {p: os.stat(out / p).st_mtime_ns for p in file_hashes(out)} == mtimes

    (out / "notes.txt").write_text("not ours")
    smaller = build_demo_catalogue(str(out), **{**TINY, "n_train": 40})
    assert not smaller["cached"] and smaller["counts"]["train"]["items"] == 40
    files = file_hashes(out)
    assert "notes.txt" in files  # only the catalogue's own outputs are cleaned
    listed = {r[k] for r in read_rows(out / "train.csv") + read_rows(out / "test.csv") for k in ("image", "audio")}
    assert {p for p in files if p.startswith(("images", "audio"))} == listed - {""}  # no stale media


def test_test_split_holds_only_unseen_combinations_of_seen_values(catalogue):
    _, summary, train, test = catalogue
    assert (len(train), len(test)) == (600, 60)
    assert summary["counts"]["test"]["items"] == 60
    train_combos, test_combos = {combo(r) for r in train}, {combo(r) for r in test}
    assert not train_combos & test_combos
    for position, (attribute, values) in enumerate(ATTRIBUTES.items()):
        assert {c[position] for c in train_combos} == set(values), attribute
    per_combo = defaultdict(int)
    for row in test:
        per_combo[combo(row)] += 1
    assert all(3 <= n <= 5 for n in per_combo.values()), per_combo
    ids = [r["id"] for r in train + test]
    assert len(set(ids)) == len(ids) and all(r["group"] == "" for r in train + test)


def test_missing_modalities_roughly_right_and_never_both(catalogue):
    out, _, train, test = catalogue
    rows = train + test
    no_image = sum(r["image"] == "" for r in rows) / len(rows)
    no_audio = sum(r["audio"] == "" for r in rows) / len(rows)
    assert 0.02 < no_image < 0.09 and 0.05 < no_audio < 0.16, (no_image, no_audio)
    assert not any(r["image"] == "" and r["audio"] == "" for r in rows)
    for row in rows:  # paths are relative to the CSV's folder and point at real files
        for key, ext in (("image", ".png"), ("audio", ".flac")):
            if row[key]:
                assert not os.path.isabs(row[key]) and row[key].endswith(ext)
                assert os.path.isfile(out / row[key]), row


def test_text_is_a_function_of_the_combination(catalogue):
    _, _, train, test = catalogue
    adjective = {"solid": "solid", "stripes": "striped", "dots": "dotted", "checks": "checked"}
    pattern_word = {"solid": "solid", "stripes": "stripes", "dots": "dots", "checks": "checkerboard"}
    texts = defaultdict(set)
    for row in train + test:
        kind, colour, pattern, size = combo(row)
        texts[combo(row)].add((row["title"], row["description"]))
        assert row["title"] == f"{size} {colour} {adjective[pattern]} {kind}"
        for word in (kind, colour, size, pattern_word[pattern]):
            assert word in row["description"], row
    assert all(len(t) == 1 for t in texts.values())
    descriptions = [next(iter(t))[1] for t in texts.values()]
    assert len(set(descriptions)) == len(descriptions)  # different combinations never share text


@pytest.mark.parametrize("kind,pattern", [("circle", "solid"), ("square", "checks"), ("star", "dots"),
                                          ("ring", "stripes"), ("cross", "checks"), ("triangle", "dots")])
def test_audio_dominant_frequency_follows_colour_and_size(kind, pattern):
    rng = np.random.default_rng(7)
    for colour, size in itertools.product(ATTRIBUTES["colour"], ATTRIBUTES["size"]):
        wave = render_audio(kind, colour, pattern, size, rng, sample_rate=16000, clip_seconds=1.0)
        assert wave.shape == (16000,) and np.abs(wave).max() <= 1.0
        expected = 110.0 * 2 ** ((EXPECTED_SEMITONES[colour] + EXPECTED_REGISTER[size]) / 12)
        found = dominant_hz(wave, 16000)
        # detune is at most 15 cents (~0.9%); neighbouring colours are 3 semitones (~19%) apart
        assert abs(found / expected - 1) < 0.03, (kind, colour, pattern, size, found, expected)


def test_audio_files_carry_their_pitch_and_rhythm(catalogue):
    out, _, train, _ = catalogue
    seen_patterns = set()
    for row in [r for r in train if r["audio"]][:40]:
        wave, rate = sf.read(out / row["audio"], dtype="float32")
        assert rate == 8000 and wave.shape == (2000,)
        expected = 110.0 * 2 ** ((EXPECTED_SEMITONES[row["colour"]] + EXPECTED_REGISTER[row["size"]]) / 12)
        assert abs(dominant_hz(wave, rate) / expected - 1) < 0.05, row
        # rhythm: a continuous tone is loud nearly all the time, 8 ticks much less of it
        frames = np.abs(wave[: len(wave) // 40 * 40]).reshape(40, -1).max(axis=1)
        active = np.mean(frames > 0.25 * frames.max())
        if row["pattern"] == "solid":
            assert active > 0.85, row
        if row["pattern"] == "checks":
            assert active < 0.7, row
        seen_patterns.add(row["pattern"])
    assert {"solid", "checks"} <= seen_patterns


def test_image_dominant_colour_is_the_attribute_colour():
    rng = np.random.default_rng(11)
    for kind, colour, pattern, size in itertools.product(*ATTRIBUTES.values()):
        image = render_image(kind, colour, pattern, size, rng, image_size=64)
        assert image.size == (64, 64) and image.mode == "RGB"
        assert dominant_colour_name(image) == colour, (kind, colour, pattern, size)


def test_catalogue_images_match_their_rows(catalogue):
    out, _, train, test = catalogue
    sizes = defaultdict(list)
    for row in [r for r in train + test if r["image"]][:80]:
        image = Image.open(out / row["image"])
        assert image.size == (32, 32)
        assert dominant_colour_name(image) == row["colour"], row
        pixels = np.asarray(image, dtype=np.int32)
        sizes[row["size"]].append(np.mean(np.abs(pixels - pixels[0, 0]).max(axis=2) > 60))
    means = {k: np.mean(v) for k, v in sizes.items()}  # drawn area grows with the size attribute
    assert means["small"] < means["medium"] < means["large"], means
