"""`QueryEncoder` turns texts, photos and sounds (paths or bytes) into the vectors the model gives the
same preprocessed input; `align search` finds the items whose text is the query first, agrees with
exact search over the catalogue's fused vectors, prints JSON, and refuses bad arguments with exit 2."""
import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch
import yaml

from align.errors import ConfigError
from align.index.embed import main as embed_main
from align.index.search import QueryEncoder, QueryError
from align.index.vectors import ItemEmbeddings, load_item_embeddings, save_item_embeddings
from align.search.command import main
from tests.conftest import EPS32, one_step_checkpoint
from tests.test_index import read_rows as rows_of

# Bound on |a - b| per entry for two float32 forwards of the same input whose batches differ in size
# (or whose buffers differ in alignment): they run the same operations, but the matrix kernels may
# sum in another order. The tiny towers (configs/models/tiny-clip.json, the audio tower of
# tiny_overrides) are at most 13 contractions deep (2 blocks x qkv, scores, values, out, fc1, fc2,
# plus the projection), each a sum of at most 192 terms (the 3x8x8 patch); two orders of one sum
# differ by at most 2 * 191 * eps of its absolute terms (Higham, Accuracy and Stability, 3.1), so
# 13 * 2 * 192 * eps ~ 3e-4 with unit-sized activations; the layer norms' gain is allowed a factor
# 3. Rows encoded for another query differ by far more: each test checks its queries' vectors are
# at least 10x this bound apart, so a row handed to the wrong query cannot pass.
ROW_BOUND = 3 * 13 * 2 * 192 * EPS32


@pytest.fixture(scope="module")
def checkpoint(small_demo, tmp_path_factory):
    """A text-image-audio model trained for one step on the demo catalogue, saved as training saves it."""
    return one_step_checkpoint(small_demo, tmp_path_factory.mktemp("run"))


def embed(checkpoint, out, *manifests):
    assert embed_main(["--checkpoint", checkpoint, "--manifest", *map(str, manifests), "--out", str(out),
                       "--device", "cpu", "--batch-size", "16"]) == 0
    return str(out)


@pytest.fixture(scope="module")
def items(checkpoint, small_demo, tmp_path_factory):
    """`align embed` of the small demo's test catalogue (40 items, all modalities)."""
    return embed(checkpoint, tmp_path_factory.mktemp("items") / "items", os.path.join(small_demo, "test.csv"))


@pytest.fixture(scope="module")
def text_items(checkpoint, small_demo, tmp_path_factory):
    """The same 40 items embedded from their titles only: their fused vectors are their text vectors."""
    folder = tmp_path_factory.mktemp("text_items")
    rows = [{**row, "image": "", "audio": ""} for row in rows_of(os.path.join(small_demo, "test.csv"))]
    manifest = folder / "titles.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return embed(checkpoint, folder / "items", manifest)


def assert_apart(vectors, bound=10 * ROW_BOUND):
    """Each pair of rows differs by more than ``bound`` in some entry (so a swap is visible)."""
    gaps = (vectors[:, None] - vectors[None]).abs().amax(-1) + torch.eye(len(vectors)) * 1e9
    assert gaps.min() > bound


def reference(checkpoint, small_demo, modality, row_ids):
    """model.encode on one batch of the rows' media, read and preprocessed as the catalogue's are."""
    from align.data.manifest import load_raw, read_manifest
    from align.data.sample import collate
    from align.loading import load_model

    model = load_model(checkpoint)
    manifest = os.path.join(small_demo, "test.csv")
    rows = {row["id"]: row for row in read_manifest(manifest)}
    prepare = model.preprocessors(train=False)
    values = [prepare[modality](load_raw(rows[i], small_demo, [modality])[modality]) for i in row_ids]
    batch = collate([{"id": i, modality: v} for i, v in zip(row_ids, values)])["inputs"][modality]
    with torch.no_grad():
        return model.encode(modality, batch)  # (Q, D)


def test_query_vectors_are_the_models_vectors_of_the_same_preprocessed_input(checkpoint, small_demo):
    encoder = QueryEncoder(checkpoint, "cpu")
    rows = rows_of(os.path.join(small_demo, "test.csv"))
    texts = sorted({r["title"] for r in rows})[:4]
    got = encoder.encode("text", texts)  # one forward
    tokens = torch.stack([encoder.model.preprocessors(train=False)["text"](t) for t in texts])
    with torch.no_grad():
        expected = encoder.model.encode("text", tokens)
    assert_apart(expected)
    assert got.shape == (4, encoder.dim) and got.dtype == torch.float32
    assert (got - expected).abs().max() <= ROW_BOUND
    assert (got.norm(dim=1) - 1).abs().max() < 1e-5
    for modality in ("image", "audio"):
        picked = [r for r in rows if r[modality]][:3]
        paths = [os.path.join(small_demo, r[modality]) for r in picked]
        as_bytes = [open(p, "rb").read() for p in paths]
        expected = reference(checkpoint, small_demo, modality, [r["id"] for r in picked])
        assert_apart(expected)
        for sources in (paths, as_bytes):  # an uploaded file is the catalogue's file
            assert (encoder.encode(modality, sources) - expected).abs().max() <= ROW_BOUND, modality


def test_unreadable_queries_are_errors_naming_the_input(checkpoint, small_demo):
    encoder = QueryEncoder(checkpoint, "cpu")
    with pytest.raises(QueryError, match="holiday.jpg: cannot be read as image"):
        encoder.encode("image", [b"\x89PNG\r\n\x1a\n not really"], names=["holiday.jpg"])
    png = open(os.path.join(small_demo, rows_of(os.path.join(small_demo, "test.csv"))[0]["image"]), "rb").read()
    with pytest.raises(QueryError, match="cut.png: cannot be read as image"):
        encoder.encode("image", [png[: len(png) // 2]], names=["cut.png"])  # truncated
    with pytest.raises(QueryError, match="noise.wav: cannot be read as audio"):
        encoder.encode("audio", [b"RIFF....WAVEfmt garbage"], names=["noise.wav"])
    with pytest.raises(QueryError, match="empty"):
        encoder.encode("text", ["   "])
    with pytest.raises(QueryError, match="no such file"):
        encoder.encode("image", [os.path.join(small_demo, "nope.png")])


def table_ids(output):
    """(ids, scores) from the table `align search` prints (header line first)."""
    lines = output.strip().splitlines()
    assert lines[0].split()[:3] == ["rank", "id", "score"]
    cells = [line.split() for line in lines[1:]]
    assert [int(c[0]) for c in cells] == list(range(1, len(cells) + 1))
    return [c[1] for c in cells], [float(c[2]) for c in cells]


def test_searching_an_items_title_lists_the_items_with_that_title_first(text_items, small_demo, capsys):
    rows = rows_of(os.path.join(small_demo, "test.csv"))
    title = rows[5]["title"]
    same = {r["id"] for r in rows if r["title"] == title}  # the item itself and its twins of one title
    assert main(["--index", text_items, "--text", title, "-k", str(len(same) + 3)]) == 0
    printed = capsys.readouterr()
    ids, scores = table_ids(printed.out)
    assert "keeps no catalogue columns" in printed.err  # an `align embed` folder: ids only, and how to see more
    assert len(ids) == len(same) + 3
    assert set(ids[:len(same)]) == same  # the text vector of the query is theirs: cosine 1
    # the table rounds to 4 decimals; the rest are other titles, apart by far more than rounding
    assert all(abs(s - 1) <= 5e-5 + ROW_BOUND for s in scores[:len(same)])
    assert all(s < 1 - 10 * ROW_BOUND for s in scores[len(same):])


def test_json_results_are_exact_search_over_the_fused_vectors(items, checkpoint, small_demo, capsys):
    picked = next(r for r in rows_of(os.path.join(small_demo, "test.csv")) if r["image"])
    photo = os.path.join(small_demo, picked["image"])
    assert main(["--index", items, "--image", photo, "-k", "7", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert [set(r) for r in results] == [{"id", "score"}] * 7
    # the reference: the photo through model.encode as the catalogue reads it, exact float64 search
    query = reference(checkpoint, small_demo, "image", [picked["id"]])[0].double()
    emb = load_item_embeddings(items)
    scores = emb.vectors["fused"].double() @ query  # (N,)
    scores[~emb.masks["fused"]] = -np.inf
    got = {r["id"]: r["score"] for r in results}
    for item, score in got.items():  # each listed score is the item's cosine ...
        assert score == pytest.approx(float(scores[emb.ids.index(item)]), abs=2 * ROW_BOUND)
    worst = min(got.values())  # ... and no item left out scores clearly above the last one listed
    assert all(float(s) <= worst + 2 * ROW_BOUND for i, s in zip(emb.ids, scores) if i not in got)
    assert [r["score"] for r in results] == sorted(got.values(), reverse=True)


def image_text_model(checkpoint, out):
    """The checkpoint's model without its audio tower (config and weights), as an image-text model."""
    from safetensors.torch import load_file, save_file

    source = os.path.join(checkpoint, "model")
    shutil.copytree(source, out)
    config = yaml.safe_load(open(os.path.join(source, "config.yaml")))
    del config["model"]["towers"]["audio"]
    yaml.safe_dump(config, open(os.path.join(out, "config.yaml"), "w"))
    weights = load_file(os.path.join(source, "model.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.startswith("towers.audio.")},
              os.path.join(out, "model.safetensors"))
    return str(out)


def test_bad_arguments_exit_2_with_a_message_naming_them(items, checkpoint, small_demo, tmp_path, capsys):
    from align.cli import main as cli

    with pytest.raises(SystemExit) as no_query:
        main(["--index", items])
    assert no_query.value.code == 2
    with pytest.raises(SystemExit) as two_queries:
        main(["--index", items, "--text", "a", "--image", "b.png"])
    assert two_queries.value.code == 2
    capsys.readouterr()
    cases = [
        (["-k", "0", "--text", "star"], "-k 0"),
        (["--text", " "], "--text: the text is empty"),
        (["--image", str(tmp_path / "missing.png")], "missing.png: no such file"),
        (["--audio", os.path.join(small_demo, "test.csv")], "test.csv: cannot be read as audio"),
        (["--text", "star", "--where", "colour"], "--where 'colour': expected key=value"),
    ]
    for args, message in cases:
        assert cli(["search", "--index", items, *args]) == 2, args
        assert message in capsys.readouterr().err, args
    assert cli(["search", "--index", str(tmp_path / "nowhere"), "--text", "star"]) == 2
    assert "nowhere: no such folder" in capsys.readouterr().err
    # a modality the model has no tower for
    two_towers = image_text_model(checkpoint, tmp_path / "image_text")
    assert cli(["search", "--index", items, "--checkpoint", two_towers, "--audio",
                os.path.join(small_demo, next(r["audio"] for r in rows_of(os.path.join(small_demo, "test.csv"))
                                              if r["audio"]))]) == 2
    assert "has no audio tower" in capsys.readouterr().err
    # an index over vectors of another dimension than the model's
    emb = load_item_embeddings(items)
    narrow = ItemEmbeddings(emb.ids, {m: v[:, :16].contiguous() for m, v in emb.vectors.items()},
                            dict(emb.masks), {**emb.metadata, "dim": "16"})
    save_item_embeddings(narrow, str(tmp_path / "narrow"))
    assert cli(["search", "--index", str(tmp_path / "narrow"), "--checkpoint", checkpoint, "--text", "star"]) == 2
    error = capsys.readouterr().err
    assert "dimension 16" in error and "embeds into 32" in error


def test_a_query_encoder_refuses_a_modality_it_lacks(checkpoint, tmp_path):
    encoder = QueryEncoder(image_text_model(checkpoint, tmp_path / "image_text"), "cpu")
    assert encoder.modalities == ["image", "text"]
    with pytest.raises(ConfigError, match="no audio tower"):
        encoder.encode("audio", [b"RIFF"])
    with pytest.raises(ConfigError, match="'video' is not a query modality"):
        encoder.encode("video", [b""])


def test_metadata_columns_are_printed_and_filters_keep_only_matching_items(items, small_demo, tmp_path, capsys):
    from align.cli import main as cli
    from align.index.build import main as index_main

    manifest = os.path.join(small_demo, "test.csv")
    assert index_main(["--embeddings", items, "--out", str(tmp_path / "index"), "--kind", "exact",
                       "--metadata", manifest, "--fields", "kind,colour"]) == 0
    capsys.readouterr()
    kinds = {r["id"]: r["kind"] for r in rows_of(manifest)}
    stars = sum(kind == "star" for kind in kinds.values())
    assert main(["--index", str(tmp_path / "index"), "--text", "large blue checked circle", "--where", "kind=star",
                 "-k", "50", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert len(results) == stars  # every star, and nothing else
    assert all(r["metadata"]["kind"] == "star" == kinds[r["id"]] for r in results)
    assert main(["--index", str(tmp_path / "index"), "--text", "large blue checked circle", "-k", "3"]) == 0
    printed = capsys.readouterr()
    assert printed.out.splitlines()[0].split() == ["rank", "id", "score", "kind", "colour"]
    assert printed.err == ""
    # a field the index does not keep: exit 2 naming it
    assert cli(["search", "--index", str(tmp_path / "index"), "--text", "star", "--category", "scarf"]) == 2
    assert "'category'" in capsys.readouterr().err
