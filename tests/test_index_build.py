"""`align index` builds a FAISS index over `align embed` vectors: exact search equals a float64 brute
force; the recall@10 written for HNSW and IVF-PQ is the true recall of held-out queries (recomputed
here from scratch); items are added and removed without a rebuild; a save/load round trip keeps
every result; `where` filters return only matching items, k of them whenever k match; masked rows
never come back; damaged or mismatched files and bad arguments are refused with their name."""
import csv
import json
import os

import numpy as np
import pytest
import torch

from align.errors import ConfigError, RunError
from align.index import build as build_module
from align.index.build import (INDEX_FILE, INFO_FILE, IDS_FILE, METADATA_FILE, build_index, choose_index, load_index,
                               main, open_index)
from align.index.vectors import FORMAT as EMBED_FORMAT, ItemEmbeddings, save_item_embeddings
from tests.conftest import logit_error

DIM = 32
COUNT = 3000
BOUND = logit_error(DIM, 1.0)  # |float32 score - float64 score| of unit vectors of DIM entries
COLOURS = ("red", "green", "blue", "black")


def mixture(count, seed, clusters=40):
    """Unit vectors from a seeded mixture of clusters of different spreads, (count, DIM) float32."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, DIM))
    which = rng.integers(0, clusters, count)
    spread = rng.uniform(0.3, 1.0, clusters)[which][:, None]
    x = centres[which] + spread * rng.standard_normal((count, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def embeddings(count=COUNT, seed=0, masked=()):
    vectors = torch.from_numpy(mixture(count, seed))
    mask = torch.ones(count, dtype=torch.bool)
    mask[list(masked)] = False
    vectors[~mask] = 0
    ids = [f"sku{i:05d}" for i in range(count)]
    return ItemEmbeddings(ids, {"text": vectors.clone(), "fused": vectors}, {"text": mask.clone(), "fused": mask},
                          {"format": EMBED_FORMAT, "checkpoint": "/models/tiny", "dim": str(DIM), "modalities": "text",
                           "fusion": "mean"})


def catalogue_metadata(emb):
    """Colour cycles over four values; 'rare' is set on 12 items only."""
    meta = {item: {"colour": COLOURS[i % 4]} for i, item in enumerate(emb.ids)}
    for item in emb.ids[5:5 + 12 * 97:97]:
        meta[item]["tag"] = "rare"
    return meta


def brute_force(vectors, queries, k):
    """(scores, rows) of the float64 top k, best first."""
    scores = queries.astype(np.float64) @ vectors.astype(np.float64).T
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, rows, 1), rows, scores


@pytest.fixture(scope="module")
def emb():
    return embeddings(masked=range(0, COUNT, 50))  # 60 items lack the modality


@pytest.fixture(scope="module")
def indexes(emb):
    meta = catalogue_metadata(emb)
    return {kind: build_index(emb, kind, metadata=meta) for kind in ("exact", "hnsw", "ivfpq")}


def test_exact_equals_float64_brute_force(emb, indexes):
    index = indexes["exact"]
    queries = mixture(200, seed=7)
    rows = np.flatnonzero(emb.masks["fused"].numpy())
    vectors = emb.vectors["fused"].numpy()[rows]
    scores, ids = index.search(queries, 10)
    top, best, all_scores = brute_force(vectors, queries, 11)
    assert np.abs(scores - top[:, :10]).max() <= BOUND
    clear = top[:, 9] - top[:, 10] > 2 * BOUND  # no near-tie at the cut: the sets must be equal
    assert clear.mean() > 0.95
    for q in np.flatnonzero(clear):
        assert set(ids[q]) == {emb.ids[rows[r]] for r in best[q, :10]}
    # ranks agree wherever neighbouring float64 scores are further apart than rounding can move them
    for q in range(len(queries)):
        for r in range(9):
            if top[q, r] - top[q, r + 1] > 2 * BOUND:
                assert ids[q][r] == emb.ids[rows[best[q, r]]]
    assert index.recall10 == 1.0 and index.kind == "exact" and index.checkpoint == "/models/tiny"


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_written_recall_is_the_true_recall(emb, kind, monkeypatch):
    """Rebuild the index as it stood while measuring (the catalogue without the held-out items, one
    thread so that FAISS builds the same graph / k-means), search the recorded queries with the
    recorded parameter, and score them against a float64 brute force of our own."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    index = build_index(emb, kind, seed=3)
    info = index.info
    assert info["recall_sample"] == len(info["recall_queries"]) > 0
    assert set(info["recall_queries"]) <= set(info["recall_holdout"])
    held = set(info["recall_holdout"])
    present = emb.masks["fused"].numpy()
    rest = [r for r, item in enumerate(emb.ids) if present[r] and item not in held]
    replay = build_index(emb.select(rest), index.factory, seed=3, measure=False)
    replay.apply_search_params(info["search_params"])
    row_of = emb.row_of()
    queries = emb.vectors["fused"].numpy()[[row_of[i] for i in info["recall_queries"]]]
    _, found = replay.search(queries, 10)
    vectors = emb.vectors["fused"].numpy()[rest]
    top, best, all_scores = brute_force(vectors, queries, 10)
    hits = [len(set(f) & {emb.ids[rest[r]] for r in b}) for f, b in zip(found, best)]
    recall = np.mean(hits) / 10
    # FAISS's float32 truth may swap items whose float64 scores lie within rounding of the 10th
    swaps = sum(int(((s >= t[9] - 2 * BOUND) & (s < t[9])).sum()) for s, t in zip(all_scores, top))
    assert abs(recall - info["recall10"]) <= swaps / (10 * len(queries)) + 5e-5  # written rounded to 4 places
    assert 0 < info["recall10"] <= 1 and len(index) == int(present.sum())


def test_auto_rule():
    assert choose_index(20_000, 256)[0] == "Flat"
    assert choose_index(1_000_000, 256)[0] == "HNSW32,Flat"
    assert choose_index(5_000_000, 256)[0] == "IVF8192,Flat"
    assert choose_index(1_000_000, 256, memory_mb=600)[0] == "IVF4096,SQ8"
    assert choose_index(1_000_000, 256, memory_mb=150)[0] == "IVF4096,PQ64x8np"
    with pytest.raises(ConfigError, match="memory-mb"):
        choose_index(1_000_000, 256, memory_mb=10)


@pytest.mark.parametrize("kind", ["exact", "hnsw", "ivfpq"])
def test_add_and_remove_without_rebuild(emb, kind):
    index = build_index(emb, kind, measure=False)
    stored = index._index
    before = len(index)
    fresh = mixture(3, seed=99)
    index.add(fresh, ["new-a", "new-b", "new-c"], {"new-a": {"colour": "red"}})
    assert len(index) == before + 3 and index._index is stored
    _, ids = index.search(fresh, 1 if kind == "exact" else 10)  # PQ scores approximate: somewhere in the top 10
    assert all(item in row for item, row in zip(["new-a", "new-b", "new-c"], ids))
    assert index.metadata_of("new-a") == {"colour": "red"}
    gone = ["new-b"] + emb.ids[1:40]
    row_of = emb.row_of()
    probe = np.concatenate([fresh[1:2], emb.vectors["fused"].numpy()[[row_of[i] for i in emb.ids[1:40]]]])
    index.remove(gone)
    assert len(index) == before + 3 - len(gone) and index._index is stored
    _, ids = index.search(probe, 10)
    assert all(len(row) == 10 for row in ids)
    assert not set(gone) & {item for row in ids for item in row}
    index.add(fresh[2:3] * -1, ["new-c"])  # an id already present: its vector is replaced
    _, ids = index.search(fresh[2:3], 10)
    assert "new-c" not in ids[0] and len(index) == before + 3 - len(gone)
    with pytest.raises(KeyError, match="nope"):
        index.remove(["nope"])


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_save_load_round_trip(emb, indexes, kind, tmp_path):
    index = indexes[kind]
    index.remove(emb.ids[101:110])  # tombstones for HNSW, deletions for IVF
    index.save(tmp_path)
    loaded = load_index(str(tmp_path))
    queries = mixture(50, seed=5)
    for where in (None, {"colour": "blue"}, {"tag": "rare"}):
        a_scores, a_ids = index.search(queries, 10, where=where)
        b_scores, b_ids = loaded.search(queries, 10, where=where)
        assert a_ids == b_ids and np.array_equal(a_scores, b_scores)
    assert len(loaded) == len(index) and loaded.info["search_params"] == index.info["search_params"]
    assert loaded.recall10 == index.recall10 and loaded.factory == index.factory and loaded.modality == "fused"
    assert loaded.metadata_of(emb.ids[1]) == {"colour": COLOURS[1]}
    stored = json.loads((tmp_path / INFO_FILE).read_text())
    assert stored["format"] == "align-index/1" and stored["tombstones"] == loaded.tombstones


@pytest.mark.parametrize("kind", ["exact", "hnsw", "ivfpq"])
def test_where_returns_only_matches_and_k_of_them(emb, indexes, kind):
    index = indexes[kind]
    queries = mixture(40, seed=11)
    live = set(index.ids)
    for where in ({"colour": "green"}, {"tag": "rare"}, {"colour": "green", "tag": "rare"}, {"colour": "none"}):
        matching = {i for i in live if all(index.metadata_of(i).get(f) == v for f, v in where.items())}
        scores, ids = index.search(queries, 10, where=where)
        for row, row_scores in zip(ids, scores):
            assert set(row) <= matching and len(set(row)) == len(row)
            assert len(row) == min(10, len(matching))
            assert np.all(np.isneginf(row_scores[len(row):]))
            assert np.all(np.diff(row_scores[:len(row)]) <= 0)
    with pytest.raises(ValueError, match="no field 'size'"):
        index.search(queries, 5, where={"size": "L"})


def test_filtered_exact_search_is_exact(emb, indexes):
    """The matching items' exact top k (float64) come back, for a broad and a selective filter."""
    index = indexes["exact"]
    queries = mixture(30, seed=13)
    present = emb.masks["fused"].numpy()
    for where in ({"colour": "blue"}, {"tag": "rare"}):
        rows = [r for r, item in enumerate(emb.ids) if present[r] and item in set(index.ids)
                and all(index.metadata_of(item).get(f) == v for f, v in where.items())]
        top, best, _ = brute_force(emb.vectors["fused"].numpy()[rows], queries, 10)
        scores, ids = index.search(queries, 10, where=where)
        assert np.abs(scores[:, :top.shape[1]] - top).max() <= BOUND
        for q in range(len(queries)):
            if top.shape[1] < 10 or top[q, 9] - top[q, min(10, top.shape[1] - 1)] > 2 * BOUND:
                assert set(ids[q]) == {emb.ids[rows[r]] for r in best[q]}


def test_masked_rows_never_returned(emb, indexes):
    masked = {item for item, has in zip(emb.ids, emb.masks["fused"].tolist()) if not has}
    queries = np.concatenate([mixture(20, seed=17), np.eye(DIM, dtype=np.float32)])
    for index in indexes.values():
        assert not masked & set(index.ids)
        _, ids = index.search(queries, 50)
        assert not masked & {item for row in ids for item in row}


def built_folder(tmp_path, kind="hnsw"):
    folder = tmp_path / "index"
    build_index(embeddings(600), kind, metadata=catalogue_metadata(embeddings(600))).save(str(folder))
    return folder


@pytest.mark.parametrize("damage", ["truncate", "flip", "missing", "other_build_ids", "garbage_info"])
def test_damaged_files_are_refused_by_name(tmp_path, damage):
    folder = built_folder(tmp_path)
    if damage == "truncate":
        target = folder / INDEX_FILE
        target.write_bytes(target.read_bytes()[:1000])
    elif damage == "flip":  # FAISS itself would read this file without noticing
        target = folder / INDEX_FILE
        raw = bytearray(target.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        target.write_bytes(bytes(raw))
    elif damage == "missing":
        target = folder / METADATA_FILE
        target.unlink()
    elif damage == "other_build_ids":
        other = tmp_path / "other"
        build_index(embeddings(500, seed=1), "exact").save(str(other))
        target = folder / IDS_FILE
        target.write_bytes((other / IDS_FILE).read_bytes())
    else:
        target = folder / INFO_FILE
        target.write_bytes(b"\x80\x04 not json")
    with pytest.raises(RunError, match=str(target).replace("\\", "\\\\")):
        load_index(str(folder))


def test_unreadable_faiss_file_is_a_clean_error(tmp_path):
    """Even a file whose checksum is in index.json (written by hand) gives a RunError, not a crash."""
    folder = built_folder(tmp_path, "exact")
    (folder / INDEX_FILE).write_bytes(b"IxF2" + bytes(range(256)) * 4)
    info = json.loads((folder / INFO_FILE).read_text())
    info["files"][INDEX_FILE] = build_module._file_record(str(folder / INDEX_FILE))
    (folder / INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(RunError, match=f"{INDEX_FILE}: FAISS cannot read it"):
        load_index(str(folder))


def embed_folder(tmp_path, count=800):
    folder = tmp_path / "items"
    save_item_embeddings(embeddings(count, masked=[3, 4]), str(folder))
    return folder


def test_open_index_on_an_embed_folder(tmp_path):
    folder = embed_folder(tmp_path)
    index = open_index(str(folder))
    emb = embeddings(800, masked=[3, 4])
    assert index.kind == "exact" and len(index) == 798 and index.checkpoint == "/models/tiny"
    queries = mixture(20, seed=21)
    rows = [r for r in range(800) if r not in (3, 4)]
    top, best, _ = brute_force(emb.vectors["fused"].numpy()[rows], queries, 5)
    scores, ids = index.search(torch.from_numpy(queries), 5)
    assert np.abs(scores - top).max() <= BOUND
    assert [row[0] for row in ids] == [emb.ids[rows[b[0]]] for b in best]
    with pytest.raises(RunError, match="neither"):
        open_index(str(tmp_path))


def write_catalogue(path, ids, extra_column=True):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "title", "colour"] + (["size"] if extra_column else []))
        for i, item in enumerate(ids):
            writer.writerow([item, f"thing {i}", COLOURS[i % 4]] + ([["S", "M", ""][i % 3]] if extra_column else []))
    return str(path)


def test_command_builds_prints_and_filters(tmp_path, capsys):
    folder = embed_folder(tmp_path)
    ids = embeddings(800).ids
    manifest = write_catalogue(tmp_path / "catalogue.csv", ids)
    out = tmp_path / "index"
    assert main(["--embeddings", str(folder), "--out", str(out), "--kind", "IVF16,Flat", "--metadata", manifest,
                 "--fields", "colour,size"]) == 0
    printed = capsys.readouterr().out
    assert "recall@10" in printed and "IVF16,Flat" in printed and "MB on disk" in printed
    info = json.loads((out / INFO_FILE).read_text())
    assert info["count"] == 798 and info["dim"] == DIM and info["metric"] == "inner_product"
    assert info["embeddings"] == os.path.abspath(folder) and "nprobe" in info["search_params"]
    index = open_index(str(out))
    assert index.info["search_params"] == info["search_params"]
    assert index.metadata_of(ids[2]) == {"colour": "blue"}  # the empty size cell is left out
    _, found = index.search(mixture(5, seed=2), 10, where={"colour": "red", "size": "M"})
    assert all(len(row) == 10 and all(index.metadata_of(i) == {"colour": "red", "size": "M"} for i in row)
               for row in found)


@pytest.mark.parametrize("args, message", [
    (["--embeddings", "{tmp}/nowhere"], "no embeddings.safetensors"),
    (["--modality", "audio"], "--modality 'audio'"),
    (["--kind", "IVF16,Bogus"], "not a FAISS factory string"),
    (["--kind", "PQ7"], "not a FAISS factory string"),
    (["--memory-mb", "0"], "--memory-mb"),
    (["--metadata", "{tmp}/catalogue.csv", "--fields", "colour,weight"], "catalogue.csv has no column 'weight'"),
    (["--metadata", "{tmp}/absent.csv"], "absent.csv: no such file"),
    (["--out", "{tmp}/items"], "holds item vectors"),  # its ids.json is the vectors'
])
def test_bad_arguments_are_config_errors_before_work(tmp_path, args, message, monkeypatch):
    folder = embed_folder(tmp_path, 100)
    write_catalogue(tmp_path / "catalogue.csv", embeddings(100).ids)
    monkeypatch.setattr(build_module, "load_item_embeddings", lambda _: pytest.fail("read the vectors first"))
    argv = ["--embeddings", str(folder), "--out", str(tmp_path / "index")]
    argv += [a.replace("{tmp}", str(tmp_path)) for a in args]
    with pytest.raises(ConfigError, match=message):
        main(argv)
    assert not (tmp_path / "index").exists()


def test_bad_factory_string_in_the_library_is_a_config_error(emb):
    with pytest.raises(ConfigError, match="not a FAISS factory string"):
        build_index(emb, "HNSW,Flatt")
