"""`align audit` finds what is wrong with a catalogue's listings: a swapped photo (and says the photo
is the wrong view), a re-encoded and cropped copy of a photo under a new id, an unreadable and a
missing file; distinct renders of look-alike products are not duplicates; audit.csv is sorted by
severity with a reason per row; report.html opens in headless Chromium and draws the findings.
Thresholds that cannot be used (NaN among them) and bad manifests are refused by name; `--items`
is checked against when each manifest's rows were embedded, appends included."""
import io
import json
import os
import shutil
import time
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from align.audit.agreement import AgreementThresholds, View, isolation, measure_agreement, robust_z, text_groups
from align.audit.duplicates import DuplicateThresholds, ImageDigests, candidate_pairs, compare_pairs
from align.audit.findings import FLAGS
from align.cli import main as align_main
from align.data.demo_catalogue import build_demo_catalogue, render_image
from align.index.vectors import load_item_embeddings, save_item_embeddings, truncate_embeddings
from tests.browser import assert_drawn, screenshot
from tests.conftest import one_step_checkpoint
from tests.test_index import read_rows, write_rows


def reencoded_crop(image: Image.Image, left: float, top: float, right: float, bottom: float, scale: float,
                   quality: int) -> Image.Image:
    """``image`` cropped by those shares of its sides, resized by ``scale``, through JPEG at ``quality``."""
    width, height = image.size
    image = image.crop((round(left * width), round(top * height), round(width * (1 - right)),
                        round(height * (1 - bottom))))
    image = image.resize((round(image.width * scale), round(image.height * scale)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


# ------------------------------------------------------------------------------------------------
# duplicates: pixels only, no model
# ------------------------------------------------------------------------------------------------
LOOK_ALIKES = [("circle", "red", "solid", "large"), ("ring", "yellow", "solid", "small"),
               ("square", "blue", "solid", "medium"), ("star", "green", "dots", "large")]


def test_look_alike_renders_are_not_duplicates_but_a_cropped_reencoded_copy_is():
    # 13 renders of each combination (the demo's most): same shape, colour, size and text, drawn at
    # other positions, rotations and background tints; solid circles differ in nothing else.
    renders = [render_image(*combo, np.random.default_rng([11, c, n]), 64)
               for c, combo in enumerate(LOOK_ALIKES) for n in range(13)]
    copies = {4: reencoded_crop(renders[4], 0.06, 0.02, 0.0, 0.03, 1.3, 70),  # a solid red circle
              30: reencoded_crop(renders[30], 0.0, 0.0, 0.09, 0.05, 0.8, 80)}  # a blue square
    digests = ImageDigests.build(enumerate(renders + list(copies.values())))
    planted = {(4, 52), (30, 53)}
    thresholds = DuplicateThresholds()

    # Every pair of renders of one combination is checked (not only the candidates): none is the same photo.
    look_alike_pairs = np.array([(a, b) for c in range(len(LOOK_ALIKES))
                                 for a, b in combinations(range(13 * c, 13 * c + 13), 2)])
    checked = compare_pairs(digests, look_alike_pairs, thresholds)
    assert not checked["same"].any(), look_alike_pairs[checked["same"]]

    candidates = candidate_pairs(digests, None, thresholds)
    found = {tuple(pair) for pair in candidates[compare_pairs(digests, candidates, thresholds)["same"]].tolist()}
    assert found == planted
    # the estimated crop is the planted one (within the search grid), whichever photo is the crop
    checked = compare_pairs(digests, np.array(sorted(planted)), thresholds)
    assert checked["crop"] == pytest.approx([0.06, 0.09], abs=0.02)


# ------------------------------------------------------------------------------------------------
# agreement: hand-made vectors, no model
# ------------------------------------------------------------------------------------------------
def test_agreement_names_the_wrong_view_and_ranks_among_other_products():
    generator = torch.Generator().manual_seed(0)
    normalize = torch.nn.functional.normalize
    centres = normalize(torch.randn(3, 16, generator=generator), dim=-1)  # 3 categories of 4 products
    products = normalize(centres[torch.arange(12) % 3] + 0.2 * torch.randn(12, 16, generator=generator), dim=-1)
    group = torch.arange(36) // 3  # 12 products, 3 look-alike items each with identical text
    def view():
        return normalize(products[group] + 0.1 * torch.randn(36, 16, generator=generator), dim=-1)
    image, title, sound = view(), view(), view()
    image[7] = products[0]  # item 7 (product 2, another category) shows product 0's photo
    texts = [f"product {int(g)}" for g in group]
    views = {name: View(vectors, torch.ones(36, dtype=torch.bool))
             for name, vectors in (("image", image), ("title", title), ("audio", sound))}
    agreement = measure_agreement(views, text_groups(texts), AgreementThresholds())
    assert np.nonzero(agreement.mismatch)[0].tolist() == [7]
    assert agreement.culprit[7] == "image"

    stats = agreement.pairs[("image", "title")]
    # ranks by brute force: other products' titles closer to the item's photo than its own title
    for row in range(36):
        own = float(image[row] @ title[row])
        expected = sum(1 for other in range(36)
                       if group[other] != group[row] and float(image[row] @ title[other]) > own)
        assert stats.rank_ab[list(stats.rows).index(row)] == expected
    assert stats.rank_ab[7] > 0 and np.median(stats.rank_ab) == 0
    # robust z against its definition in float64
    similarity = (image.double() * title.double()).sum(-1).numpy()
    median = np.median(similarity)
    scale = 1.4826 * np.median(np.abs(similarity - median))
    assert robust_z(similarity)[0] == pytest.approx((similarity - median) / scale)
    assert agreement.worst[7] == pytest.approx(np.mean([agreement.pairs[("image", "title")].z[7],
                                                       agreement.pairs[("image", "audio")].z[7]]))

    # an outlier: product 11 moved away from every category in all three views
    far = normalize(-centres.sum(0), dim=-1)
    for vectors in (image, title, sound):
        vectors[33:36] = normalize(far + 0.1 * torch.randn(3, 16, generator=generator), dim=-1)
    apart = isolation(views, text_groups(texts), ~agreement.mismatch, AgreementThresholds())
    assert np.nonzero(apart.outlier)[0].tolist() == [33, 34, 35]
    assert np.isnan(apart.score[7])  # a mismatched item is not judged for isolation


# ------------------------------------------------------------------------------------------------
# the command, end to end on a tiny trained model
# ------------------------------------------------------------------------------------------------
STEPS = 60  # the swapped pair then scores about -8 and the next item about -3 (the flag is at -4.5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 160 + 40 item demo catalogue at 32 px and a tiny model trained on titles and descriptions
    long enough (STEPS) to tell a product's photo from another's."""
    demo = str(tmp_path_factory.mktemp("audit_demo"))
    build_demo_catalogue(demo, seed=0, n_train=160, n_test=40, image_size=32, clip_seconds=0.5)
    checkpoint = one_step_checkpoint(demo, tmp_path_factory.mktemp("run"), f"train.max_steps={STEPS}",
                                     "data.columns.text=[title,description]")
    return demo, checkpoint


def plant(demo: str, folder: Path):
    """A copy of the catalogue with a swapped pair, a re-encoded cropped copy, a garbage photo and a
    missing sound; returns the ids involved."""
    shutil.copytree(demo, folder)
    train = read_rows(folder / "train.csv")
    with_photo = [row for row in train if row["image"] and row["audio"]]
    first = with_photo[0]
    second = next(row for row in with_photo if row["kind"] != first["kind"] and row["colour"] != first["colour"])
    first["image"], second["image"] = second["image"], first["image"]
    source = with_photo[5]
    copy = dict(source, id="copy-" + source["id"], image="images/copy.jpg", audio="")
    with Image.open(folder / source["image"]) as photo:
        reencoded_crop(photo.convert("RGB"), 0.07, 0.03, 0.0, 0.02, 1.25, 75).save(folder / copy["image"], quality=95)
    broken, gone = with_photo[8], with_photo[9]
    (folder / broken["image"]).write_bytes(os.urandom(2000))
    gone["audio"] = "audio/nowhere.flac"
    write_rows(train + [copy], folder / "train.csv")
    return {"swap": {first["id"], second["id"]}, "copy": copy["id"], "source": source["id"],
            "unreadable": broken["id"], "missing": gone["id"]}


def test_audit_finds_planted_faults_and_reports_them(trained, tmp_path):
    demo, checkpoint = trained
    catalogue = tmp_path / "catalogue"
    planted = plant(demo, catalogue)
    out = tmp_path / "audit"
    code = align_main(["audit", "--checkpoint", checkpoint, "--manifest", str(catalogue / "train.csv"),
                       str(catalogue / "test.csv"), "--out", str(out), "--device", "cpu", "--no-progress"])
    assert code == 0

    findings = read_rows(out / "audit.csv")
    by_flag = {flag: {row["item_id"]: row for row in findings if row["flag"] == flag} for flag in FLAGS}
    # a swapped pair: both items, and the photo is the view found wrong
    assert planted["swap"] <= set(by_flag["mismatch"])
    assert {by_flag["mismatch"][item]["view"] for item in planted["swap"]} == {"image"}
    assert all("wrong photo" in by_flag["mismatch"][item]["reason"] for item in planted["swap"])
    # the untouched items agree: few of them are called mismatched
    assert len(set(by_flag["mismatch"]) - planted["swap"]) <= 0.03 * 201
    # the re-encoded crop, and nothing else, is a duplicate, of its source
    assert set(by_flag["duplicate"]) == {planted["copy"]}
    assert by_flag["duplicate"][planted["copy"]]["related_id"] == planted["source"]
    # broken media: found, counted, and the run did not stop
    assert set(by_flag["unreadable"]) == {planted["unreadable"]}
    assert by_flag["unreadable"][planted["unreadable"]]["view"] == "image"
    assert set(by_flag["missing"]) == {planted["missing"]}
    assert "nowhere.flac" in by_flag["missing"][planted["missing"]]["reason"]

    # most severe first, a reason on every row; broken files before mismatches before duplicates
    severities = [float(row["severity"]) for row in findings]
    assert severities == sorted(severities, reverse=True)
    assert all(len(row["reason"]) > 20 for row in findings)
    order = [row["flag"] for row in findings]
    assert order.index("missing") < order.index("mismatch") < order.index("duplicate")

    summary = json.loads((out / "audit.json").read_text())
    assert summary["counts"] == {flag: len(by_flag[flag]) for flag in FLAGS}
    assert summary["items"] == 201 and summary["thresholds"]["agreement"]["mismatch_z"] == 4.5
    agreement = read_rows(out / "agreement.csv")
    assert len(agreement) == 201 and {"z_image", "z_title", "z_description", "z_audio"} <= set(agreement[0])

    # the report stands alone: photos inline, nothing fetched; Chromium draws it
    page = (out / "report.html").read_text()
    assert "data:image/jpeg;base64," in page and "http://" not in page and "https://" not in page
    assert planted["copy"] in page and planted["missing"] in page
    assert_drawn(screenshot(out / "report.html", tmp_path / "report.png"))


def test_thresholds_can_be_overridden_and_bad_ones_are_refused(trained, tmp_path, capsys):
    demo, checkpoint = trained
    out = tmp_path / "audit"
    code = align_main(["audit", "--checkpoint", checkpoint, "--manifest", os.path.join(demo, "test.csv"),
                       "--out", str(out), "--device", "cpu", "--no-progress", "--outlier-z", "1",
                       "--min-grain", "0.5"])
    assert code == 0
    summary = json.loads((out / "audit.json").read_text())
    assert summary["thresholds"]["agreement"]["outlier_z"] == 1.0
    assert summary["thresholds"]["duplicates"]["min_grain"] == 0.5
    assert summary["counts"]["outlier"] > 0  # z <= -1 is common: the override took effect
    assert align_main(["audit", "--checkpoint", checkpoint, "--manifest", os.path.join(demo, "test.csv"),
                       "--out", str(out), "--max-crop", "0.7"]) == 2
    assert "--max-crop" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--mismatch-z", "nan", "must be finite and > 0"), ("--outlier-z", "nan", "must be finite and > 0"),
    ("--outlier-z", "inf", "must be finite and > 0"), ("--max-crop", "nan", "must be finite and > 0"),
    ("--max-aspect-error", "nan", "must be finite and > 0"), ("--max-structure", "-1.5", "must be finite and > 0"),
    ("--max-colour-shift", "nan", "must be finite and > 0"), ("--min-grain", "nan", "must be finite and > 0"),
    ("--min-grain", "0.0", "must be finite and > 0"), ("--weak-grain", "nan", "must be finite and > 0"),
    ("--weak-grain", "1.5", "a correlation, at most 1"), ("--max-hamming", "-1", "a count, must be >= 0"),
    ("--layout-neighbours", "-2", "a count, must be >= 0")])
def test_thresholds_that_cannot_be_used_are_refused_by_flag(trained, tmp_path, capsys, flag, value, message):
    demo, checkpoint = trained
    out = tmp_path / "audit"
    assert audit(checkpoint, [os.path.join(demo, "test.csv")], out, flag, value) == 2
    assert f"{flag} {value}: {message}" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was embedded or written


def test_a_bad_manifest_is_an_error_naming_its_rows_not_a_traceback(trained, tmp_path, capsys):
    demo, checkpoint = trained
    rows = read_rows(os.path.join(demo, "test.csv"))[:6]
    repeated = write_rows(rows + rows[2:3], os.path.join(demo, "repeated.csv"))
    assert audit(checkpoint, [repeated], tmp_path / "audit") == 1
    err = capsys.readouterr().err
    assert f"align audit: duplicate id '{rows[2]['id']}' at {repeated}:4 and {repeated}:8" in err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------------------
# --items: the vectors `align embed` wrote, read instead of embedded again
# ------------------------------------------------------------------------------------------------
def audit(checkpoint: str, manifests, out: Path, *extra: str) -> int:
    return align_main(["audit", "--checkpoint", checkpoint, "--manifest", *manifests, "--out", str(out),
                       "--device", "cpu", "--no-progress", *extra])


@pytest.fixture(scope="module")
def embedded(trained, tmp_path_factory):
    """The planted catalogue (its broken photo makes embedding print a report) and `align embed`'s
    folder of it: (checkpoint, catalogue folder, manifests, items folder, seconds align embed took)."""
    demo, checkpoint = trained
    catalogue = tmp_path_factory.mktemp("embedded") / "catalogue"
    plant(demo, catalogue)
    manifests = [str(catalogue / "train.csv"), str(catalogue / "test.csv")]
    items = catalogue.parent / "items"
    start = time.perf_counter()
    assert align_main(["embed", "--checkpoint", checkpoint, "--manifest", *manifests, "--out", str(items),
                       "--device", "cpu"]) == 0
    return checkpoint, catalogue, manifests, items, time.perf_counter() - start


def test_audit_with_items_reuses_align_embed_vectors_and_gives_the_same_results(embedded, tmp_path, capsys):
    checkpoint, _, manifests, items, embed_seconds = embedded
    capsys.readouterr()
    fresh, reused = tmp_path / "fresh", tmp_path / "reused"
    start = time.perf_counter()
    assert audit(checkpoint, manifests, fresh) == 0
    fresh_seconds = time.perf_counter() - start
    assert "could not be read" in capsys.readouterr().out  # it embedded the catalogue: the broken photo
    start = time.perf_counter()
    assert audit(checkpoint, manifests, reused, "--items", str(items)) == 0
    reused_seconds = time.perf_counter() - start
    printed = capsys.readouterr().out
    assert f"item vectors read from {items}" in printed
    # only the title and description views were embedded: the image pass (with the broken photo) was not
    assert "could not be read" not in printed

    # the same findings, scores, agreement table and report, byte for byte
    for name in ("audit.csv", "agreement.csv", "report.html"):
        assert (fresh / name).read_bytes() == (reused / name).read_bytes(), name
    flags = {row["flag"] for row in read_rows(reused / "audit.csv")}
    assert {"mismatch", "duplicate", "unreadable", "missing"} <= flags  # the equality covers real findings
    summaries = [json.loads((folder / "audit.json").read_text()) for folder in (fresh, reused)]
    assert [s.pop("reused_embeddings") for s in summaries] == [None, str(items)]
    seconds = [s.pop("seconds") for s in summaries]
    assert summaries[0] == summaries[1]
    print(f"\nsmall catalogue (201 items, 32 px): align embed {embed_seconds:.1f} s; audit {fresh_seconds:.1f} s, "
          f"with --items {reused_seconds:.1f} s (embed step {seconds[0]['embed']} s -> {seconds[1]['embed']} s)")


def test_items_of_other_inputs_are_refused_before_anything_is_embedded(embedded, tmp_path, capsys):
    checkpoint, catalogue, manifests, items, _ = embedded
    copy = tmp_path / "catalogue"
    shutil.copytree(catalogue, copy)  # copy2 keeps modification times: still older than the embeddings
    copied = [str(copy / "train.csv"), str(copy / "test.csv")]
    other_model = tmp_path / "checkpoint"
    shutil.copytree(checkpoint, other_model)
    cut = tmp_path / "cut"
    save_item_embeddings(truncate_embeddings(load_item_embeddings(str(items)), 16), str(cut))
    future = time.time() + 3600

    def refused(name: str, model: str, manifest_list, folder: Path, *expected: str) -> None:
        out = tmp_path / f"audit-{name}"
        assert audit(model, manifest_list, out, "--items", str(folder)) == 2, name
        captured = capsys.readouterr()
        assert f"--items {folder}" in captured.err and all(text in captured.err for text in expected), captured.err
        assert "could not be read" not in captured.out and not out.exists(), name  # nothing embedded or written

    refused("order", checkpoint, manifests[::-1], items, "another order", "row 0")
    refused("subset", checkpoint, manifests[:1], items, "holds 201 items, the manifests 161",
            "not in the manifests:")
    refused("model", str(other_model), manifests, items, "embedded with the model in", str(other_model))
    refused("dim", checkpoint, manifests, cut, "16 wide")
    refused("missing", checkpoint, manifests, tmp_path / "nowhere", "no such folder")
    os.utime(copy / "test.csv", (future, future))
    refused("manifest", checkpoint, copied, items, f"{copy / 'test.csv'} changed after it was embedded")
    os.utime(copy / "test.csv", (0, 0))
    photo = copy / next(row["image"] for row in read_rows(copy / "test.csv") if row["image"])
    os.utime(photo, (future, future))
    refused("photo", checkpoint, copied, items, "1 media files changed", str(photo))


def test_items_appended_to_are_checked_against_when_each_manifest_was_embedded(trained, tmp_path, capsys):
    demo, checkpoint = trained
    catalogue = tmp_path / "catalogue"
    shutil.copytree(demo, catalogue)
    rows = read_rows(catalogue / "test.csv")
    first = write_rows(rows[:20], catalogue / "first.csv")
    items = tmp_path / "items"
    assert align_main(["embed", "--checkpoint", checkpoint, "--manifest", first, "--out", str(items),
                       "--device", "cpu", "--batch-size", "16"]) == 0
    # Cold items arrive later, in a manifest written after the first embedding, at another batch size.
    later = write_rows(rows[20:], catalogue / "later.csv")
    assert align_main(["embed", "--checkpoint", checkpoint, "--manifest", later, "--out", str(items),
                       "--device", "cpu", "--batch-size", "8", "--append"]) == 0
    assert load_item_embeddings(str(items)).metadata["batch_size"] == "16,8"  # not all rows at 8
    assert audit(checkpoint, [first, later], tmp_path / "audit", "--items", str(items)) == 0
    assert f"item vectors read from {items}" in capsys.readouterr().out

    # A photo of the first manifest changed after its rows were embedded, before the append: its vector
    # is stale, however new the folder's files are.
    embedded = json.loads(load_item_embeddings(str(items)).metadata["embedded_at"])[os.path.abspath(first)]
    photo = catalogue / next(row["image"] for row in rows[:20] if row["image"])
    os.utime(photo, ns=(embedded + 1, embedded + 1))
    assert audit(checkpoint, [first, later], tmp_path / "stale", "--items", str(items)) == 2
    err = capsys.readouterr().err
    assert f"--items {items}: 1 media files changed after it was embedded ({photo})" in err, err


def test_audit_reports_more_broken_files_than_align_embed_accepts(trained, tmp_path):
    # The checkpoint's data.max_bad_fraction (5%) stops `align embed`; the audit counts them all.
    demo, checkpoint = trained
    catalogue = tmp_path / "catalogue"
    shutil.copytree(demo, catalogue)
    photos = [row["image"] for row in read_rows(catalogue / "test.csv") if row["image"]][:10]
    for photo in photos:
        (catalogue / photo).write_bytes(os.urandom(500))
    manifest = [str(catalogue / "test.csv")]
    assert align_main(["embed", "--checkpoint", checkpoint, "--manifest", *manifest, "--out",
                       str(tmp_path / "items"), "--device", "cpu"]) == 1
    assert audit(checkpoint, manifest, tmp_path / "audit") == 0
    unreadable = [row for row in read_rows(tmp_path / "audit" / "audit.csv") if row["flag"] == "unreadable"]
    assert len(unreadable) == len(photos) == 10
