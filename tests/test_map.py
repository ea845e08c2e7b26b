"""`align map` draws the catalogue in one exact, deterministic 2-D projection (PCA, as a float64 SVD
computes it) of every item's fused and modality vectors, with each item's modalities linked; the HTML
needs no network and a real headless Chromium draws it (points in every category's colour, the
audit's rings, an item's links when selected); the PNG is not blank; `--checkpoint` embeds first
and gives the same map as `align embed` then `align map`; a title is shown as written, whatever it spells."""
import json
import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from align.errors import ConfigError, RunError
from align.index.vectors import ItemEmbeddings, fuse, save_item_embeddings
from align.map.command import main
from align.map.project import pca_2d
from tests.browser import assert_drawn, chromium, screenshot
from tests.conftest import one_step_checkpoint
from tests.test_index import read_rows, write_rows

MODALITIES = ("text", "image", "audio")
LAYERS = ("fused",) + MODALITIES
CATEGORIES = ("scarf", "shoe", "hat")
ITEMS, DIM = 60, 16
FLAGGED = {"item-003": ("mismatch", "high", "image does not match its title"),
           "item-017": ("duplicate", "medium", "same photo as item-018")}


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    """60 items in 3 categories with 16-d vectors clustered by category: some lack an image or audio,
    one has no vector at all; a manifest with titles and small images (one file missing); an
    audit CSV flagging two items and one id the embeddings do not hold."""
    root = tmp_path_factory.mktemp("map_catalogue")
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(len(CATEGORIES), DIM)) * 2
    ids = [f"item-{n:03d}" for n in range(ITEMS)]
    category = [CATEGORIES[n % 3] for n in range(ITEMS)]
    masks = {"text": torch.ones(ITEMS, dtype=torch.bool), "image": torch.tensor([n % 7 != 0 for n in range(ITEMS)]),
             "audio": torch.tensor([n % 5 != 1 for n in range(ITEMS)])}
    for m in MODALITIES:
        masks[m][ITEMS - 1] = False  # an item left with no vector at all
    vectors = {}
    for k, m in enumerate(MODALITIES):
        raw = centres[[n % 3 for n in range(ITEMS)]] + rng.normal(size=(ITEMS, DIM)) + k  # a modality gap
        unit = torch.nn.functional.normalize(torch.tensor(raw, dtype=torch.float32), dim=-1)
        vectors[m] = unit * masks[m][:, None]
    vectors["fused"], masks["fused"] = fuse(vectors, masks)
    emb = ItemEmbeddings(ids, vectors, masks, {"format": "align-item-embeddings/1", "checkpoint": "synthetic",
                                               "dim": str(DIM), "modalities": ",".join(MODALITIES),
                                               "fusion": "mean"})
    save_item_embeddings(emb, str(root / "items"))
    (root / "images").mkdir()
    rows = []
    for n, item in enumerate(ids):
        image = f"images/{item}.png"
        if n != 4:  # item-004's file is missing: no thumbnail, still drawn
            colour = (40 * (n % 3), 200 - 3 * n, 90)
            Image.new("RGB", (40, 40), colour).save(root / image)
        rows.append({"id": item, "title": f"{category[n]} number {n}", "category": category[n], "image": image})
    manifest = write_rows(rows, root / "catalogue.csv")
    flags = [{"item_id": item, "flag": flag, "severity": severity, "reason": reason}
             for item, (flag, severity, reason) in FLAGGED.items()]
    flags.append({"item_id": "not-embedded", "flag": "unreadable", "severity": "high", "reason": "no file"})
    audit = write_rows(flags, root / "audit.csv")
    return {"root": root, "items": str(root / "items"), "manifest": manifest, "flags": audit, "emb": emb}


def run_map(catalogue, out, *extra):
    assert main(["--embeddings", catalogue["items"], "--manifest", catalogue["manifest"], "--out", str(out),
                 "--flags", catalogue["flags"], *map(str, extra)]) == 0
    with open(out / "map.json", encoding="utf-8") as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def drawn(catalogue, tmp_path_factory):
    out = tmp_path_factory.mktemp("map")
    return out, run_map(catalogue, out)


def test_pca_of_points_on_a_known_plane_gives_their_coordinates():
    # Points t u + s w (u, w orthonormal; t, s uncorrelated, var t > var s) plus a mean: the
    # projection must give (t - mean t, s - mean s), each axis signed so its largest entry is positive.
    u = np.array([0.0, 0.6, -0.8, 0.0])  # largest |entry| negative: the axis is flipped to -u
    w = np.array([0.0, 0.0, 0.0, 1.0])
    t, s = np.arange(-3.0, 4.0), np.array([0.5, -0.5, 0, 0, 0, -0.5, 0.5])
    vectors = t[:, None] * u + s[:, None] * w + np.array([7.0, 1.0, 2.0, -3.0])
    coords, explained = pca_2d(vectors)
    assert np.allclose(coords[:, 0], -(t - t.mean()), atol=1e-12)
    assert np.allclose(coords[:, 1], s - s.mean(), atol=1e-12)
    var_t, var_s = t.var(), s.var()
    assert np.allclose(explained, [var_t / (var_t + var_s), var_s / (var_t + var_s)], atol=1e-12)


def test_projection_is_the_float64_svd_of_every_layer_together(catalogue, drawn):
    _, result = drawn
    emb = catalogue["emb"]
    # Reference: every real row of every layer, centred in float64, through an SVD (not the eigh of
    # the covariance that align.map uses); axes signed by their largest-magnitude entry.
    stacked = np.concatenate([emb.vectors[name].numpy()[emb.masks[name].numpy()] for name in result["layers"]])
    centred = stacked.astype(np.float64) - stacked.astype(np.float64).mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    axes = vt[:2].T * np.sign(vt[:2][np.arange(2), np.abs(vt[:2]).argmax(axis=1)])
    reference = centred @ axes
    assert result["method"] == "pca" and result["layers"] == list(LAYERS)
    assert result["projection"]["fit_rows"] == {name: int(emb.masks[name].sum()) for name in LAYERS}
    by_id = {item["id"]: item["points"] for item in result["items"]}
    got = [by_id[emb.ids[row]][name] for name in result["layers"] for row in np.flatnonzero(emb.masks[name].numpy())]
    got = np.array(got)
    scale = np.abs(reference).max()
    assert np.abs(got - reference).max() <= 1e-9 * scale  # both float64 from the same float32 inputs
    variance = singular ** 2
    assert np.allclose(result["projection"]["explained_variance"], variance[:2] / variance.sum(), atol=1e-12)


def test_every_item_has_its_modalities_linked_with_its_fields_and_flags(catalogue, drawn):
    _, result = drawn
    emb = catalogue["emb"]
    items = {item["id"]: item for item in result["items"]}
    assert set(items) == set(emb.ids[:-1])  # the item without any vector is not drawn, and counted
    assert result["notes"]["without_vectors"] == 1 and result["notes"]["items"] == ITEMS
    for row, item in enumerate(emb.ids[:-1]):
        expected = {name for name in LAYERS if emb.masks[name][row]}
        assert set(items[item]["points"]) == expected, item
        modality_points = np.array([xy for name, xy in items[item]["points"].items() if name != "fused"])
        assert len(np.unique(modality_points, axis=0)) == len(modality_points)  # its own point each
        if len(modality_points) == 1:  # fused from one modality is that modality's vector
            assert np.allclose(items[item]["points"]["fused"], modality_points[0], atol=1e-6)
        assert items[item]["category"] == CATEGORIES[row % 3]
        assert items[item]["title"] == f"{CATEGORIES[row % 3]} number {row}"
        flags = [dict(zip(("flag", "severity", "reason"), FLAGGED[item]))] if item in FLAGGED else []
        assert items[item].get("flags", []) == flags, item
    assert {c["name"]: c["count"] for c in result["categories"]} == {"scarf": 20, "shoe": 20, "hat": 19}
    assert result["notes"]["flag_ids_unknown"] == 1 and result["notes"]["flagged_drawn"] == 2
    assert result["notes"]["thumbnails"]["count"] == ITEMS - 2  # item-004's file is missing


def test_the_map_is_the_same_on_every_run(catalogue, drawn, tmp_path):
    out, _ = drawn
    run_map(catalogue, tmp_path)
    for name in ("map.json", "map.html"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name


def dump_dom(url, profile):
    """The page's DOM after its scripts ran, in the same offline headless Chromium as tests/browser.py
    (a URL, so that a fragment such as #item=... can be given)."""
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               f"--user-data-dir={profile}", "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
               "--window-size=1200,900", "--virtual-time-budget=3000", "--dump-dom", url]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


def colour_pixels(png, hex_colour):
    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    rgb = [int(hex_colour[k:k + 2], 16) for k in (1, 3, 5)]
    return int((pixels == rgb).all(axis=1).sum())


@pytest.mark.once  # a browser drawing a page: nothing in it depends on the float kernels
def test_the_html_opens_offline_and_draws_every_category_and_the_flags(drawn, tmp_path):
    out, result = drawn
    html = (out / "map.html").read_text(encoding="utf-8")
    assert "http://" not in html and "https://" not in html and 'src="//' not in html
    assert os.path.getsize(out / "map.html") < 1_000_000
    shot = screenshot(out / "map.html", tmp_path / "shot.png")
    assert_drawn(shot)
    for category in result["categories"]:  # fused points are drawn opaque: their colour is exact
        assert colour_pixels(shot, category["colour"]) > 50, category
    assert colour_pixels(shot, "#e00000") > 20  # the audit's rings
    page = (out / "map.html").resolve().as_uri()
    points = sum(len(item["points"]) for item in result["items"])
    assert f'data-drawn="{points}"' in dump_dom(page, tmp_path / "profile")
    chosen = next(item for item in result["items"] if item["id"] == "item-017")
    dom = dump_dom(page + "#item=item-017", tmp_path / "profile")
    assert 'data-selected="item-017"' in dom and f'data-links="{len(chosen["points"]) - 1}"' in dom
    assert chosen["title"] in dom and "duplicate" in dom and "same photo as item-018" in dom


def test_the_png_shows_every_category_and_is_not_blank(drawn):
    out, result = drawn
    assert_drawn(out / "map.png")
    for category in result["categories"]:
        assert colour_pixels(out / "map.png", category["colour"]) > 10, category


def test_past_max_items_the_flagged_items_stay_and_thumbnails_keep_to_their_budget(catalogue, tmp_path):
    result = run_map(catalogue, tmp_path, "--max-items", 10, "--thumbnails-mb", 0.002)
    ids = [item["id"] for item in result["items"]]
    assert len(ids) == 10 and set(FLAGGED) <= set(ids)
    assert sum(result["projection"]["fit_rows"].values()) > 10 * len(LAYERS)  # fitted on every item still
    thumbnails = result["notes"]["thumbnails"]
    assert 0 < thumbnails["bytes"] <= 2000
    assert thumbnails["count"] + thumbnails["left_out"] + thumbnails["unreadable"] == 10


def test_a_title_is_shown_as_written_even_when_it_spells_a_placeholder(catalogue, tmp_path):
    title = "Shoes & <hats>: __DATA__ __TITLE__"
    run_map(catalogue, tmp_path, "--title", title)
    page = (tmp_path / "map.html").read_text(encoding="utf-8")
    head = page[page.index("<title>"):page.index("</title>") + len("</title>")]
    assert head == "<title>Shoes &amp; &lt;hats>: __DATA__ __TITLE__</title>"
    start = page.index('id="map-data">') + len('id="map-data">')
    data = json.loads(page[start:page.index("</script>", start)])
    assert data["title"] == title and len(data["ids"]) == ITEMS - 1  # the data whole: all but the bare item


def test_inputs_that_cannot_be_used_are_refused_by_name(catalogue, tmp_path):
    base = ["--embeddings", catalogue["items"], "--manifest", catalogue["manifest"], "--out", str(tmp_path)]
    with pytest.raises(ConfigError, match="no column 'kind'.*--category-column"):
        main(base + ["--category-column", "kind"])
    bad_flags = write_rows([{"id": "item-001", "flag": "x"}], tmp_path / "bad.csv")
    with pytest.raises(ConfigError, match="bad.csv: no column item_id"):
        main(base + ["--flags", bad_flags])
    with pytest.raises(ConfigError, match="--manifest"):
        main(["--checkpoint", str(tmp_path), "--out", str(tmp_path)])
    try:
        import umap  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="umap-learn"):
            main(base + ["--method", "umap"])
    assert not os.path.exists(tmp_path / "map.json")


def test_checkpoint_embeds_first_and_gives_the_embed_folder_map(small_demo, tmp_path):
    from align.index.embed import main as embed_main

    checkpoint = one_step_checkpoint(small_demo, tmp_path / "run")
    manifest = os.path.join(small_demo, "test.csv")
    common = ["--manifest", manifest, "--category-column", "kind", "--batch-size", "16", "--device", "cpu"]
    assert main(["--checkpoint", checkpoint, "--out", str(tmp_path / "direct"), *common]) == 0
    assert embed_main(["--checkpoint", checkpoint, "--manifest", manifest, "--out", str(tmp_path / "items"),
                       "--batch-size", "16", "--device", "cpu"]) == 0
    assert main(["--embeddings", str(tmp_path / "items"), "--out", str(tmp_path / "folder"), *common[:4]]) == 0
    direct = json.loads((tmp_path / "direct" / "map.json").read_text())
    folder = json.loads((tmp_path / "folder" / "map.json").read_text())
    assert direct["items"] == folder["items"] and direct["projection"] == folder["projection"]
    assert direct["notes"]["thumbnails"]["count"] > 0 and {c["name"] for c in direct["categories"]} <= {
        "circle", "square", "triangle", "star", "ring", "cross"}
    assert_drawn(screenshot(tmp_path / "direct" / "map.html", tmp_path / "shot.png"))
    # A manifest that repeats an id is refused naming its rows (align/cli.py reports a RunError).
    rows = read_rows(manifest)[:4]
    repeated = write_rows(rows + rows[1:2], os.path.join(small_demo, "repeated.csv"))
    with pytest.raises(RunError, match=f"duplicate id '{rows[1]['id']}' at .*repeated.csv:3 and .*repeated.csv:6"):
        main(["--checkpoint", checkpoint, "--out", str(tmp_path / "repeated"), *common[2:], "--manifest", repeated])
