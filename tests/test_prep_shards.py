"""`align prep shards`: stats for bad rows, readable shards, resume byte-identical, safe re-runs."""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import pytest

from align.data.loader import build_loader
from data_prep.shards import main, write_shards
from tests.test_manifest import make_catalogue, toy_processor, write_csv


def digests(folder):
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder)) if name.endswith(".tar")}


def test_stats_report_missing_and_corrupt_rows_and_shards_read_back(tmp_path):
    rows = make_catalogue(tmp_path / "cat", n=23, missing={4}, bad_image={9}, bad_audio={15})
    manifest = write_csv(tmp_path / "cat" / "m.csv", rows)
    out = tmp_path / "shards"
    stats = write_shards(manifest, str(out), samples_per_shard=5, image_format="png", sample_rate=8000,
                         clip_seconds=0.02, workers=2, seed=1)
    on_disk = json.load(open(out / "stats.json"))
    assert on_disk["written"] == stats["written"] == 20 and on_disk["shards"] == 5
    assert on_disk["skipped_by_reason"] == {"missing_file": 1, "bad_image": 1, "bad_audio": 1}
    by_id = {s["id"]: s for s in on_disk["skipped_rows"]}
    assert by_id["item004"]["reason"] == "missing_file" and by_id["item004"]["row"].endswith("m.csv:6")
    assert "4.png" in by_id["item004"]["detail"]
    assert on_disk["written_per_modality"] == {"text": 20, "image": 20, "audio": 20}
    assert on_disk["bytes"]["image"] > 0 and on_disk["bytes"]["audio"] > 0
    sizes = json.load(open(out / "sizes.json"))
    assert sorted(sizes) == [f"shards-{i:06d}.tar" for i in range(5)] and sum(sizes.values()) == 20
    with tarfile.open(out / "shards-000000.tar") as tar:
        members = tar.getmembers()
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in members)
        names = [m.name for m in members]
        assert names[:4] == sorted(names[:4], key=lambda n: ("json", "txt", "png", "flac").index(n.split(".")[1]))
    # the reader (an independent code path) sees exactly the written items, each once
    loader = build_loader(str(out / "shards-{000000..000004}.tar"), toy_processor(audio=False), batch_size=4,
                          num_workers=0, train=False, seed=0, drop_last=False)
    ids = [i for b in loader.iterate(0) for i in b["ids"]]
    expected = {r["id"] for i, r in enumerate(rows) if i not in (4, 9, 15)}
    assert sorted(ids) == sorted(expected) and loader.bad.total == 0
    texts = {i: t for b in loader.iterate(0) for i, t in zip(b["ids"], b["texts"])}
    assert texts["item003"] == "title 3. description 3"


def test_interrupted_job_resumes_byte_identical(tmp_path):
    rows = make_catalogue(tmp_path / "cat", n=26, missing={2})
    manifest = write_csv(tmp_path / "cat" / "m.csv", rows)
    options = dict(samples_per_shard=4, image_format="jpg", quality=80, sample_rate=16000, clip_seconds=0.02,
                   workers=2, seed=5)
    reference = tmp_path / "reference"
    write_shards(manifest, str(reference), **options)
    resumed = tmp_path / "resumed"
    partial = write_shards(manifest, str(resumed), max_shards=3, **options)
    assert partial["complete"] is False and not (resumed / "stats.json").exists()
    with open(resumed / "shards-000005.tar.tmp", "wb") as f:  # a shard cut off mid-write
        f.write(b"\0" * 1000)
    before = {n: os.path.getmtime(resumed / n) for n in digests(resumed)}
    stats = write_shards(manifest, str(resumed), **options)
    assert stats["shards_written_this_run"] == 7 - 3
    assert digests(resumed) == digests(reference) and len(digests(reference)) == 7
    assert all(os.path.getmtime(resumed / n) == t for n, t in before.items())  # complete ones untouched
    assert json.load(open(resumed / "sizes.json")) == json.load(open(reference / "sizes.json"))
    assert not [n for n in os.listdir(resumed) if n.endswith(".tmp")]
    again = write_shards(manifest, str(resumed), **options)  # a re-run only re-summarises
    assert again["shards_written_this_run"] == 0 and again["skipped_by_reason"] == {"missing_file": 1}


def test_other_options_in_the_same_folder_are_refused(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", make_catalogue(tmp_path, n=4))
    write_shards(manifest, str(tmp_path / "out"), samples_per_shard=2, workers=1, clip_seconds=0.02)
    with pytest.raises(ValueError, match="samples_per_shard"):
        write_shards(manifest, str(tmp_path / "out"), samples_per_shard=3, workers=1, clip_seconds=0.02)


def test_main_takes_column_names(tmp_path, capsys):
    rows = [{"sku": f"s{i}", "name": f"lamp {i}", "pic": f"media/{i}.png"} for i in range(5)]
    make_catalogue(tmp_path, n=5)
    manifest = write_csv(tmp_path / "m.csv", rows)
    code = main([manifest, "--out", str(tmp_path / "out"), "--samples-per-shard", "2", "--workers", "1",
                 "--col-id", "sku", "--col-text", "name", "--col-image", "pic", "--image-max-side", "4",
                 "--image-format", "webp"])
    assert code == 0 and "5 samples in 3 shards" in capsys.readouterr().out
    with tarfile.open(tmp_path / "out" / "shards-000000.tar") as tar:
        webp = [m for m in tar.getmembers() if m.name.endswith(".webp")]
        meta = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
        from PIL import Image

        assert max(Image.open(tar.extractfile(webp[0])).size) == 4
    assert {m["id"] for m in meta} <= {f"s{i}" for i in range(5)} and meta[0]["text"].startswith("lamp")


def test_image_size_shrinks_the_shorter_side_to_the_models_input_and_never_enlarges(tmp_path):
    from PIL import Image

    from data_prep.shards import EncodeOptions, encode_image

    sizes = {"wide": (300, 120), "tall": (90, 400), "small": (40, 30), "long": (2000, 100)}
    for name, size in sizes.items():
        Image.new("RGB", size, (200, 30, 90)).save(tmp_path / f"{name}.png")

    def stored(name, **options):
        data, _ = encode_image(str(tmp_path / f"{name}.png"), EncodeOptions(image_format="png", **options))
        return Image.open(io.BytesIO(data)).size

    assert stored("wide", image_size=64) == (160, 64)  # shorter side 64, aspect kept
    assert stored("tall", image_size=64) == (64, 284)
    assert stored("small", image_size=64) == (40, 30)  # never enlarged
    assert stored("long", image_size=64, image_max_side=512) == (512, 26)  # the longer-side cap shrinks more
    assert stored("wide") == (300, 120)  # without --image-size only the longer side is capped

    manifest = write_csv(tmp_path / "m.csv", make_catalogue(tmp_path, n=4))
    out = str(tmp_path / "out")
    write_shards(manifest, out, samples_per_shard=2, workers=1, clip_seconds=0.02)
    with pytest.raises(ValueError, match="image_size"):  # another size in the same folder is another job
        write_shards(manifest, out, samples_per_shard=2, workers=1, clip_seconds=0.02, image_size=8)
    with pytest.raises(ValueError, match="--image-size"):
        write_shards(manifest, str(tmp_path / "bad"), workers=1, image_size=0)
