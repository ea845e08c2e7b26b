"""Streaming shards: exactly-once epochs across ranks and workers, resampling, bad samples, resume.

Shards here are written by hand with ``tarfile`` (not by data_prep/shards.py), so the reader is
checked against an independent writer. Ranks are simulated by building one loader per rank.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter

import pytest
import torch

from align.data.bad_samples import TooManyBadSamples
from align.data.loader import build_loader
from align.data.shards import epoch_plan
from tests.test_manifest import assert_same_batches, batches_as_lists, image_bytes, toy_processor, wav_bytes


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder, shard_sizes, bad_image=(), bad_audio=(), empty_text=(), audio=True, sizes_json=True):
    """Shards of the given sizes; sample n is 'id{n:04d}'. Damaged ones are listed by number."""
    os.makedirs(folder, exist_ok=True)
    number, sizes = 0, {}
    for shard, size in enumerate(shard_sizes):
        name = f"shards-{shard:06d}.tar"
        with tarfile.open(os.path.join(folder, name), "w") as tar:
            for _ in range(size):
                key = f"s{number:06d}"
                image = image_bytes(number)
                if number in bad_image:
                    image = image[: len(image) // 2]
                add(tar, f"{key}.png", image)
                if audio:
                    add(tar, f"{key}.wav", b"RIFFjunk" * 8 if number in bad_audio else wav_bytes(number))
                meta = {"id": f"id{number:04d}", "text": "" if number in empty_text else f"item {number}",
                        "group": f"g{number % 5}", "negatives": [f"not {number}"]}
                add(tar, f"{key}.json", json.dumps(meta).encode())
                number += 1
        sizes[name] = size
    if sizes_json:
        with open(os.path.join(folder, "sizes.json"), "w") as f:
            json.dump(sizes, f)
    return os.path.join(folder, "shards-{%06d..%06d}.tar" % (0, len(shard_sizes) - 1)), number


UNEVEN = [5, 9, 3, 12, 7, 1, 8]  # 7 shards, 45 samples: nothing divides evenly


def rank_ids(spec, world_size, num_workers, epoch=0, **kwargs):
    ids, steps, sizes = [], [], []
    for rank in range(world_size):
        loader = build_loader(spec, toy_processor(), batch_size=4, num_workers=num_workers, train=True, seed=7,
                              rank=rank, world_size=world_size, shuffle_buffer=10, **kwargs)
        batches = list(loader.iterate(epoch))
        assert len(batches) == len(loader)
        steps.append(len(batches))
        sizes.append([len(b["ids"]) for b in batches])
        ids.append([i for b in batches for i in b["ids"]])
    return ids, steps, sizes


@pytest.mark.parametrize("num_workers", [0, 2])
def test_epoch_mode_sees_every_sample_exactly_once_with_equal_steps(tmp_path, num_workers):
    spec, total = write_shards(tmp_path, UNEVEN, audio=False)
    ids, steps, sizes = rank_ids(spec, world_size=2, num_workers=num_workers, drop_last=False)
    flat = [i for r in ids for i in r]
    assert sorted(flat) == [f"id{n:04d}" for n in range(total)]  # each once, none missing
    assert steps == [6, 6]  # ceil(45 / (2 * 4))
    assert all(0 < s <= 4 for r in sizes for s in r)


def test_three_ranks_two_workers_every_epoch(tmp_path):
    spec, total = write_shards(tmp_path, UNEVEN, audio=False)
    for epoch in (0, 1):
        ids, steps, _ = rank_ids(spec, world_size=3, num_workers=2, epoch=epoch, drop_last=False)
        assert sorted(i for r in ids for i in r) == [f"id{n:04d}" for n in range(total)]
        assert len(set(steps)) == 1


def test_epoch_mode_drop_last_gives_full_batches_and_no_repeats(tmp_path):
    spec, total = write_shards(tmp_path, UNEVEN, audio=False)
    ids, steps, sizes = rank_ids(spec, world_size=2, num_workers=2, drop_last=True)
    flat = [i for r in ids for i in r]
    assert steps == [5, 5] and all(s == 4 for r in sizes for s in r)
    assert len(flat) == len(set(flat)) == 40


def test_epoch_order_follows_seed_and_epoch(tmp_path):
    spec, _ = write_shards(tmp_path, UNEVEN, audio=False)
    first = rank_ids(spec, 1, 0, epoch=0, drop_last=False)[0]
    assert first == rank_ids(spec, 1, 0, epoch=0, drop_last=False)[0]
    assert first != rank_ids(spec, 1, 0, epoch=1, drop_last=False)[0]


def test_eval_mode_reads_in_file_order(tmp_path):
    spec, total = write_shards(tmp_path, UNEVEN, audio=False)
    loader = build_loader(spec, toy_processor(), batch_size=4, num_workers=0, train=False, seed=0, drop_last=False)
    ids = [i for b in loader.iterate(0) for i in b["ids"]]
    assert ids == [f"id{n:04d}" for n in range(total)]


def test_plan_covers_every_position_once_for_many_layouts():
    # brute-force reference: expand each plan to (shard, index) pairs and count them
    for sizes in ([5, 9, 3, 12, 7, 1, 8], [1], [0, 4, 0, 3], [10] * 3):
        for world in (1, 2, 3):
            for workers in (1, 2, 3):
                counts = Counter()
                steps = set()
                for rank in range(world):
                    plans = epoch_plan(sizes, seed=1, epoch=2, shuffle=True, rank=rank, world_size=world,
                                       num_workers=workers, batch_size=2, drop_last=False)
                    steps.add(sum(len(p.batch_sizes) for p in plans))
                    for plan in plans:
                        assert sum(hi - lo for _, lo, hi in plan.pieces) == sum(plan.batch_sizes)
                        counts.update((s, i) for s, lo, hi in plan.pieces for i in range(lo, hi))
                assert len(steps) == 1
                assert set(counts.values()) <= {1}
                assert sum(counts.values()) == sum(sizes)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_equals_uninterrupted_tail(tmp_path, num_workers):
    spec, _ = write_shards(tmp_path, UNEVEN)
    make = lambda: build_loader(spec, toy_processor(), batch_size=4, num_workers=num_workers, train=True, seed=3,
                                shuffle_buffer=8, drop_last=False)
    full = batches_as_lists(make().iterate(1))
    assert len(full) == 12
    for skip in (1, 5, 10):  # with 2 workers: resumes on either worker's turn
        assert_same_batches(full[skip:], batches_as_lists(make().iterate(1, skip_batches=skip)))


def test_resume_in_resampled_mode_on_a_second_rank(tmp_path):
    spec, _ = write_shards(tmp_path, UNEVEN, sizes_json=False)
    make = lambda: build_loader(spec, toy_processor(), batch_size=3, num_workers=2, train=True, seed=4, rank=1,
                                world_size=2, resampled=True, epoch_samples=60, shuffle_buffer=6)
    full = batches_as_lists(make().iterate(2))
    assert len(full) == 10
    assert_same_batches(full[3:], batches_as_lists(make().iterate(2, skip_batches=3)))


def test_resampled_mode_is_reproducible_and_seed_dependent(tmp_path):
    spec, _ = write_shards(tmp_path, UNEVEN, audio=False, sizes_json=False)  # resampling needs no sizes

    def run(seed, rank=0):
        loader = build_loader(spec, toy_processor(audio=False), batch_size=4, num_workers=2, train=True, seed=seed,
                              rank=rank, world_size=2, resampled=True, epoch_samples=64, shuffle_buffer=5)
        batches = list(loader.iterate(0))
        assert len(loader) == 8 and len(batches) == 8 and all(len(b["ids"]) == 4 for b in batches)
        return [i for b in batches for i in b["ids"]]

    assert run(1) == run(1)
    assert run(1) != run(2)
    assert run(1, rank=0) != run(1, rank=1)


def test_resampled_weights_pick_sources(tmp_path):
    spec_a, _ = write_shards(tmp_path / "a", [6, 6], audio=False, sizes_json=False)
    spec_b, _ = write_shards(tmp_path / "b", [6], audio=False, sizes_json=False)
    loader = build_loader(f"{spec_a}::{spec_b}", toy_processor(audio=False), batch_size=4, num_workers=0,
                          train=True, seed=0, resampled=True, epoch_samples=48, weights=[0.0, 1.0])
    ids = {i for b in loader.iterate(0) for i in b["ids"]}
    assert ids <= {f"id{n:04d}" for n in range(6)} and ids  # only source b (its own numbering)
    b_tar = os.path.join(tmp_path, "b", "shards-000000.tar")
    assert len({i for b in build_loader(f"pipe:cat {b_tar}", toy_processor(audio=False), batch_size=3,
                                        num_workers=0, train=False, seed=0, resampled=True,
                                        epoch_samples=6).iterate(0) for i in b["ids"]}) >= 1


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_samples_in_shards_are_counted_exactly(tmp_path, num_workers):
    bad = dict(bad_image={3, 40, 77}, bad_audio={10, 55}, empty_text={20, 21, 90})
    spec, total = write_shards(tmp_path, [30, 25, 20, 25], **bad)
    loader = build_loader(spec, toy_processor(), batch_size=8, num_workers=num_workers, train=True, seed=0,
                          world_size=1, drop_last=False, max_bad_fraction=0.2)
    batches = list(loader.iterate(0))
    ids = [i for b in batches for i in b["ids"]]
    assert len(batches) == len(loader) == 13
    assert len(ids) == total - 8 and len(set(ids)) == len(ids)
    assert not {f"id{n:04d}" for n in (3, 40, 77, 10, 55, 20, 21, 90)} & set(ids)
    assert loader.bad.counts == {"bad_image": 3, "bad_audio": 2, "empty_text": 3}
    assert loader.bad.seen == total and loader.bad.total == 8
    assert all("bad" not in b for b in batches)
    where = {e.sample_id: e.where for e in loader.bad.examples}
    assert "shards-000000.tar" in where["id0003"]


def test_missing_keys_and_bad_json_are_counted(tmp_path):
    os.makedirs(tmp_path, exist_ok=True)
    with tarfile.open(tmp_path / "shards-000000.tar", "w") as tar:
        add(tar, "a.json", json.dumps({"id": "a", "text": "fine"}).encode())
        add(tar, "b.cls", b"3")  # nothing we can read
        add(tar, "c.json", b"{not json")
        add(tar, "d.txt", b"caption only")
    json.dump({"shards-000000.tar": 4}, open(tmp_path / "sizes.json", "w"))
    loader = build_loader(str(tmp_path / "shards-000000.tar"), toy_processor(), batch_size=4, num_workers=0,
                          train=False, seed=0, drop_last=False, max_bad_fraction=1.0)
    batches = list(loader.iterate(0))
    assert batches[0]["ids"] == ["a", "d"] and batches[0]["texts"] == ["fine", "caption only"]
    assert loader.bad.counts == {"missing_keys": 1, "bad_json": 1}


def test_truncated_shard_is_counted_and_steps_stay_equal(tmp_path):
    spec, total = write_shards(tmp_path, [10, 10, 10], audio=False)
    path = os.path.join(tmp_path, "shards-000001.tar")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 5])  # cut mid-member: about 8 of its 10 samples lost
    loader = build_loader(spec, toy_processor(audio=False), batch_size=5, num_workers=0, train=False, seed=0,
                          drop_last=False, max_bad_fraction=0.5)
    batches = list(loader.iterate(0))
    assert len(batches) == len(loader) == 6
    ids = [i for b in batches for i in b["ids"]]
    assert ids[:10] == [f"id{n:04d}" for n in range(10)] and ids[-10:] == [f"id{n:04d}" for n in range(20, 30)]
    missing = loader.bad.counts["truncated_shard"]
    assert 6 <= missing <= 10 and len(ids) == 30 - missing and loader.bad.seen == 30
    assert any(len(b["ids"]) == 0 for b in batches)  # a whole batch lost: still a (empty) step


def test_too_many_bad_samples_raise_naming_reason_and_shard(tmp_path):
    spec, _ = write_shards(tmp_path, [40, 40], audio=False, bad_image=set(range(0, 80, 4)))
    loader = build_loader(spec, toy_processor(audio=False), batch_size=8, num_workers=0, train=False, seed=0,
                          max_bad_fraction=0.05)
    with pytest.raises(TooManyBadSamples, match=r"bad_image: 1[0-9].*shards-000000\.tar"):
        list(loader.iterate(0))


def test_epoch_mode_without_sizes_json_says_what_to_do(tmp_path):
    spec, _ = write_shards(tmp_path, [3, 3], audio=False, sizes_json=False)
    with pytest.raises(ValueError, match=r"sizes\.json.*resampled"):
        build_loader(spec, toy_processor(audio=False), batch_size=2, num_workers=0, train=True, seed=0)


def test_num_workers_zero_leaves_the_callers_random_state_alone(tmp_path):
    spec, _ = write_shards(tmp_path, [6], audio=False)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    list(build_loader(spec, toy_processor(audio=False), batch_size=3, num_workers=0, train=True, seed=0).iterate(0))
    assert torch.equal(torch.rand(3), expected)


def test_null_text_is_an_item_without_text_but_empty_text_is_bad(tmp_path):
    with tarfile.open(tmp_path / "shards-000000.tar", "w") as tar:
        add(tar, "a.png", image_bytes(0))
        add(tar, "a.json", json.dumps({"id": "a", "text": None}).encode())
        add(tar, "b.png", image_bytes(1))
        add(tar, "b.json", json.dumps({"id": "b", "text": "  "}).encode())
    json.dump({"shards-000000.tar": 2}, open(tmp_path / "sizes.json", "w"))
    loader = build_loader(str(tmp_path / "shards-000000.tar"), toy_processor(), batch_size=2, num_workers=0,
                          train=False, seed=0, drop_last=False, max_bad_fraction=1.0)
    (batch,) = list(loader.iterate(0))
    assert batch["ids"] == ["a"] and batch["masks"]["text"].tolist() == [False]
    assert batch["masks"]["image"].tolist() == [True] and loader.bad.counts == {"empty_text": 1}


def test_shards_written_by_prep_read_back_exactly(tmp_path):
    from data_prep.shards import write_shards as prep_shards
    from tests.test_manifest import make_catalogue, write_csv

    rows = make_catalogue(tmp_path / "cat", n=12, missing={5})
    manifest = write_csv(tmp_path / "cat" / "m.csv", rows)
    prep_shards(manifest, str(tmp_path / "out"), samples_per_shard=5, workers=1, sample_rate=8000,
                clip_seconds=0.05)
    loader = build_loader(str(tmp_path / "out" / "shards-{000000..000002}.tar"), toy_processor(), batch_size=4,
                          num_workers=2, train=True, seed=0, world_size=1, drop_last=False)
    batches = list(loader.iterate(0))
    assert sorted(i for b in batches for i in b["ids"]) == sorted(r["id"] for i, r in enumerate(rows) if i != 5)
    assert loader.bad.total == 0 and all(b["inputs"]["audio"].shape[1] == 100 for b in batches)
