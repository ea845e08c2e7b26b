"""`align serve` on a REAL uvicorn server (127.0.0.1, a free port) asked by a real httpx client:
text search, photo and sound uploads and recommendations answer what the encoder, the index and the
recommender give one by one; every bad request gets a 4xx naming its field and the next good request
still works; queries that arrive together share forwards and each gets its own row."""
import asyncio
import contextlib
import csv
import io
import json
import os
import struct
import threading
import time
import zlib
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
import uvicorn

from align.index.search import MAX_QUERY_PIXELS, QueryEncoder, open_catalogue, search
from align.serve.app import MAX_TEXT_CHARS, create_app, main as serve_main
from align.serve.batching import MicroBatcher
from tests.conftest import EPS32, free_port
from tests.test_search import ROW_BOUND, assert_apart, checkpoint, embed, rows_of  # noqa: F401

DIM = 32  # model.embed_dim of tiny_overrides
# A query vector off by at most ROW_BOUND per entry (test_search.py) moves its cosine with a unit item
# vector by at most ROW_BOUND * ||item||_1 <= ROW_BOUND * sqrt(DIM), plus the dot product's own rounding.
SCORE_BOUND = ROW_BOUND * DIM ** 0.5 + (DIM + 2) * EPS32
UPLOAD_MB = 1


@pytest.fixture(scope="module")
def items(checkpoint, small_demo, tmp_path_factory):  # noqa: F811
    """`align embed` of the whole small demo (200 items): the index, and the recommender's items."""
    return embed(checkpoint, tmp_path_factory.mktemp("items") / "items",
                 os.path.join(small_demo, "train.csv"), os.path.join(small_demo, "test.csv"))


@pytest.fixture(scope="module")
def head(items, small_demo, tmp_path_factory):
    """A recommender head trained one epoch on a simulated shop of 100 users over those items."""
    from align.rec.config import load_rec_config
    from align.rec.train import train_head
    from data_prep.shop_sim import main as shop_sim

    out = tmp_path_factory.mktemp("shop")
    manifests = [os.path.join(small_demo, "train.csv"), os.path.join(small_demo, "test.csv")]
    assert shop_sim(["--catalogue", *manifests, "--out", str(out / "shop"), "--users", "100", "--seed", "0"]) == 0
    train_head(load_rec_config(None, [
        f"data.interactions={out / 'shop' / 'interactions.csv'}", f"data.catalogue=[{','.join(manifests)}]",
        f"data.items={items}", f"train.output_dir={out / 'head'}", "train.epochs=1", "train.batch_size=64",
        "train.wandb=disabled", "train.progress=false", "head.dim=16", "head.hidden=32", "rerank.pool=30"]))
    return str(out / "head")


@pytest.fixture(scope="module")
def server(items, head):
    """The app over the items and the head, served by uvicorn in a thread until the module ends."""
    from align.rec.recommend import Recommender

    index, encoder = open_catalogue(items, device="cpu")
    recommender = Recommender.load(head)
    app = create_app(encoder, index, recommender, max_batch=32, max_wait_ms=20, max_upload_mb=UPLOAD_MB)
    with serving(app) as (url, client):
        yield SimpleNamespace(url=url, client=client, index=index, encoder=encoder, recommender=recommender)


@contextlib.contextmanager
def serving(app):
    """(url, an httpx client of it) while uvicorn serves ``app`` in a thread on a free port."""
    port = free_port()
    uvicorn_server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert thread.is_alive(), "the server stopped while starting"
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "no /healthz answer within 60 s"
        time.sleep(0.05)
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            yield url, client
    finally:
        uvicorn_server.should_exit = True
        thread.join(30)


def expected_results(server, modality, value, k):
    """What the encoder and the index give for one query alone, with a few results to spare."""
    return search(server.index, server.encoder.encode(modality, [value]), k + 5)[0]


def assert_same_results(got, expected, k):
    """``got`` lists ``expected``'s first k items: scores within SCORE_BOUND, and two items swap
    places only when their scores tie within it."""
    assert len(got) == k
    scores = {e["id"]: e["score"] for e in expected}
    for rank, (g, e) in enumerate(zip(got, expected)):
        assert abs(g["score"] - e["score"]) <= SCORE_BOUND, rank
        assert g["id"] == e["id"] or abs(scores[g["id"]] - e["score"]) <= 2 * SCORE_BOUND, rank


def good_request(server):
    response = server.client.post("/search", json={"text": "small blue striped star", "k": 3})
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 3


def test_healthz_says_what_is_served(server):
    health = server.client.get("/healthz").json()
    assert health["status"] == "ok" and health["items"] == 200 and health["dim"] == DIM
    assert sorted(health["modalities"]) == ["audio", "image", "text"] and health["kind"] == "exact"
    assert health["recommender"] is True


def test_text_search_answers_what_the_encoder_and_index_give(server, small_demo):
    title = rows_of(os.path.join(small_demo, "test.csv"))[3]["title"]
    response = server.client.post("/search", json={"text": title, "k": 8})
    assert response.status_code == 200, response.text
    assert_same_results(response.json()["results"], expected_results(server, "text", title, 8), 8)


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_an_uploaded_file_is_searched_like_the_catalogue_file(server, small_demo, modality):
    row = next(r for r in rows_of(os.path.join(small_demo, "test.csv")) if r[modality])
    path = os.path.join(small_demo, row[modality])
    with open(path, "rb") as handle:
        response = server.client.post("/search", files={modality: (os.path.basename(path), handle)}, data={"k": "6"})
    assert response.status_code == 200, response.text
    assert_same_results(response.json()["results"], expected_results(server, modality, path, 6), 6)


def test_recommend_for_a_known_user_and_for_a_history(server, head):
    from align.rec.recommend import user_history

    rec = server.recommender
    user = _first_user(rec)
    history = user_history(rec, user)  # align recommend's own reading of the log
    rows, _ = rec.recommend([rec.rows_of(history, "test")], 5)
    expected = [rec.item_ids[r] for r in rows[0] if r >= 0]
    response = server.client.post("/recommend", json={"user": user, "k": 5})
    assert response.status_code == 200, response.text
    assert [r["id"] for r in response.json()["results"]] == expected
    assert response.json()["history"] == history
    response = server.client.post("/recommend", json={"history": history, "k": 5})
    assert [r["id"] for r in response.json()["results"]] == expected


def _first_user(recommender):
    with open(recommender.config.data.interactions, newline="", encoding="utf-8") as handle:
        return next(csv.DictReader(handle))["user_id"]


def _corrupt(path, keep=0.5):
    data = open(path, "rb").read()
    return data[: int(len(data) * keep)]


def flat_png(width, height):
    """A valid PNG of ``width`` x ``height`` black 1-bit pixels, compressed row by row: zlib packs
    the zero rows ~1000 to 1, so 8200 x 8200 px is a ~10 KB file, made without holding the image."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then 8 pixels a byte
    compressor = zlib.compressobj(9)
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale, not interlaced
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def test_the_flat_png_is_small_and_declares_its_size():
    from PIL import Image

    side = 8200  # 67,240,000 pixels: over MAX_QUERY_PIXELS, under PIL's own warning (89M)
    data = flat_png(side, side)
    assert side * side > MAX_QUERY_PIXELS and len(data) < 64 * 1024
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == (side, side) and image.mode == "1"
    small = Image.open(io.BytesIO(flat_png(20, 3)))
    assert small.size == (20, 3) and small.convert("L").getextrema() == (0, 0)  # it decodes, all black


def bad_requests(small_demo):
    """(name, request kwargs for httpx, path, expected status, the field the answer must name)."""
    rows = rows_of(os.path.join(small_demo, "test.csv"))
    image = os.path.join(small_demo, next(r["image"] for r in rows if r["image"]))
    audio = os.path.join(small_demo, next(r["audio"] for r in rows if r["audio"]))
    big = b"\x89PNG" + bytes(UPLOAD_MB * 1024 * 1024 + 10)
    long_text = "star " * (MAX_TEXT_CHARS // 5 + 1)  # just over the limit
    return [
        ("malformed JSON", {"content": b'{"text": "star", ', "headers": {"content-type": "application/json"}},
         "/search", 422, "body"),
        ("JSON nested too deeply", {"content": b'{"text": "star", "where": ' + b"[" * 100_000 + b"}"}, "/search",
         422, "body"),
        ("a field name that is a lone surrogate", {"content": b'{"text": "star", "\\ud800": 1}'}, "/search", 422,
         "\ud800"),
        ("a where key that is a lone surrogate", {"content": b'{"text": "star", "where": {"\\ud800": null}}'},
         "/search", 422, "where"),
        ("text too long", {"json": {"text": long_text}}, "/search", 422, "text"),
        ("text too long in a form", {"files": {"text": (None, long_text)}}, "/search", 422, "text"),
        ("form text over 64 KiB", {"files": {"text": (None, "star " * 14_000)}}, "/search", 413, "text"),
        ("image of too many pixels", {"files": {"image": ("flat.png", flat_png(8200, 8200))}}, "/search", 400,
         "image"),
        ("image PIL itself refuses to open", {"files": {"image": ("flat.png", flat_png(14_000, 14_000))}},
         "/search", 400, "image"),
        ("JSON not an object", {"json": ["star"]}, "/search", 422, "body"),
        ("empty text", {"json": {"text": "  "}}, "/search", 422, "text"),
        ("text not a string", {"json": {"text": 3}}, "/search", 422, "text"),
        ("k zero", {"json": {"text": "star", "k": 0}}, "/search", 422, "k"),
        ("k too big", {"json": {"text": "star", "k": 1001}}, "/search", 422, "k"),
        ("k not a number", {"json": {"text": "star", "k": "ten"}}, "/search", 422, "k"),
        ("where not an object", {"json": {"text": "star", "where": "scarf"}}, "/search", 422, "where"),
        ("where on a field not kept", {"json": {"text": "star", "where": {"category": "scarf"}}}, "/search", 422,
         "where"),
        ("unknown field", {"json": {"txt": "star"}}, "/search", 422, "txt"),
        ("image inside JSON", {"json": {"image": "aGVsbG8="}}, "/search", 400, "image"),
        ("corrupt image", {"files": {"image": ("photo.png", _corrupt(image))}}, "/search", 400, "image"),
        ("not an image", {"files": {"image": ("photo.png", b"hello")}}, "/search", 400, "image"),
        ("empty image", {"files": {"image": ("photo.png", b"")}}, "/search", 400, "image"),
        ("corrupt audio", {"files": {"audio": ("sound.flac", _corrupt(audio, 0.3))}}, "/search", 400, "audio"),
        ("oversized upload", {"files": {"image": ("huge.png", big)}}, "/search", 413, "image"),
        ("unknown modality", {"files": {"video": ("clip.mp4", b"1234")}}, "/search", 400, "video"),
        ("text and a file", {"files": {"image": ("p.png", open(image, "rb").read())}, "data": {"text": "star"}},
         "/search", 400, "text"),
        ("two files", {"files": [("image", ("a.png", open(image, "rb").read())), ("audio", ("a.flac", b"1"))]},
         "/search", 400, "audio"),
        ("k out of range in a form", {"files": {"image": ("p.png", open(image, "rb").read())}, "data": {"k": "0"}},
         "/search", 422, "k"),
        ("unknown user", {"json": {"user": "nobody-42"}}, "/recommend", 404, "user"),
        ("unknown history items", {"json": {"history": ["no-such-item", "nor-this"]}}, "/recommend", 422, "history"),
        ("user and history", {"json": {"user": "a", "history": []}}, "/recommend", 422, "user"),
        ("recommend k too big", {"json": {"history": [rows[0]["id"]], "k": 5000}}, "/recommend", 422, "k"),
    ]


def test_every_bad_request_gets_a_4xx_naming_its_field_and_the_server_keeps_serving(server, small_demo):
    for name, request, path, status, field in bad_requests(small_demo):
        response = server.client.post(path, **request)
        assert response.status_code == status, (name, response.text)
        answer = response.json()
        assert answer["field"] == field, (name, answer)
        assert field in answer["detail"] or name in ("malformed JSON", "JSON not an object", "oversized upload",
                                                      "corrupt image", "not an image", "empty image",
                                                      "corrupt audio", "JSON nested too deeply",
                                                      "a field name that is a lone surrogate"), (name, answer)
        good_request(server)
    # the messages say what was wrong
    named = {name: server.client.post(path, **request).json()["detail"]
             for name, request, path, _, _ in bad_requests(small_demo)}
    assert "photo.png" in named["corrupt image"] and "cannot be read as image" in named["corrupt image"]
    assert "not valid JSON" in named["malformed JSON"] and "upload limit of 1 MiB" in named["oversized upload"]
    assert "no-such-item" in named["unknown history items"] and "nobody-42" in named["unknown user"]
    assert "nested too deeply" in named["JSON nested too deeply"]
    assert named["a where key that is a lone surrogate"].startswith("where.\ud800: ")
    assert f"limit of {MAX_TEXT_CHARS:,}" in named["text too long"] == named["text too long in a form"]
    assert "over 64 KiB" in named["form text over 64 KiB"]
    assert f"8200 x 8200 = 67,240,000 pixels, over the {MAX_QUERY_PIXELS:,}" in named["image of too many pixels"]
    assert f"at most {MAX_QUERY_PIXELS:,} pixels" in named["image PIL itself refuses to open"]
    assert named["where on a field not kept"].count("where") == 1  # not "where {...}: where: no field"
    good_request(server)


@pytest.fixture(scope="module")
def stock(items, tmp_path_factory):
    """An `align index` of the items with metadata from a JSONL catalogue of JSON booleans, floats
    and text (each item's row, as the test reads it back), and uvicorn serving it."""
    from align.index.build import main as index_main

    folder = tmp_path_factory.mktemp("stock")
    ids = json.load(open(os.path.join(items, "ids.json")))["ids"]
    rows = {item: {"id": item, "in_stock": n % 2 == 0, "price": (10.0, 12.5, 7.0)[n % 3],
                   "tag": ("blue", "red", "green", "blue")[n % 4]} for n, item in enumerate(ids)}
    with open(folder / "stock.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows.values())
    assert index_main(["--embeddings", items, "--out", str(folder / "index"), "--kind", "exact",
                       "--metadata", str(folder / "stock.jsonl")]) == 0
    index, encoder = open_catalogue(str(folder / "index"), device="cpu")
    with serving(create_app(encoder, index)) as (url, client):
        yield SimpleNamespace(client=client, index=str(folder / "index"), rows=rows)


def test_json_booleans_and_numbers_of_a_jsonl_catalogue_can_be_filtered_on(stock, capsys):
    from align.search.command import main as search_main

    rows = stock.rows.values()

    def having(**wanted):  # brute force: the ids whose catalogue row has these Python values
        return {r["id"] for r in rows if all(r[key] == value for key, value in wanted.items())}

    in_stock = having(in_stock=True)
    assert 0 < len(in_stock) < len(rows) and 0 < len(having(price=10.0)) < len(rows)
    for where, expected in (({"in_stock": True}, in_stock), ({"in_stock": "true"}, in_stock),
                            ({"in_stock": False}, having(in_stock=False)), ({"price": 10}, having(price=10.0)),
                            ({"price": "10"}, having(price=10.0)), ({"price": 10.0}, having(price=10.0)),
                            ({"price": 12.5}, having(price=12.5)), ({"price": "12.5"}, having(price=12.5)),
                            ({"in_stock": True, "price": 10}, having(in_stock=True, price=10.0)),
                            ({" tag ": " blue "}, having(tag="blue")),  # keys and values stripped
                            ({"in_stock": "True"}, set())):  # Python's spelling is not the catalogue's
        response = stock.client.post("/search", json={"text": "star", "k": 1000, "where": where})
        assert response.status_code == 200, (where, response.text)
        results = response.json()["results"]
        assert {r["id"] for r in results} == expected, where
        assert all(r["metadata"]["in_stock"] == json.dumps(stock.rows[r["id"]]["in_stock"]) for r in results)
    for value in ({"a": 1}, [True], None):  # not one value: 422 naming where.in_stock
        response = stock.client.post("/search", json={"text": "star", "where": {"in_stock": value}})
        assert response.status_code == 422 and response.json()["field"] == "where", value
        assert response.json()["detail"].startswith("where.in_stock: "), value
    # align search reads text: in_stock=true and price=10 are the JSON true and 10.0
    for flags, expected in ((["--where", "in_stock=true", "--where", "price=10"], having(in_stock=True, price=10.0)),
                            (["--where", "in_stock=false"], having(in_stock=False))):
        assert search_main(["--index", stock.index, "--text", "star", "-k", "1000", "--json", "--device", "cpu",
                            *flags]) == 0
        assert {r["id"] for r in json.loads(capsys.readouterr().out)["results"]} == expected, flags


def test_concurrent_requests_share_forwards_and_answer_as_one_by_one(server, small_demo):
    titles = sorted({r["title"] for r in rows_of(os.path.join(small_demo, "train.csv"))})[:12]
    before = server.client.get("/healthz").json()["batching"]["by_modality"].get("text", {"forwards": 0, "rows": 0})

    async def together():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/search", json={"text": t, "k": 4}) for t in titles))

    responses = asyncio.run(together())
    after = server.client.get("/healthz").json()["batching"]["by_modality"]["text"]
    assert after["rows"] - before["rows"] == len(titles)
    assert after["forwards"] - before["forwards"] < len(titles)
    assert_apart(server.encoder.encode("text", titles))  # so a row handed to the wrong request shows
    for title, response in zip(titles, responses):
        assert response.status_code == 200, response.text
        assert_same_results(response.json()["results"], expected_results(server, "text", title, 4), 4)


def test_queries_queued_together_share_one_forward_and_each_gets_its_own_row(checkpoint, small_demo):  # noqa: F811
    encoder = QueryEncoder(checkpoint, "cpu")
    texts = sorted({r["title"] for r in rows_of(os.path.join(small_demo, "train.csv"))})[:10]
    forwards = []

    def counted(modality, prepared):
        forwards.append(len(prepared))
        return encoder.encode_prepared(modality, prepared)

    async def together(max_batch):
        batcher = MicroBatcher(counted, ["text"], max_batch=max_batch, max_wait_ms=0)
        await batcher.start()
        try:  # all ten are queued before the worker first runs (asyncio runs ready tasks in order)
            return await asyncio.gather(*(batcher.encode("text", encoder.prepare("text", t)) for t in texts))
        finally:
            await batcher.stop()

    singles = torch.cat([encoder.encode("text", [t]) for t in texts])  # (10, D), one forward each
    assert_apart(singles)
    for max_batch, expected in ((32, [10]), (4, [4, 4, 2])):
        forwards.clear()
        rows = torch.from_numpy(np.stack(asyncio.run(together(max_batch))))
        assert forwards == expected
        assert (rows - singles).abs().max() <= ROW_BOUND


def test_align_serve_refuses_bad_flags_with_exit_2(items, tmp_path, capsys):
    from align.cli import main as cli

    for flags, message in ((["--port", "70000"], "--port 70000"), (["--max-batch", "0"], "--max-batch 0"),
                           (["--max-upload-mb", "0"], "--max-upload-mb 0"),
                           (["--recommender", str(tmp_path / "none")], "none: no such folder")):
        assert cli(["serve", "--index", items, *flags]) == 2, flags
        assert message in capsys.readouterr().err, flags
    with pytest.raises(SystemExit):
        serve_main(["--port", "1"])  # --index is required
