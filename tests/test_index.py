"""`align embed` writes one row per catalogue item (unit vectors, zero rows and False masks for what
an item lacks or could not be read, a fused vector), reads back what it wrote, adds cold items with
--append; `ExactIndex` returns the exact top k (as a float64 brute force does) with exclusions and
masked rows, through FAISS and through torch alike. The folder records how and when its rows were
embedded, and keeps saying so truthfully after appends (fields checkpoints included); a bad manifest
is an error naming its rows, not a traceback."""
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from align.cli import main as align_main
from align.errors import ConfigError, RunError
from align.index import index as index_module
from align.index.embed import embed_manifests, main
from align.index.index import ExactIndex
from align.index.vectors import (EMBEDDED_AT, FORMAT, ItemEmbeddings, append_item_embeddings, embedded_times, fuse,
                                 load_item_embeddings, save_item_embeddings)
from tests.conftest import EPS32, logit_error, one_step_checkpoint, read_rows, write_rows  # noqa: F401

DIM = 32  # model.embed_dim in tiny_overrides
UNIT = 1e-5  # |norm - 1| of a float32 unit vector of DIM entries, with room to spare
# |fused32 - fused64| per entry: two norms of DIM float32 terms, a mean of at most three, a few
# roundings per entry on top: far below this, which a wrong weight or a missed mask exceeds by far.
FUSED_BOUND = 10 * DIM * EPS32
BACKENDS = ["faiss", "torch"]


@pytest.fixture(scope="module")
def checkpoint(small_demo, tmp_path_factory):
    """A text-image-audio model trained for one step on the demo catalogue, saved as training saves it."""
    return one_step_checkpoint(small_demo, tmp_path_factory.mktemp("run"))


def embed(checkpoint, out, *manifests, extra=()):
    return main(["--checkpoint", checkpoint, "--manifest", *map(str, manifests), "--out", str(out), "--device", "cpu",
                 "--batch-size", "16", *extra])


def fused_float64(vectors, masks, weights=None):
    """The normalised weighted mean of the normalised present vectors, in float64 (independent of ``fuse``)."""
    total = 0
    weight_sum = 0
    for name, vector in vectors.items():
        v = vector.double()
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)
        w = masks[name].double() * (1.0 if weights is None else weights[name])
        total = total + w[:, None] * v
        weight_sum = weight_sum + w
    mean = total / torch.where(weight_sum > 0, weight_sum, torch.ones_like(weight_sum))[:, None]
    return mean / mean.norm(dim=1, keepdim=True).clamp_min(1e-300), weight_sum > 0


def reference_vectors(checkpoint, manifest):
    """Each item's modality vectors encoded one by one, straight from its files: {modality: {id: (D,)}}."""
    from align.data.manifest import load_raw, read_manifest
    from align.loading import load_model, read_saved_config

    model = load_model(checkpoint)
    config = read_saved_config(os.path.join(checkpoint, "model"))
    prepare = model.preprocessors(train=False)
    out = {m: {} for m in model.modalities}
    for row in read_manifest(manifest, config.data.columns):
        raw = load_raw(row, os.path.dirname(manifest), model.modalities)
        for m in model.modalities:
            if raw[m] is not None:
                value = prepare[m](raw[m])
                batch = {k: v[None] for k, v in value.items()} if isinstance(value, dict) else value[None]
                with torch.no_grad():
                    out[m][row["id"]] = model.encode(m, batch)[0]
    return out


def test_embed_writes_one_unit_row_per_item_masks_and_the_fused_mean(checkpoint, small_demo, tmp_path):
    manifest = os.path.join(small_demo, "test.csv")
    before = time.time_ns()
    assert embed(checkpoint, tmp_path / "items", manifest) == 0
    after = time.time_ns()
    rows = read_rows(manifest)
    tensors = load_file(tmp_path / "items" / "embeddings.safetensors")
    with safe_open(str(tmp_path / "items" / "embeddings.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    listing = json.load(open(tmp_path / "items" / "ids.json"))
    modalities = metadata["modalities"].split(",")
    assert sorted(modalities) == ["audio", "image", "text"]
    started = json.loads(metadata.pop(EMBEDDED_AT))  # when the run started, before it read anything
    assert list(started) == [os.path.abspath(manifest)] and before <= started[os.path.abspath(manifest)] <= after
    assert metadata == {"format": FORMAT, "checkpoint": os.path.abspath(os.path.join(checkpoint, "model")),
                        "dim": str(DIM), "modalities": ",".join(modalities), "fusion": "mean",
                        "batch_size": "16", "device": "cpu", "torch": torch.__version__}
    assert listing == {"ids": [r["id"] for r in rows], "modalities": modalities, "dim": DIM, "count": len(rows)}
    names = modalities + ["fused"]
    assert set(tensors) == set(names) | {f"mask.{n}" for n in names}
    # Presence straight from the manifest's cells (the demo leaves some images and audio out).
    has = {"text": [bool(r["title"]) for r in rows], "image": [bool(r["image"]) for r in rows],
           "audio": [bool(r["audio"]) for r in rows]}
    assert not all(has["audio"]) and all(has["text"])
    reference = reference_vectors(checkpoint, manifest)
    for name in names:
        vectors, mask = tensors[name], tensors[f"mask.{name}"]
        assert vectors.dtype == torch.float32 and vectors.shape == (len(rows), DIM)
        assert mask.dtype == torch.bool and mask.shape == (len(rows),)
        assert (vectors[mask].norm(dim=1) - 1).abs().max() < UNIT
        assert torch.count_nonzero(vectors[~mask]) == 0
        if name != "fused":
            assert mask.tolist() == has[name]
            # Rows in the right place: each equals the item encoded on its own (float32, other batch sizes).
            expected = torch.stack([reference[name][r["id"]] for r, h in zip(rows, has[name]) if h])
            torch.testing.assert_close(vectors[mask], expected, rtol=0, atol=1e-5)
    fused, present = fused_float64({m: tensors[m] for m in modalities}, {m: tensors[f"mask.{m}"] for m in modalities})
    assert tensors["mask.fused"].tolist() == present.tolist()
    assert (tensors["fused"].double() - fused).abs().max() < FUSED_BOUND


def test_an_unreadable_file_costs_its_item_that_modality_only(checkpoint, small_demo, tmp_path, capsys):
    rows = read_rows(os.path.join(small_demo, "test.csv"))[:12]
    for row in rows:  # a catalogue of its own, media copied beside it
        for column in ("image", "audio"):
            if row[column]:
                os.makedirs(tmp_path / os.path.dirname(row[column]), exist_ok=True)
                shutil.copy(os.path.join(small_demo, row[column]), tmp_path / row[column])
    bare = {**rows[0], "id": "no-modality", "title": "", "image": "", "audio": ""}
    only_bad_image = {**rows[0], "id": "only-a-missing-image", "title": "", "audio": "", "image": "gone.png"}
    manifest = write_rows(rows[:6] + [bare] + rows[6:] + [only_bad_image], tmp_path / "catalogue.csv")
    assert embed(checkpoint, tmp_path / "clean", manifest) == 0
    lost_image = next(r for r in rows if r["image"] and r["audio"])
    lost_audio = next(r for r in rows if r["audio"] and r is not lost_image)
    os.remove(tmp_path / lost_image["image"])
    (tmp_path / lost_audio["audio"]).write_bytes(b"not a flac file")
    capsys.readouterr()
    assert embed(checkpoint, tmp_path / "damaged", manifest) == 0
    report = capsys.readouterr().out
    clean, damaged = load_item_embeddings(str(tmp_path / "clean")), load_item_embeddings(str(tmp_path / "damaged"))
    ids = [r["id"] for r in rows[:6]] + ["no-modality"] + [r["id"] for r in rows[6:]] + ["only-a-missing-image"]
    assert damaged.ids == clean.ids == ids
    row_of = damaged.row_of()
    lost = {(lost_image["id"], "image"), (lost_audio["id"], "audio"), ("only-a-missing-image", "image")}
    for m in damaged.modalities:
        for item, row in row_of.items():
            if (item, m) in lost:
                assert not damaged.masks[m][row] and torch.count_nonzero(damaged.vectors[m][row]) == 0
            else:  # everything else as in the clean catalogue
                assert damaged.masks[m][row] == clean.masks[m][row]
                torch.testing.assert_close(damaged.vectors[m][row], clean.vectors[m][row], rtol=0, atol=1e-5)
    for item in ("no-modality", "only-a-missing-image"):  # kept, with nothing: zero rows, masks False
        assert not any(damaged.masks[name][row_of[item]] for name in damaged.masks)
        assert torch.count_nonzero(damaged.vectors["fused"][row_of[item]]) == 0
    fused, _ = fused_float64({m: damaged.vectors[m] for m in damaged.modalities},
                             {m: damaged.masks[m] for m in damaged.modalities})
    assert (damaged.vectors["fused"].double() - fused).abs().max() < FUSED_BOUND
    # The report names the lost ids, the reasons and the items left without any modality.
    assert f"image (2): {lost_image['id']!r}, 'only-a-missing-image'" in report  # in manifest order
    assert f"audio (1): {lost_audio['id']!r}" in report and "missing_file" in report and "bad_audio" in report
    assert "items without any modality: 2" in report and "'no-modality'" in report


def test_max_bad_fraction_holds_over_many_small_manifests(checkpoint, small_demo, tmp_path, capsys):
    """data.max_bad_fraction is counted over every manifest of one run: five manifests with fewer
    samples each than the threshold needs (50), every photo missing, are refused together."""
    rows = [{**row, "image": "gone.png", "audio": ""} for row in read_rows(os.path.join(small_demo, "test.csv"))[:40]]
    manifests = [write_rows(rows[n:n + 8], tmp_path / f"part{n // 8}.csv") for n in range(0, 40, 8)]
    with pytest.raises(RunError, match=r"32 of 64 samples in 5 manifests \(.*part0.csv, \.\.\.\) could not be used"
                                       r" \(50.0% > max_bad_fraction=5.0%\)"):
        embed(checkpoint, tmp_path / "broken", *manifests)  # stops at the fourth: 32 of 64 samples, 50% > 5%
    assert os.listdir(tmp_path / "broken") == ["parts"]  # the plan a rerun goes on from; no vectors
    assert embed(checkpoint, tmp_path / "one", manifests[0]) == 0  # 8 of 16: too few to judge alone


def test_an_index_and_its_item_vectors_never_share_a_folder(checkpoint, small_demo, tmp_path, capsys):
    """Both keep their ids in ids.json: an index written into the vectors' folder (or vectors into an
    index's) overwrote it, and neither could be read again. Refused up front, both files kept."""
    manifest = os.path.join(small_demo, "test.csv")
    assert embed(checkpoint, tmp_path / "items", manifest) == 0
    assert align_main(["index", "--embeddings", str(tmp_path / "items"), "--out", str(tmp_path / "index")]) == 0
    before = {folder: {name: (tmp_path / folder / name).read_bytes() for name in os.listdir(tmp_path / folder)}
              for folder in ("items", "index")}
    capsys.readouterr()
    assert align_main(["index", "--embeddings", str(tmp_path / "items"), "--out", str(tmp_path / "items")]) == 2
    assert "--out" in capsys.readouterr().err
    assert align_main(["embed", "--checkpoint", checkpoint, "--manifest", manifest, "--out", str(tmp_path / "index"),
                       "--device", "cpu"]) == 2
    assert "--out" in capsys.readouterr().err
    assert {folder: {name: (tmp_path / folder / name).read_bytes() for name in os.listdir(tmp_path / folder)}
            for folder in ("items", "index")} == before


def test_rows_follow_the_manifests_and_append_adds_and_replaces(checkpoint, small_demo, tmp_path):
    rows = read_rows(os.path.join(small_demo, "test.csv"))
    first = write_rows(rows[:25], os.path.join(small_demo, "first.csv"))  # beside the media
    rest = write_rows(rows[25:], os.path.join(small_demo, "rest.csv"))
    changed = dict(rows[22], title="small purple dotted ring")  # the item's text was edited
    later = write_rows(rows[20:22] + [changed] + rows[23:], os.path.join(small_demo, "later.csv"))

    assert embed(checkpoint, tmp_path / "both", first, rest) == 0
    assert embed(checkpoint, tmp_path / "whole", os.path.join(small_demo, "test.csv")) == 0
    both, whole = load_item_embeddings(str(tmp_path / "both")), load_item_embeddings(str(tmp_path / "whole"))
    assert both.ids == [r["id"] for r in rows[:25]] + [r["id"] for r in rows[25:]]
    for name in whole.vectors:
        assert torch.equal(both.masks[name], whole.masks[name])
        torch.testing.assert_close(both.vectors[name], whole.vectors[name], rtol=0, atol=1e-5)

    assert embed(checkpoint, tmp_path / "items", first) == 0
    assert embed(checkpoint, tmp_path / "later", later) == 0
    assert embed(checkpoint, tmp_path / "items", later, extra=["--append"]) == 0
    old, new = load_item_embeddings(str(tmp_path / "whole")), load_item_embeddings(str(tmp_path / "later"))
    merged = load_item_embeddings(str(tmp_path / "items"))
    assert merged.ids == [r["id"] for r in rows]
    assert {k: v for k, v in merged.metadata.items() if k != EMBEDDED_AT} == {
        k: v for k, v in old.metadata.items() if k != EMBEDDED_AT}
    times = embedded_times(merged.metadata, "items")  # each manifest's rows, embedded by a run of its own
    assert list(times) == sorted([os.path.abspath(first), os.path.abspath(later)])
    assert times[os.path.abspath(first)] < times[os.path.abspath(later)]
    edited = merged.row_of()[changed["id"]]
    for name in merged.vectors:
        # re-embedded and new items from the later embedding, the others as first embedded
        torch.testing.assert_close(merged.vectors[name][20:], new.vectors[name], rtol=0, atol=0)
        torch.testing.assert_close(merged.vectors[name][:20], old.vectors[name][:20], rtol=0, atol=1e-5)
        assert torch.equal(merged.masks[name][20:], new.masks[name])
    assert (merged.vectors["text"][edited] - old.vectors["text"][edited]).norm() > 1e-3

    # The library functions give what the command wrote, and a save/load round trip changes nothing.
    emb = embed_manifests(checkpoint, [later], batch_size=16, device="cpu", progress=False)
    save_item_embeddings(emb, str(tmp_path / "again"))
    loaded = load_item_embeddings(str(tmp_path / "again"))
    assert loaded.ids == emb.ids == new.ids and loaded.metadata == emb.metadata
    for name in emb.vectors:
        assert torch.equal(loaded.vectors[name], emb.vectors[name]) and torch.equal(loaded.masks[name], emb.masks[name])
        torch.testing.assert_close(emb.vectors[name], new.vectors[name], rtol=0, atol=1e-6)

    # Vectors of another fusion, or a folder that is not there, are refused before any embedding.
    with pytest.raises(RunError, match="fusion"):
        embed(checkpoint, tmp_path / "items", later, extra=["--append", "--fusion-weights", "text=1,image=2,audio=0"])
    with pytest.raises(ConfigError, match="--append"):
        embed(checkpoint, tmp_path / "nowhere", later, extra=["--append"])
    with pytest.raises(RunError, match="is in .*first.csv.*later.csv"):
        embed(checkpoint, tmp_path / "twice", first, later)


def test_weighted_fusion_matches_a_float64_reference(checkpoint, small_demo, tmp_path):
    weights = {"text": 1.0, "image": 2.0, "audio": 0.0}
    assert embed(checkpoint, tmp_path / "items", os.path.join(small_demo, "test.csv"),
                 extra=["--fusion-weights", "text=1,image=2,audio=0"]) == 0
    emb = load_item_embeddings(str(tmp_path / "items"))
    assert emb.metadata["fusion"] == "weighted_mean" and emb.metadata["fusion_weights"] == "audio=0,image=2,text=1"
    fused, present = fused_float64({m: emb.vectors[m] for m in emb.modalities},
                                   {m: emb.masks[m] for m in emb.modalities}, weights)
    assert emb.masks["fused"].tolist() == present.tolist()
    assert (emb.vectors["fused"].double() - fused).abs().max() < FUSED_BOUND

def fields_checkpoint(checkpoint, folder, attributes_weight):
    """The checkpoint's model folder with ``model.fields`` set (as search-log fine-tuning saves it):
    the photo, the title, and colour + kind as one text field of weight ``attributes_weight``."""
    model = shutil.copytree(os.path.join(checkpoint, "model"), folder, dirs_exist_ok=True)
    config = Path(model) / "config.yaml"
    text = config.read_text()
    assert text.count("  fields: {}\n") == 1
    config.write_text(text.replace("  fields: {}\n", (
        "  fields:\n    image: {modality: image, weight: 1.0}\n"
        "    title: {modality: text, columns: [title], weight: 1.0}\n"
        f"    attributes: {{modality: text, columns: [colour, kind], weight: {attributes_weight}}}\n")))
    return str(model)


def test_append_with_a_fields_checkpoint_adds_its_items_and_refuses_other_fields(checkpoint, small_demo, tmp_path):
    model = fields_checkpoint(checkpoint, tmp_path / "fields_model", 2.0)
    rows = read_rows(os.path.join(small_demo, "test.csv"))
    first = write_rows(rows[:20], os.path.join(small_demo, "fields-first.csv"))
    rest = write_rows(rows[20:], os.path.join(small_demo, "fields-rest.csv"))
    assert embed(model, tmp_path / "items", first) == 0
    assert embed(model, tmp_path / "items", rest, extra=["--append"]) == 0
    assert embed(model, tmp_path / "rest", rest) == 0
    merged, alone = load_item_embeddings(str(tmp_path / "items")), load_item_embeddings(str(tmp_path / "rest"))
    assert merged.ids == [r["id"] for r in rows]
    assert merged.metadata["fusion"] == "fields"
    assert merged.metadata["fields"] == "image:image=1,title:text[title]=1,attributes:text[colour+kind]=2"
    for name in merged.vectors:  # the appended rows are those the fields give, bit for bit
        assert torch.equal(merged.vectors[name][20:], alone.vectors[name])
    # Another weight of a field makes other vectors: refused before anything is embedded.
    fields_checkpoint(checkpoint, tmp_path / "fields_model", 3.0)
    with pytest.raises(RunError, match=r"fields is '.*attributes:text\[colour\+kind\]=2' in the existing embeddings "
                                       r"and '.*attributes:text\[colour\+kind\]=3' in the new ones"):
        embed(model, tmp_path / "items", rest, extra=["--append"])
    # A manifest that repeats an id is refused by name on this path too (field by field).
    repeated = write_rows(rows[:5] + rows[2:3], tmp_path / "repeated.csv")
    with pytest.raises(RunError, match=f"duplicate id '{rows[2]['id']}' at .*repeated.csv:4 and .*repeated.csv:7"):
        embed(model, tmp_path / "repeated", repeated)


def test_append_records_every_setting_its_rows_were_embedded_with_and_the_earliest_times():
    existing, new = random_embeddings(10, seed=1), random_embeddings(4, seed=2)
    existing.metadata.update(batch_size="16", device="cpu", torch="2.4.0",
                             embedded_at=json.dumps({"/cat/a.csv": 100, "/cat/b.csv": 300}))
    new.metadata.update(batch_size="8", device="cpu", torch="2.4.0",
                        embedded_at=json.dumps({"/cat/b.csv": 500, "/cat/c.csv": 600}))
    merged = append_item_embeddings(existing, new)
    assert (merged.metadata["batch_size"], merged.metadata["device"], merged.metadata["torch"]) == (
        "16,8", "cpu", "2.4.0")
    assert json.loads(merged.metadata["embedded_at"]) == {"/cat/a.csv": 100, "/cat/b.csv": 300, "/cat/c.csv": 600}
    # Appended to again: each value listed once, in the order first used.
    again = random_embeddings(2, seed=3)
    again.metadata.update(batch_size="16", device="cuda", torch="2.5.0")
    twice = append_item_embeddings(merged, again).metadata
    assert (twice["batch_size"], twice["device"], twice["torch"]) == ("16,8", "cpu,cuda", "2.4.0,2.5.0")


def test_a_bad_manifest_is_an_error_naming_its_rows_not_a_traceback(checkpoint, small_demo, tmp_path, capsys):
    rows = read_rows(os.path.join(small_demo, "test.csv"))[:6]
    repeated = write_rows(rows + rows[2:3], os.path.join(small_demo, "repeated.csv"))
    no_id = write_rows([{("sku" if k == "id" else k): v for k, v in row.items()} for row in rows],
                       os.path.join(small_demo, "no-id.csv"))
    for manifest, message, exit_code in (
            (repeated, f"duplicate id '{rows[2]['id']}' at {repeated}:4 and {repeated}:8; ids must be unique", 1),
            (no_id, f"config error: {no_id}: required id column 'id' is missing", 2)):  # data.columns.id names it
        code = align_main(["embed", "--checkpoint", checkpoint, "--manifest", manifest, "--out",
                           str(tmp_path / "items"), "--device", "cpu"])
        err = capsys.readouterr().err
        assert code == exit_code and f"align embed: {message}" in err and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "items" / "embeddings.safetensors")


def random_embeddings(rows, dim=8, seed=0, ids=None):
    generator = torch.Generator().manual_seed(seed)
    vectors, masks = {}, {}
    for m in ("text", "image"):
        masks[m] = torch.rand(rows, generator=generator) > 0.3
        unit = torch.nn.functional.normalize(torch.randn(rows, dim, generator=generator), dim=1)  # (N, D)
        vectors[m] = unit * masks[m][:, None]
    vectors["fused"], masks["fused"] = fuse(vectors, masks)
    metadata = {"format": FORMAT, "checkpoint": "/models/a", "dim": str(dim), "modalities": "text,image",
                "fusion": "mean"}
    return ItemEmbeddings(ids or [f"item-{seed}-{i}" for i in range(rows)], vectors, masks, metadata)


def test_fuse_is_the_normalised_weighted_mean_of_present_vectors():
    emb = random_embeddings(50)
    vectors = {m: emb.vectors[m] for m in emb.modalities}
    masks = {m: emb.masks[m] for m in emb.modalities}
    masks["text"][:3], masks["image"][:3] = False, False  # items without any modality
    for weights in (None, {"text": 0.5, "image": 3.0}, {"text": 1.0, "image": 0.0}):
        fused, present = fuse(vectors, masks, weights)
        expected, expected_present = fused_float64(vectors, masks, weights)
        assert present.tolist() == expected_present.tolist()
        assert (fused.double() - expected).abs().max() < 10 * 8 * 2.0 ** -24
        assert torch.count_nonzero(fused[~present]) == 0
    with pytest.raises(ConfigError, match="image"):
        fuse(vectors, masks, {"text": 1.0})


def test_loading_a_corrupt_or_mismatched_folder_is_a_run_error_naming_the_file(tmp_path):
    save_item_embeddings(random_embeddings(20), str(tmp_path / "good"))
    assert load_item_embeddings(str(tmp_path / "good")).ids == random_embeddings(20).ids

    truncated = Path(shutil.copytree(tmp_path / "good", tmp_path / "truncated"))
    data = (truncated / "embeddings.safetensors").read_bytes()
    (truncated / "embeddings.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(RunError, match=re.escape(str(truncated / "embeddings.safetensors"))):
        load_item_embeddings(str(truncated))

    garbage = Path(shutil.copytree(tmp_path / "good", tmp_path / "garbage"))
    (garbage / "embeddings.safetensors").write_bytes(b"\x80\x04K\x01.")  # a pickle is refused, not unpickled
    with pytest.raises(RunError, match=re.escape(str(garbage / "embeddings.safetensors"))):
        load_item_embeddings(str(garbage))

    for name, change in [("shorter", lambda d: {**d, "ids": d["ids"][:-1], "count": d["count"] - 1}),
                         ("miscounted", lambda d: {**d, "count": d["count"] + 1}),
                         ("repeated", lambda d: {**d, "ids": d["ids"][:-1] + d["ids"][:1]})]:
        folder = Path(shutil.copytree(tmp_path / "good", tmp_path / name))
        listing = json.loads((folder / "ids.json").read_text())
        (folder / "ids.json").write_text(json.dumps(change(listing)))
        with pytest.raises(RunError, match=re.escape(str(folder / "ids.json"))):
            load_item_embeddings(str(folder))

    missing = Path(shutil.copytree(tmp_path / "good", tmp_path / "missing"))
    os.remove(missing / "ids.json")
    with pytest.raises(RunError, match=re.escape(str(missing / "ids.json"))):
        load_item_embeddings(str(missing))


def test_append_replaces_repeated_ids_and_refuses_another_dimension():
    existing, new = random_embeddings(10, seed=1), random_embeddings(4, seed=2)
    new.ids[1] = existing.ids[7]  # re-embedded item
    merged = append_item_embeddings(existing, new)
    assert merged.ids == existing.ids + [new.ids[0], new.ids[2], new.ids[3]]
    for name in existing.vectors:
        assert torch.equal(merged.vectors[name][7], new.vectors[name][1])
        assert torch.equal(merged.vectors[name][:7], existing.vectors[name][:7])
        assert torch.equal(merged.vectors[name][10:], new.vectors[name][[0, 2, 3]])
        assert torch.equal(merged.masks[name][10:], new.masks[name][[0, 2, 3]])
    assert merged.select([10, 7]).ids == [new.ids[0], existing.ids[7]]
    with pytest.raises(RunError, match="dim 8.* 16"):
        append_item_embeddings(existing, random_embeddings(3, dim=16, seed=3))
    other = random_embeddings(3, seed=4)
    other.metadata["checkpoint"] = "/models/b"
    with pytest.raises(RunError, match="checkpoint"):
        append_item_embeddings(existing, other)


# --- ExactIndex ----------------------------------------------------------------------------------

def unit_rows(rows, dim, seed):
    values = np.random.default_rng(seed).standard_normal((rows, dim))
    return (values / np.linalg.norm(values, axis=1, keepdims=True)).astype(np.float32)


def check_top_k(scores, rows, vectors, queries, k, allowed, exclude):
    """``search``'s answer against a float64 brute force, ties aside: every row may be returned,
    its score is its own, and the j-th score is the j-th best possible one."""
    bound = logit_error(vectors.shape[1], 1.0)
    exact = queries.astype(np.float64) @ vectors.astype(np.float64).T  # (Q, N)
    for q in range(len(queries)):
        candidates = [r for r in np.argsort(-exact[q]) if allowed[r] and r not in set(exclude[q])]
        best = exact[q, candidates[:k]]
        returned = [r for r in rows[q] if r >= 0]
        assert len(returned) == min(k, len(candidates)) and len(set(returned)) == len(returned)
        assert all(allowed[r] and r not in set(exclude[q]) for r in returned)
        assert np.all(np.abs(scores[q, :len(returned)] - exact[q, returned]) <= bound)
        assert np.all(np.abs(scores[q, :len(returned)] - best) <= 2 * bound)
        assert np.all(rows[q, len(returned):] == -1) and np.all(scores[q, len(returned):] == -np.inf)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_index_returns_the_brute_force_top_k(backend, monkeypatch):
    if backend == "faiss":
        pytest.importorskip("faiss")
    else:  # small chunks, so that the running top k is merged over several blocks
        monkeypatch.setattr(index_module, "ROW_CHUNK", 64)
        monkeypatch.setattr(index_module, "QUERY_CHUNK", 7)
    vectors, queries = unit_rows(300, 16, seed=0), unit_rows(20, 16, seed=1)
    allowed = np.random.default_rng(2).random(300) > 0.3
    ids = [f"sku-{i}" for i in range(300)]
    index = ExactIndex(vectors[:200], ids[:200], allowed=allowed[:200], backend=backend)
    index.add(torch.from_numpy(vectors[200:]), ids[200:], allowed=allowed[200:])
    k = 10
    no_exclusion = [[] for _ in queries]
    scores, rows = index.search(queries, k)
    assert scores.dtype == np.float32 and rows.dtype == np.int64 and rows.shape == scores.shape == (20, k)
    check_top_k(scores, rows, vectors, queries, k, allowed, no_exclusion)
    assert index.ids_of(rows) == [[ids[r] for r in row] for row in rows]
    # Excluding each query's current best rows (and some others) still leaves k results.
    exclude = [list(rows[q, : q % 6]) + [int(r) for r in np.random.default_rng(q).integers(0, 300, 3)]
               for q in range(len(queries))]
    scores, rows = index.search(queries.astype(np.float64), k, exclude=exclude)
    check_top_k(scores, rows, vectors, queries, k, allowed, exclude)
    # Fewer allowed rows than k: what there is, then padding.
    small = ExactIndex(vectors[:6], ids[:6], allowed=np.array([1, 1, 0, 1, 1, 1], bool), backend=backend)
    scores, rows = small.search(queries[:3], 8, exclude=[[0], [], [5, 4]])
    check_top_k(scores, rows, vectors[:6], queries[:3], 8, [1, 1, 0, 1, 1, 1], [[0], [], [5, 4]])
    assert small.ids_of(rows)[2] == [ids[r] for r in rows[2] if r >= 0] and len(small.ids_of(rows)[2]) == 3


def test_faiss_and_torch_agree_and_masked_items_are_never_returned():
    pytest.importorskip("faiss")
    emb = random_embeddings(400, dim=16, seed=5)
    queries = unit_rows(30, 16, seed=6)
    results = {}
    for backend in BACKENDS:
        index = ExactIndex.from_embeddings(emb, "image", backend=backend)
        results[backend] = index.search(queries, 15)
        masked = set(np.flatnonzero(~emb.masks["image"].numpy()))
        assert not masked & set(results[backend][1].ravel().tolist())
        check_top_k(*results[backend], emb.vectors["image"].numpy(), queries, 15, emb.masks["image"].numpy(),
                    [[] for _ in queries])
    np.testing.assert_allclose(results["faiss"][0], results["torch"][0], rtol=0, atol=2 * logit_error(16, 1.0))
    with pytest.raises(ValueError, match="already in the index"):
        ExactIndex.from_embeddings(emb).add(emb.vectors["fused"][:1], emb.ids[:1])


@pytest.mark.parametrize("value, text", [
    ("  red scarf ", "red scarf"), ("10.0", "10.0"), ("True", "True"),  # text stays as written, stripped
    (True, "true"), (False, "false"), (np.bool_(True), "true"),  # JSON's words, not Python's
    (10, "10"), (np.int64(-3), "-3"), (10.0, "10"), (-0.0, "0"), (np.float32(7.0), "7"),  # whole: as a JSON 10
    (10.5, "10.5"), (np.float32(0.1), "0.1"), (1e-7, "1e-07"), (float("inf"), "inf"),
    (None, None), ("", None), ("   ", None), (float("nan"), None), (np.float64("nan"), None),  # no value
    ([1, True], "[1, true]"), ({"b": 1, "a": None}, '{"a": null, "b": 1}'),
])
def test_metadata_text_is_the_one_text_form_of_a_value(value, text):
    assert index_module.metadata_text(value) == text


def test_index_metadata_keeps_jsonl_values_as_json_writes_them_and_csv_cells_as_written(tmp_path):
    from align.index.build import read_metadata

    (tmp_path / "a.jsonl").write_text('{"id": "j1", "in_stock": true, "price": 10.0, "size": 2.5, "note": null}\n'
                                      '{"id": "j2", "in_stock": false, "price": 3, "size": " M "}\n')
    (tmp_path / "b.csv").write_text("id,in_stock,price,size,note\nc1,True,10.0, 2.50 ,\n")
    metadata, fields = read_metadata([str(tmp_path / "a.jsonl"), str(tmp_path / "b.csv")], None)
    assert fields == ["in_stock", "price", "size", "note"]
    assert metadata == {"j1": {"in_stock": "true", "price": "10", "size": "2.5"},
                        "j2": {"in_stock": "false", "price": "3", "size": "M"},
                        "c1": {"in_stock": "True", "price": "10.0", "size": "2.50"}}
