"""`align embed` in shards: the merged parts are the one-pass vectors bit for bit (a sample meets the
same batch-mates however the catalogue is cut), whether the shards run in one process, in two
processes under `accelerate launch`, as separate `--part i/n` jobs, or across an interruption, after
which the shards already written are not embedded again; parts of other inputs (another device type
or torch included) are refused; merged parts are fused as their plan says."""
import os

import pytest
import torch

from align.errors import ConfigError, RunError
from align.index import embed as embed_module
from align.index.embed import PARTS, PLAN_FILE, check_plan, embedding_plan, main, read_catalogue, start_plan
from align.index.vectors import EMBEDDED_AT, load_item_embeddings
from tests.conftest import REPO, launch_two_processes, one_step_checkpoint
from tests.test_index import read_rows, write_rows

CLI = os.path.join(REPO, "align", "cli.py")
# Exact comparisons of runs on the same kernels, and refusals: CI runs them once.
pytestmark = pytest.mark.once


@pytest.fixture(scope="module")
def checkpoint(small_demo, tmp_path_factory):
    return one_step_checkpoint(small_demo, tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def catalogue(small_demo):
    """Two manifests beside the demo's media (ids unique over both); one item's image is missing."""
    train_rows = read_rows(os.path.join(small_demo, "train.csv"))
    test_rows = read_rows(os.path.join(small_demo, "test.csv"))
    test_rows[5] = {**test_rows[5], "image": "gone.png"}
    return [write_rows(train_rows[:70], os.path.join(small_demo, "sharded-a.csv")),
            write_rows(test_rows, os.path.join(small_demo, "sharded-b.csv"))], test_rows[5]["id"]


def embed(checkpoint, out, manifests, *extra):
    return main(["--checkpoint", checkpoint, "--manifest", *map(str, manifests), "--out", str(out),
                 "--device", "cpu", "--batch-size", "16", *map(str, extra)])


def assert_identical(a, b):
    # When each run started (embedded_at) differs between runs; everything else must not.
    def settings(emb):
        return {key: value for key, value in emb.metadata.items() if key != EMBEDDED_AT}

    assert a.ids == b.ids and settings(a) == settings(b) and set(a.vectors) == set(b.vectors)
    for name in a.vectors:
        assert torch.equal(a.masks[name], b.masks[name]), name
        assert torch.equal(a.vectors[name], b.vectors[name]), name  # bit for bit, not close


def test_shards_merge_into_the_one_pass_vectors_bit_for_bit(checkpoint, catalogue, tmp_path, capsys):
    manifests, lost = catalogue
    assert embed(checkpoint, tmp_path / "one", manifests) == 0
    one = load_item_embeddings(str(tmp_path / "one"))
    assert not os.path.exists(tmp_path / "one" / PARTS)  # the parts are merged and removed
    rows = sum(len(read_rows(m)) for m in manifests)
    assert len(one.ids) == rows and not one.masks["image"][one.row_of()[lost]]
    for shards in (3, 7):
        capsys.readouterr()
        assert embed(checkpoint, tmp_path / f"s{shards}", manifests, "--shards", shards, "--keep-parts") == 0
        out = capsys.readouterr().out
        assert_identical(load_item_embeddings(str(tmp_path / f"s{shards}")), one)
        kept = sorted(os.listdir(tmp_path / f"s{shards}" / PARTS))
        assert kept == sorted([PLAN_FILE] + [f"part-{j:05d}-of-{shards:05d}.{ext}" for j in range(shards)
                                             for ext in ("json", "safetensors")])
        # The shard holding the missing image reports it, by id, as the one-pass run does.
        assert f"image (1): {lost!r}" in out and "missing_file" in out


def test_an_interrupted_run_resumes_without_embedding_the_done_shards_again(checkpoint, catalogue, tmp_path,
                                                                           monkeypatch):
    manifests, _ = catalogue
    assert embed(checkpoint, tmp_path / "whole", manifests, "--shards", 5) == 0
    calls = []
    real = embed_module.embed_batches

    def interrupted(*args, **kwargs):  # killed while embedding the third shard
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(embed_module, "embed_batches", interrupted)
    with pytest.raises(KeyboardInterrupt):
        embed(checkpoint, tmp_path / "items", manifests, "--shards", 5)
    parts = tmp_path / "items" / PARTS
    written = {name: os.stat(parts / name).st_mtime_ns for name in os.listdir(parts) if name.startswith("part-")}
    assert sorted(written) == ["part-00000-of-00005.json", "part-00000-of-00005.safetensors",
                               "part-00001-of-00005.json", "part-00001-of-00005.safetensors"]
    assert not os.path.exists(tmp_path / "items" / "embeddings.safetensors")

    calls.clear()
    monkeypatch.setattr(embed_module, "embed_batches", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    assert embed(checkpoint, tmp_path / "items", manifests, "--keep-parts") == 0  # the plan's 5 shards
    assert len(calls) == 3  # shards 2, 3 and 4 only
    for name, stamp in written.items():  # the parts of before the interruption were not written again
        assert os.stat(parts / name).st_mtime_ns == stamp
    assert_identical(load_item_embeddings(str(tmp_path / "items")), load_item_embeddings(str(tmp_path / "whole")))


def test_part_jobs_then_their_merge_equal_one_run(checkpoint, catalogue, tmp_path, capsys):
    manifests, _ = catalogue
    assert embed(checkpoint, tmp_path / "whole", manifests, "--shards", 4) == 0
    out = tmp_path / "jobs"
    assert embed(checkpoint, out, manifests, "--shards", 4, "--part", "1/2") == 0
    assert "2 of 4 shards still to embed" in capsys.readouterr().out
    assert sorted(n for n in os.listdir(out / PARTS) if n.endswith(".json") and n != PLAN_FILE) == [
        "part-00001-of-00004.json", "part-00003-of-00004.json"]  # j % 2 == 1
    with pytest.raises(RunError, match=r"shards \[0, 2\] of 4 are not embedded"):
        embed(checkpoint, out, manifests, "--merge-only")
    # A merging job killed midway left its lock file; the lock died with it, so the last job merges.
    (out / PARTS / "merge.lock").touch()
    assert embed(checkpoint, out, manifests, "--part", "0/2", "--keep-parts") == 0  # the last job merges
    assert_identical(load_item_embeddings(str(out)), load_item_embeddings(str(tmp_path / "whole")))
    # --merge-only merges kept parts again, embedding nothing
    os.remove(out / "embeddings.safetensors")
    assert embed(checkpoint, out, manifests, "--merge-only") == 0
    assert_identical(load_item_embeddings(str(out)), load_item_embeddings(str(tmp_path / "whole")))
    assert not os.path.exists(out / PARTS)


def test_parts_of_changed_inputs_are_refused_unless_restarted(checkpoint, catalogue, small_demo, tmp_path):
    manifests, _ = catalogue
    rows = read_rows(manifests[1])
    changing = write_rows(rows[:20], os.path.join(small_demo, "changing.csv"))
    assert embed(checkpoint, tmp_path / "items", [changing], "--shards", 2, "--keep-parts") == 0
    write_rows(rows[:25], changing)  # five new items
    with pytest.raises(ConfigError, match=r"changing\.csv is new or changed.*--restart"):
        embed(checkpoint, tmp_path / "items", [changing])
    with pytest.raises(ConfigError, match="batch_size was 16, now 8"):
        main(["--checkpoint", checkpoint, "--manifest", manifests[1], "--out", str(tmp_path / "items"),
              "--device", "cpu", "--batch-size", "8"])
    assert embed(checkpoint, tmp_path / "items", [changing], "--restart") == 0
    assert load_item_embeddings(str(tmp_path / "items")).ids == [r["id"] for r in rows[:25]]


def test_merge_only_fuses_as_the_plan_says_and_refuses_other_weights(checkpoint, catalogue, tmp_path):
    manifests, _ = catalogue
    weighted = ("--fusion-weights", "text=1,image=2,audio=0")
    assert embed(checkpoint, tmp_path / "whole", manifests, *weighted) == 0
    out = tmp_path / "parts"
    assert embed(checkpoint, out, manifests, *weighted, "--shards", 2, "--keep-parts") == 0
    os.remove(out / "embeddings.safetensors")
    # Without --fusion-weights the parts are fused with the plan's weights, which the folder records.
    assert embed(checkpoint, out, manifests, "--merge-only", "--keep-parts") == 0
    merged = load_item_embeddings(str(out))
    assert merged.metadata["fusion_weights"] == "audio=0,image=2,text=1"
    assert_identical(merged, load_item_embeddings(str(tmp_path / "whole")))
    # Other weights would make a folder that says one fusion and holds another.
    os.remove(out / "embeddings.safetensors")
    with pytest.raises(ConfigError, match=r"--fusion-weights audio=0,image=5,text=1: .*planned with "
                                          r"audio=0,image=2,text=1"):
        embed(checkpoint, out, manifests, "--merge-only", "--fusion-weights", "text=1,image=5,audio=0")
    assert not os.path.exists(out / "embeddings.safetensors")


def test_parts_of_another_device_type_or_torch_are_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for name in ("model.safetensors", "config.yaml"):
        (model / name).write_text(name)
    manifest = write_rows([{"id": "a", "text": "x"}], tmp_path / "m.csv")
    catalogue = read_catalogue([manifest], ["text"], 2, lambda _: [{"id": "a", "_where": "m.csv:2", "text": "x"}])
    metadata = {"dim": "4", "modalities": "text", "fusion": "mean", "batch_size": "2", "device": "cpu",
                "torch": "2.4.0"}
    parts = str(tmp_path / PARTS)
    start_plan(parts, embedding_plan(catalogue, str(model), metadata, 1), restart=False)
    check_plan(parts, embedding_plan(catalogue, str(model), metadata, 1), restart=False)  # the same: resumed
    for key, value in (("device", "cuda"), ("torch", "2.5.0")):
        changed = embedding_plan(catalogue, str(model), {**metadata, key: value}, 1)
        with pytest.raises(ConfigError, match=f"{key} was '{metadata[key]}', now '{value}'"):
            check_plan(parts, changed, restart=False)


@pytest.mark.multiprocess
def test_two_processes_embed_the_vectors_of_one(checkpoint, catalogue, tmp_path):
    manifests, _ = catalogue
    launched = launch_two_processes(CLI, "embed", "--checkpoint", checkpoint, "--manifest", *manifests,
                                    "--out", tmp_path / "two", "--device", "cpu", "--batch-size", 16, "--shards", 4,
                                    "--keep-parts", timeout=240)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "[rank 0] shard 1/4" in launched.stdout and "[rank 1] shard 2/4" in launched.stdout
    # The launched ranks compute with one thread each (OMP_NUM_THREADS=1); float32 kernels may sum in
    # another order on more threads, so the one-process reference runs on one thread too.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert embed(checkpoint, tmp_path / "one", manifests, "--shards", 4) == 0
    finally:
        torch.set_num_threads(threads)
    assert_identical(load_item_embeddings(str(tmp_path / "two")), load_item_embeddings(str(tmp_path / "one")))
