"""Manifest reading and the manifest loader: formats, errors, determinism, resume, bad samples.

The toy processor here (picklable, via ``SampleProcessor``) is shared with test_shards.py and
test_prep_shards.py: text -> 8 character codes, image -> a random 4x4 crop's mean colour (so a
resumed run must redo the same random crops), audio -> a random 100-sample window.
"""
from __future__ import annotations

import io
import json
import os
import wave as wave_module

import numpy as np
import pytest
import torch
from PIL import Image

from align.data.audio_io import AudioPreprocessor
from align.data.bad_samples import TooManyBadSamples
from align.data.loader import build_loader
from align.config import ColumnsConfig
from align.data.manifest import ManifestDataset, read_manifest
from align.data.transforms import SampleProcessor


# ---------------------------------------------------------------- shared toy data + processor
def toy_text(text):
    codes = [ord(c) % 256 for c in str(text)[:8]]
    return torch.tensor(codes + [0] * (8 - len(codes)), dtype=torch.long)  # (8,)


def toy_image(image):
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
    top = int(torch.randint(0, array.shape[1] - 3, ()))
    left = int(torch.randint(0, array.shape[2] - 3, ()))
    return array[:, top:top + 4, left:left + 4].mean(dim=(1, 2))  # (3,) depends on the random crop


def toy_processor(audio=True, max_negatives=0):
    pre = {"text": toy_text, "image": toy_image}
    if audio:
        pre["audio"] = AudioPreprocessor(sample_rate=8000, clip_seconds=100 / 8000, crop="random", seed=1)
    return SampleProcessor(pre, max_negatives=max_negatives)


def image_bytes(seed, size=8, fmt="PNG"):
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def wav_bytes(seed, frames=400, rate=8000):
    rng = np.random.default_rng(seed)
    data = (rng.uniform(-0.5, 0.5, frames) * 32767).astype("<i2").tobytes()
    buffer = io.BytesIO()
    with wave_module.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(data)
    return buffer.getvalue()


def make_catalogue(folder, n=40, bad_image=(), bad_audio=(), empty_text=(), missing=(), audio=True):
    """Write n items (image + audio + text) and a CSV manifest; damage the listed indices."""
    os.makedirs(os.path.join(folder, "media"), exist_ok=True)
    rows = []
    for i in range(n):
        image = f"media/{i}.png"
        data = image_bytes(i)
        if i in bad_image:
            data = data[: len(data) // 2]  # truncated PNG
        if i not in missing:
            with open(os.path.join(folder, image), "wb") as f:
                f.write(data)
        audio_path = f"media/{i}.wav"
        sound = wav_bytes(i)
        if i in bad_audio:
            sound = b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk"  # not decodable
        with open(os.path.join(folder, audio_path), "wb") as f:
            f.write(sound)
        rows.append({"id": f"item{i:03d}", "title": "" if i in empty_text else f"title {i}",
                     "description": "" if i in empty_text else f"description {i}", "image": image,
                     "audio": audio_path if audio else "", "group": f"g{i // 4}", "category": "c",
                     "negatives": f"neg a {i}|neg b {i}"})
    return rows


def write_csv(path, rows):
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def batches_as_lists(batches):
    out = []
    for b in batches:
        entry = {"ids": list(b["ids"])}
        for key, value in b["inputs"].items():
            entry[key] = value.clone()
        out.append(entry)
    return out


def assert_same_batches(a, b):
    assert [x["ids"] for x in a] == [y["ids"] for y in b]
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for key in x:
            if key != "ids":
                assert torch.equal(x[key], y[key]), key


# ---------------------------------------------------------------- read_manifest
def test_read_csv_joins_text_and_parses_fields(tmp_path):
    path = write_csv(tmp_path / "m.csv", [
        {"id": "a", "title": "Red cup", "description": "ceramic", "image": "a.png", "audio": "",
         "group": "g1", "category": "kitchen", "negatives": "blue cup|green cup"},
        {"id": "b", "title": "", "description": "only description", "image": "", "audio": "b.wav",
         "group": "", "category": "", "negatives": '["x", "y", ""]'},
    ])
    rows = read_manifest(path)
    assert rows[0] == {"id": "a", "text": "Red cup. ceramic", "image": "a.png", "audio": None, "group": "g1",
                       "category": "kitchen", "negatives": ["blue cup", "green cup"], "_where": f"{path}:2"}
    assert rows[1]["text"] == "only description" and rows[1]["image"] is None and rows[1]["audio"] == "b.wav"
    assert rows[1]["group"] is None and rows[1]["negatives"] == ["x", "y"] and rows[1]["_where"] == f"{path}:3"


def test_read_jsonl_and_parquet_agree_with_csv(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"id": "a", "title": "t1", "description": None, "image": "a.png", "negatives": ["n1", "n2"]},
               {"id": "b", "title": "t2", "description": "d2", "image": "b.png", "negatives": []}]
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    parquet = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet)
    for path in (jsonl, parquet):
        rows = read_manifest(path)
        assert [r["text"] for r in rows] == ["t1", "t2. d2"]
        assert [r["negatives"] for r in rows] == [["n1", "n2"], []]
        assert [r["audio"] for r in rows] == [None, None] and rows[0]["group"] is None
        assert rows[1]["_where"] == f"{path}:2"


@pytest.mark.parametrize("suffix, text, first_line", [
    (".csv", "id,title,image\r\nsku-1,Red shoe,1.png\r\nsku-2,Café lamp,\r\n", 2),
    (".jsonl", '{"id": "sku-1", "title": "Red shoe", "image": "1.png"}\n{"id": "sku-2", "title": "Café lamp"}\n', 1),
], ids=["csv", "jsonl"])
def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path, suffix, text, first_line):
    """Excel's "CSV UTF-8" (and some JSONL writers) start the file with U+FEFF; the first column
    is still 'id' and the first line still JSON."""
    path = tmp_path / f"excel{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    rows = read_manifest(path)
    assert [(r["id"], r["text"], r["image"], r["_where"]) for r in rows] == [
        ("sku-1", "Red shoe", "1.png", f"{path}:{first_line}"),
        ("sku-2", "Café lamp", None, f"{path}:{first_line + 1}")]


def test_a_manifest_not_in_utf8_names_the_file(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("id,title\n1,Caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.csv: not UTF-8 text .*save it as UTF-8"):
        read_manifest(path)


def test_custom_columns_and_missing_negatives_column(tmp_path):
    path = write_csv(tmp_path / "m.csv", [{"sku": "1", "name": "Lamp", "picture": "1.jpg"}])
    rows = read_manifest(path, ColumnsConfig(id="sku", text=["name"], image="picture"))
    assert rows[0]["id"] == "1" and rows[0]["text"] == "Lamp" and rows[0]["image"] == "1.jpg"
    assert rows[0]["negatives"] == [] and rows[0]["category"] is None


def test_missing_id_column_names_file_and_column(tmp_path):
    path = write_csv(tmp_path / "m.csv", [{"key": "1", "title": "x"}])
    with pytest.raises(ValueError, match=r"m\.csv.*'id'"):
        read_manifest(path)


def test_no_content_columns_is_an_error(tmp_path):
    path = write_csv(tmp_path / "m.csv", [{"id": "1", "other": "x"}])
    with pytest.raises(ValueError, match=r"m\.csv.*title"):
        read_manifest(path)


def test_duplicate_id_names_both_rows(tmp_path):
    path = write_csv(tmp_path / "m.csv", [{"id": "1", "title": "x"}, {"id": "2", "title": "y"},
                                          {"id": "1", "title": "z"}])
    with pytest.raises(ValueError, match=r"duplicate id '1' at .*m\.csv:2 and .*m\.csv:4"):
        read_manifest(path)


# ---------------------------------------------------------------- ManifestDataset
def test_dataset_decodes_media_relative_to_manifest(tmp_path):
    rows = make_catalogue(tmp_path, n=3)
    path = write_csv(tmp_path / "m.csv", rows)
    dataset = ManifestDataset(path, toy_processor())
    raw = dataset.raw(1)
    assert raw["image"].mode == "RGB" and raw["image"].size == (8, 8)
    wave, rate = raw["audio"]
    assert rate == 8000 and wave.shape == (400,) and wave.dtype == np.float32
    sample = dataset[1]
    assert sample["id"] == "item001" and sample["audio"].shape == (100,) and sample["image"].shape == (3,)


# ---------------------------------------------------------------- loader: determinism and resume
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_with_skip_batches_equals_uninterrupted_tail(tmp_path, num_workers):
    path = write_csv(tmp_path / "m.csv", make_catalogue(tmp_path, n=30))
    make = lambda: build_loader(path, toy_processor(), batch_size=4, num_workers=num_workers, train=True, seed=3)
    loader = make()
    assert len(loader) == 7
    full = batches_as_lists(loader.iterate(epoch=2))
    again = batches_as_lists(make().iterate(epoch=2))
    assert_same_batches(full, again)
    resumed = batches_as_lists(make().iterate(epoch=2, skip_batches=3))
    assert_same_batches(full[3:], resumed)
    other_epoch = batches_as_lists(make().iterate(epoch=3))
    assert [b["ids"] for b in other_epoch] != [b["ids"] for b in full]


def test_workers_do_not_change_the_batches(tmp_path):
    path = write_csv(tmp_path / "m.csv", make_catalogue(tmp_path, n=20))
    a = batches_as_lists(build_loader(path, toy_processor(), batch_size=4, num_workers=0, train=True,
                                      seed=1).iterate(0))
    b = batches_as_lists(build_loader(path, toy_processor(), batch_size=4, num_workers=2, train=True,
                                      seed=1).iterate(0))
    assert_same_batches(a, b)


def test_ranks_split_each_epoch_with_equal_steps(tmp_path):
    path = write_csv(tmp_path / "m.csv", make_catalogue(tmp_path, n=27, audio=False))
    loaders = [build_loader(path, toy_processor(audio=False), batch_size=4, num_workers=0, train=True, seed=0,
                            rank=r, world_size=3) for r in range(3)]
    assert [len(l) for l in loaders] == [2, 2, 2]  # 27 // 12 steps
    ids = [[i for b in l.iterate(0) for i in b["ids"]] for l in loaders]
    flat = [i for r in ids for i in r]
    assert all(len(r) == 8 for r in ids) and len(set(flat)) == 24


def test_eval_keeps_order_and_last_partial_batch(tmp_path):
    path = write_csv(tmp_path / "m.csv", make_catalogue(tmp_path, n=10))
    loader = build_loader(path, toy_processor(), batch_size=4, num_workers=0, train=False, seed=0,
                          drop_last=False)
    batches = list(loader.iterate(0))
    assert len(loader) == 3 and [len(b["ids"]) for b in batches] == [4, 4, 2]
    assert [i for b in batches for i in b["ids"]] == [f"item{i:03d}" for i in range(10)]
    assert "bad" not in batches[0]


# ---------------------------------------------------------------- bad samples
@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_samples_are_skipped_and_counted_exactly(tmp_path, num_workers):
    n = 100
    damage = dict(bad_image={3, 50}, bad_audio={7, 61}, empty_text={11}, missing={20})
    path = write_csv(tmp_path / "m.csv", make_catalogue(tmp_path, n=n, **damage))
    loader = build_loader(path, toy_processor(), batch_size=10, num_workers=num_workers, train=False, seed=0,
                          drop_last=False, max_bad_fraction=0.1)
    batches = list(loader.iterate(0))
    ids = [i for b in batches for i in b["ids"]]
    assert len(ids) == n - 5 and len(batches) == len(loader) == 10
    # a row whose text fields are all empty is an item without text, not a bad sample
    has_text = {i: bool(m) for b in batches for i, m in zip(b["ids"], b["masks"]["text"])}
    assert has_text["item011"] is False and has_text["item012"] is True
    assert loader.bad.counts == {"bad_image": 2, "bad_audio": 2, "missing_file": 1}
    assert loader.bad.total == 5 and loader.bad.seen == n
    example = {e.sample_id: e for e in loader.bad.examples}
    assert example["item003"].reason == "bad_image" and example["item003"].where.endswith("m.csv:5")
    assert "item020" in example and "20.png" in example["item020"].detail


def test_too_many_bad_samples_raise_naming_the_reason(tmp_path):
    path = write_csv(tmp_path / "m.csv", make_catalogue(tmp_path, n=60, bad_image=set(range(0, 60, 5))))
    loader = build_loader(path, toy_processor(), batch_size=10, num_workers=0, train=False, seed=0,
                          drop_last=False, max_bad_fraction=0.05)
    with pytest.raises(TooManyBadSamples, match=r"10 of 50 samples.*Top reasons: bad_image: 10.*'item000' in .*m\.csv:2"):
        for _ in loader.iterate(0):
            pass


def test_num_workers_zero_leaves_the_callers_random_state_alone(tmp_path):
    path = write_csv(tmp_path / "m.csv", make_catalogue(tmp_path, n=8))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    list(build_loader(path, toy_processor(), batch_size=4, num_workers=0, train=True, seed=0).iterate(0))
    assert torch.equal(torch.rand(3), expected)


def test_media_the_model_does_not_read_are_not_opened(tmp_path):
    path = write_csv(tmp_path / "m.csv", make_catalogue(tmp_path, n=6, bad_audio={2}))
    loader = build_loader(path, toy_processor(audio=False), batch_size=3, num_workers=0, train=False, seed=0,
                          drop_last=False)
    batches = list(loader.iterate(0))
    assert sum(len(b["ids"]) for b in batches) == 6 and loader.bad.total == 0
    assert all(not b["masks"]["audio"].any() for b in batches)
