"""Training on a search log (data.search_log): rows and their graded positives, batches that carry
them to graded_infonce, multi-field products that are the same vector in training and in
`align embed`, config refusals naming the key, and two processes training the model one does."""
import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from align.config import ConfigError, load_config
from align.fields import fuse
from align.searchlog.log import read_search_log
from align.searchlog.pairs import read_products, training_rows
from align.train.recipe import train
from tests.conftest import REPO, launch_two_processes
from tests.test_train_e2e import tiny_overrides

FIELDS = ["model.fields.image.modality=image", "model.fields.title.modality=text", "model.fields.title.columns=[title]",
          "model.fields.attributes.modality=text", "model.fields.attributes.columns=[colour,kind]",
          "model.fields.attributes.weight=2.0"]


def write_log(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["query", "query_image", "item_id", "event"])
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def shop(small_demo, tmp_path_factory):
    """The small demo catalogue and a simulated search log over it."""
    from data_prep.search_log import main as search_log_main

    root = tmp_path_factory.mktemp("search_log_train")
    manifests = [os.path.join(small_demo, "train.csv"), os.path.join(small_demo, "test.csv")]
    log_dir = str(root / "search")
    assert search_log_main(["simulate", "--catalogue", *manifests, "--new", manifests[1], "--out", log_dir,
                            "--queries", "300", "--val-fraction", "0.2"]) == 0
    return small_demo, manifests, log_dir, root


def search_overrides(shop, out, *extra):
    demo, manifests, log_dir, _ = shop
    return tiny_overrides(demo, out, "data.train=''", f"data.search_log.log={log_dir}/train.csv",
                          f"data.search_log.catalogue=[{manifests[0]},{manifests[1]}]", "data.val=''",
                          "loss.name=graded_infonce", "loss.matryoshka.dims=[8,16,32]", "data.batch_size=32",
                          *FIELDS, *extra)


def test_rows_list_graded_products_best_first(small_demo, tmp_path):
    ids = [row["id"] for row in csv.DictReader(open(os.path.join(small_demo, "train.csv")))]
    log = write_log(tmp_path / "log.csv", [
        {"query": "red star", "item_id": ids[0], "event": "view"},
        {"query": "red star", "item_id": ids[1], "event": "buy"},
        {"query": "red star", "item_id": ids[2], "event": "cart"},
        {"query": "Red  Star", "item_id": ids[0], "event": "cart"},  # the same query: merged to cart
        {"query": "blue ring", "item_id": ids[3], "event": "view"},
    ])
    judged, _ = read_search_log(log, ids)
    graded = training_rows(judged, "graded", max_positives=16)
    assert graded.query.tolist() == [0, 0, 0, 1]
    # grade order, ties in log order: buy (ids[1]), then the two carts (ids[0] first in the log)
    assert graded.item.tolist() == [1, 0, 2, 3]
    assert graded.positives[0][0].tolist() == [1, 0, 2] and graded.positives[0][1].tolist() == [3, 2, 2]
    best = training_rows(judged, "best", max_positives=16)
    assert best.query.tolist() == [0, 1] and best.item.tolist() == [1, 3]
    capped = training_rows(judged, "graded", max_positives=2)
    assert capped.item.tolist() == [1, 0, 3] and capped.positives[0][0].tolist() == [1, 0]


def test_per_query_rows_draw_a_graded_product_by_grade_each_epoch(shop, tmp_path):
    """pairs: per_query: one row per query; its product is one of the query's graded products,
    drawn from (seed, epoch, row) in proportion to the grade: the same on a resume, new each epoch."""
    from align.data.transforms import SampleProcessor
    from align.model import build_model
    from align.searchlog.pairs import SearchPairsDataset, read_training_log

    config = load_config(None, search_overrides(shop, tmp_path / "run", "data.search_log.pairs=per_query"))
    log, products = read_training_log(config)
    rows = training_rows(log, "per_query", max_positives=16)
    assert len(rows.query) == len(set(rows.query.tolist()))  # one row per query
    dataset = SearchPairsDataset(rows, products, SampleProcessor(build_model(config.model).preprocessors(False)),
                                 "log", seed=0, per_query=True)
    many = [n for n, code in enumerate(rows.query) if len(rows.positives[code][0]) >= 3][:20]
    drawn = {epoch: [dataset[(n, epoch)]["item_key"] for n in many] for epoch in range(4)}
    assert drawn[0] == [dataset[(n, 0)]["item_key"] for n in many]  # a re-read draws the same
    assert len({tuple(v) for v in drawn.values()}) > 1  # other epochs, other products
    for n in many:
        keys = rows.positives[rows.query[n]][0].tolist()
        assert all(drawn[epoch][many.index(n)] in keys for epoch in drawn)


def test_batches_carry_queries_fields_and_graded_positives(shop, tmp_path):
    from align.model import build_model
    from align.data.transforms import SampleProcessor
    from align.searchlog.pairs import search_log_loader

    config = load_config(None, search_overrides(shop, tmp_path / "run", "data.search_log.max_positives=4"))
    model = build_model(config.model)
    loader = search_log_loader(config, SampleProcessor(model.preprocessors(train=False)))
    batch = next(loader.iterate(0))
    rows = len(batch["ids"])
    assert rows == 32
    assert set(batch["fields"]["masks"]) == {"image", "title", "attributes"}
    # A field is present exactly where the catalogue has it (the small demo has items without an image).
    catalogue = {}
    for manifest in shop[1]:
        with open(manifest, newline="") as handle:
            catalogue.update({row["id"]: row for row in csv.DictReader(handle)})
    products = [catalogue[sample_id.rsplit("|", 1)[1]] for sample_id in batch["ids"]]
    assert batch["fields"]["masks"]["image"].tolist() == [bool(p["image"]) for p in products]
    assert batch["fields"]["masks"]["title"].all() and batch["fields"]["masks"]["attributes"].all()
    # each row's query is in exactly one modality (text, or a photo / voice query)
    modalities = torch.stack([batch["masks"][m] for m in ("text", "image", "audio")])
    assert modalities.sum(0).eq(1).all() and batch["masks"]["text"].any()
    keys, grades = batch["positive_keys"], batch["positive_grades"]
    assert keys.shape == grades.shape and keys.shape[1] <= 4
    own = (keys == batch["item_keys"][:, None]) & (grades > 0)
    assert own.any(1).all()  # every row lists its own product with a grade
    assert ((keys >= 0) == (grades > 0)).all()  # padding has no grade
    assert torch.equal(batch["groups"], batch["item_keys"])


def assert_products_are_the_embedded_items(objective, model, config, items) -> None:
    """The objective's product vectors for the log's first batch are `align embed`'s fused vectors
    of the same items (``items``). Same weights and inputs; only the batch differs (text padding,
    matmul blocking), so the unit vectors agree to float32 rounding accumulated through a few
    layers."""
    from align.data.transforms import SampleProcessor
    from align.searchlog.pairs import search_log_loader

    batch = next(search_log_loader(config, SampleProcessor(model.preprocessors(train=False))).iterate(0))
    with torch.no_grad():
        products = objective.eval().embed(batch)["product"]
    row_of = {item: n for n, item in enumerate(items.ids)}
    expected = items.vectors["fused"][[row_of[i.split("|")[-1]] for i in batch["ids"]]]
    assert torch.allclose(products, expected, atol=1e-4), (products - expected).abs().max()


def test_product_vector_in_training_is_the_embedded_item_vector(shop, tmp_path):
    """The loss shapes the vector the index searches: the training objective's product vector
    equals `align embed`'s fused vector for the same items (eval mode: no augmentation)."""
    from align.index.embed import embed_manifests
    from align.train.recipe import build_objective

    demo, manifests, _, _ = shop
    summary = train(load_config(None, search_overrides(shop, tmp_path / "run", "train.max_steps=1")))
    checkpoint = summary["checkpoint"]
    items = embed_manifests(checkpoint, manifests, batch_size=64, device="cpu", progress=False)
    assert items.metadata["fusion"] == "fields"
    assert "attributes:text[colour+kind]=2" in items.metadata["fields"]
    # `align embed` of such a checkpoint writes those same vectors (same batch size: bit for bit)
    from align.cli import main as cli_main
    from align.index.vectors import load_item_embeddings

    out = str(tmp_path / "items")
    assert cli_main(["embed", "--checkpoint", checkpoint, "--manifest", *manifests, "--out", out,
                     "--batch-size", "64", "--device", "cpu"]) == 0
    written = load_item_embeddings(out)
    assert written.ids == items.ids and written.metadata["fusion"] == "fields"
    assert torch.equal(written.vectors["fused"], items.vectors["fused"])

    from align.loading import load_model
    model = load_model(checkpoint)
    config = load_config(None, search_overrides(shop, tmp_path / "again"))
    assert_products_are_the_embedded_items(build_objective(model, config), model, config, items)
    # and the fusion is the weighted mean of the normalised fields, not the plain modality mean
    title = items.vectors["text"]  # text = the text fields' own weighted mean
    assert not torch.allclose(items.vectors["fused"], fuse({"t": title, "i": items.vectors["image"]},
                                                           {"t": items.masks["text"], "i": items.masks["image"]})[0])


def test_graded_matryoshka_run_logs_every_width_and_lowers_the_loss(shop, tmp_path):
    summary = train(load_config(None, search_overrides(shop, tmp_path / "run", "train.max_steps=12",
                                                       "optim.lr=3e-3")))
    history = summary["history"]
    assert {"query-product", "query-product@8", "query-product@16", "query-product@32",
            "query-product/top1"} <= set(history[0])
    assert np.mean([h["loss"] for h in history[-3:]]) < np.mean([h["loss"] for h in history[:3]])
    saved = load_config(os.path.join(tmp_path / "run", "config.yaml"))
    assert saved.model.fields["attributes"].weight == 2.0  # the fields travel with the checkpoint


def test_learned_field_weights_move_and_the_checkpoint_fuses_with_the_weights_reached(shop, tmp_path):
    """loss.field_weights: learned: the fields' weights train with the towers and are logged every
    step; each checkpoint's config holds the weights its state reached, so `align embed` of it
    fuses the catalogue with them, as the trained objective fuses a batch."""
    from align.index.embed import embed_manifests
    from align.loading import load_model, read_saved_config, read_tensors
    from align.train.recipe import build_objective

    demo, manifests, _, _ = shop
    overrides = search_overrides(shop, tmp_path / "run", "train.max_steps=12", "loss.field_weights=learned",
                                 "loss.field_weights_lr=0.05")
    summary = train(load_config(None, overrides))
    history = summary["history"]
    names = ["image", "title", "attributes"]
    assert all({f"field_weight/{n}" for n in names} <= set(h) for h in history)
    assert [history[0][f"field_weight/{n}"] for n in names] == pytest.approx([1.0, 1.0, 2.0])  # from the config
    ratios = [h["field_weight/image"] / h["field_weight/title"] for h in (history[0], history[-1])]
    assert abs(ratios[1] - ratios[0]) > 1e-3, ratios  # only the ratios matter to the weighted mean

    checkpoint = summary["checkpoint"]
    state, _ = read_tensors(os.path.join(checkpoint, "model.safetensors"))  # the objective's state
    reached = dict(zip(names, state["field_log_weights"].exp().tolist()))
    saved = read_saved_config(os.path.join(checkpoint, "model"), [])
    assert {n: saved.model.fields[n].weight for n in names} == reached == summary["field_weights"]  # exactly
    assert saved.model.fields["title"].columns == ["title"] and saved.model.fields["image"].modality == "image"

    items = embed_manifests(checkpoint, manifests, batch_size=64, device="cpu", progress=False)
    assert f"attributes:text[colour+kind]={reached['attributes']:g}" in items.metadata["fields"]
    model = load_model(checkpoint)
    objective = build_objective(model, saved)
    objective.load_state_dict(state, strict=True)
    assert_products_are_the_embedded_items(objective, model, load_config(None, overrides), items)


def test_a_tower_without_a_product_field_is_warned_of_naming_it(shop, tmp_path, caplog):
    """The fixture's products have a photo and text fields but no sound, and the model an audio
    tower: voice queries would train against products they are no part of (align.fields)."""
    from align.train.recipe import warn_of_towers_without_fields

    with caplog.at_level("WARNING", logger="align.train"):
        warn_of_towers_without_fields(load_config(None, search_overrides(shop, tmp_path / "run")))
    assert [r.getMessage().split(" has no")[0] for r in caplog.records] == ["model.towers.audio"]
    assert "model.fields.sound={modality: audio" in caplog.records[0].getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="align.train"):
        warn_of_towers_without_fields(load_config(None, search_overrides(
            shop, tmp_path / "run", "model.fields.sound={modality: audio, weight: 0.5}")))
        warn_of_towers_without_fields(load_config(None, search_overrides(  # a field at weight 0 embeds nothing
            shop, tmp_path / "run", "model.fields.sound={modality: audio, weight: 0}", "model.fields.image.weight=0")))
    assert [r.getMessage().split(" has no")[0] for r in caplog.records] == ["model.towers.image", "model.towers.audio"]


@pytest.mark.parametrize("override, key", [
    (["train.accum_steps=2"], "train.accum_steps"),
    (["loss.field_weights=learnt"], "loss.field_weights"),
    (["loss.field_weights=learned", "loss.field_weights_lr=0"], "loss.field_weights_lr"),
    (["loss.field_weights=learned", "model.fields.title.weight=0", "model.fields.attributes.weight=0"],
     "loss.field_weights"),
    (["model.fields.sound.modality=smell"], "model.fields.sound.modality"),
    (["model.fields.body.modality=text"], "model.fields.body.columns"),
    (["data.search_log.catalogue=[]"], "data.search_log.catalogue"),
    (["data.search_log.max_positives=0"], "data.search_log.max_positives"),
])
def test_bad_config_is_refused_naming_the_key(shop, tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, search_overrides(shop, tmp_path / "run", *override))


def test_missing_log_is_refused_before_any_work(shop, tmp_path):
    from align.preflight import check_run_inputs

    config = load_config(None, search_overrides(shop, tmp_path / "run", f"data.search_log.log={tmp_path}/none.csv"))
    with pytest.raises(ConfigError, match=r"data\.search_log\.log"):
        check_run_inputs(config)
    assert not (tmp_path / "run").exists()


@pytest.mark.multiprocess
def test_two_processes_train_the_same_model_as_one(shop, tmp_path):
    extra = ["train.max_steps=2", "optim.warmup_steps=1", "train.save_every=0", "train.keep_checkpoints=1"]
    single = train(load_config(None, search_overrides(shop, tmp_path / "one", *extra)))
    launched = launch_two_processes(os.path.join(REPO, "train.py"),
                                    *search_overrides(shop, tmp_path / "two", *extra, "data.batch_size=16"),
                                    timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert [h["loss"] for h in summary["history"]] == pytest.approx([h["loss"] for h in single["history"]], rel=1e-4)
    a = load_file(os.path.join(single["checkpoint"], "model.safetensors"))
    b = load_file(os.path.join(summary["checkpoint"], "model.safetensors"))
    # as in test_train_distributed: Adam steps of lr 2e-3 differ by rounding of the summation order
    for key in a:
        assert torch.allclose(a[key], b[key], atol=2e-5), (key, (a[key] - b[key]).abs().max())


def test_field_alignment_adds_the_photo_text_infonce_of_the_products(shop, tmp_path):
    """loss.field_alignment w: loss = query-product loss + w * InfoNCE(product photo, product text
    fields fused), over the batch's products; w = 0 adds nothing. Checked against an InfoNCE
    computed here from the objective's own field vectors, in float64."""
    from align.data.transforms import SampleProcessor
    from align.model import build_model
    from align.searchlog.pairs import search_log_loader
    from align.train.recipe import build_objective

    config = load_config(None, search_overrides(shop, tmp_path / "run", "loss.field_alignment=0.5"))
    model = build_model(config.model)
    objective = build_objective(model, config).eval()
    plain = build_objective(model, load_config(None, search_overrides(shop, tmp_path / "plain"))).eval()
    batch = next(search_log_loader(config, SampleProcessor(model.preprocessors(train=False))).iterate(0))
    with torch.no_grad():
        out, base = objective(batch), plain(batch)
        embedded = objective.embed(batch)
    assert "fields:image-text" in out and not any(k.startswith("fields:") for k in base)
    assert "fields:audio-text" not in out  # the fields have no sound
    # the text side fuses title and attributes with their weights, the photo side is the image field
    text, photo = embedded["fields:text"].double(), embedded["fields:image"].double()
    both = (embedded["fields:text_mask"] & embedded["fields:image_mask"]).numpy()
    keys = batch["groups"].numpy()
    scale = float(model.logit_scale().detach())
    logits = scale * photo @ text.T  # (B, B)
    terms = []
    for direction in (logits, logits.T):
        for i in np.flatnonzero(both):
            keep = both & ((keys != keys[i]) | (np.arange(len(keys)) == i))  # the same product elsewhere: not a negative
            terms.append(torch.logsumexp(direction[i][torch.as_tensor(keep)], 0) - direction[i, i])
    expected = torch.stack(terms).mean()
    assert abs(float(out["fields:image-text"]) - float(expected)) < 1e-4 * max(1.0, float(expected))
    assert abs(float(out["loss"]) - float(base["loss"]) - 0.5 * float(out["fields:image-text"])) < 1e-5
    for bad in ("-0.1", "nan"):
        with pytest.raises(ConfigError, match="loss.field_alignment"):
            load_config(None, search_overrides(shop, tmp_path / "bad", f"loss.field_alignment={bad}"))


@pytest.mark.once  # every figure it compares comes from the same kernels
def test_image_pipeline_and_jpeg_draft_reach_search_log_rows(shop, tmp_path):
    """data.image_pipeline and data.jpeg_draft apply to search-log rows as to manifest rows: with
    ``device`` the workers ship each product photo at its stored size with the drawn crop, and a big
    JPEG is decoded at a reduced scale no smaller than the crop needs; two steps train on them."""
    from align.data.transforms import SampleProcessor, draft_side
    from align.model import build_model
    from align.searchlog.pairs import search_log_loader
    from tests.test_jpeg_draft import smooth_jpeg

    extra = ["data.image_pipeline=device", "data.jpeg_draft=true"]
    config = load_config(None, search_overrides(shop, tmp_path / "run", *extra))
    model = build_model(config.model)
    transform = model.preprocessors(train=True)["image"]
    loader = search_log_loader(config, SampleProcessor(model.preprocessors(train=True)))
    photos = next(loader.iterate(0))["fields"]["inputs"]["image"]
    stored = {Image.open(path).size for path in _photo_paths(shop)}
    assert isinstance(photos, dict) and photos["pixels"].dtype == torch.uint8
    assert {tuple(hw[::-1]) for hw in photos["size"].tolist()} <= stored  # (w, h) as stored, not cropped
    big = tmp_path / "big.jpg"
    big.write_bytes(smooth_jpeg(side=1600))
    side = draft_side(transform)
    decoded = loader.dataset._encode("image", str(big), "big", "here")["size"].tolist()
    assert side <= min(decoded) < 1600, (side, decoded)
    summary = train(load_config(None, search_overrides(shop, tmp_path / "trained", "train.max_steps=2", *extra)))
    assert len(summary["history"]) == 2 and all(np.isfinite(h["loss"]) for h in summary["history"])


def _photo_paths(shop):
    demo, manifests, _, _ = shop
    paths = []
    for manifest in manifests:
        with open(manifest, newline="") as handle:
            paths += [os.path.join(demo, row["image"]) for row in csv.DictReader(handle) if row["image"]]
    return paths


def _held_out(shop):
    return f"data.search_log.val={shop[2]}/val.csv"


def test_a_held_out_log_graded_above_the_event_scale_is_scored_on_its_own_scale(shop, tmp_path):
    """A held-out log may grade by a relevance column, above the events' top grade (buy = 3); the
    run's validation takes the log's top as the scale's (it stopped the run with a ValueError at
    its first evaluation)."""
    from align.model import build_model
    from align.searchlog.evaluate import validate_on_log

    ids = [row["id"] for row in csv.DictReader(open(os.path.join(shop[0], "train.csv")))]
    val = tmp_path / "val.csv"
    val.write_text(f"query,item_id,relevance\nred star,{ids[0]},4\nred star,{ids[1]},1\nblue ring,{ids[2]},2\n")
    config = load_config(None, search_overrides(shop, tmp_path / "run", f"data.search_log.val={val}"))
    with torch.no_grad():
        figures = validate_on_log(build_model(config.model).eval(), config, torch.device("cpu"))["search"]
    assert figures["n_queries"] == 2
    assert all(0 <= figures[name] <= 1 for name in ("ndcg@10", "err@10", "mrr"))


@pytest.mark.once  # every figure it compares comes from the same kernels
def test_held_out_log_keeps_the_best_model_and_stops_when_it_no_longer_improves(shop, tmp_path):
    """data.search_log.val is scored at every evaluation; train.best_metric keeps the model of the
    best one in <output_dir>/best/; train.patience stops the run after that many evaluations
    without a new best. With a learning rate too small to change a float32 weight, every
    evaluation ties the first: the run keeps step 2's model and stops at step 6 of 20."""
    from align.loading import load_model
    from align.searchlog.evaluate import validate_on_log

    extra = ["train.max_steps=20", "train.eval_every=2", "optim.lr=1e-12", "optim.warmup_steps=1",
             "train.best_metric=search/ndcg@10", "train.patience=2", _held_out(shop)]
    config = load_config(None, search_overrides(shop, tmp_path / "run", *extra))
    summary = train(config)
    assert summary["steps"] == 6 and summary["stopped_early"] is True
    assert summary["best"]["step"] == 2 and summary["best"]["metric"] == "search/ndcg@10"
    figures = [json.loads((tmp_path / "run" / f"eval-step-{s:08d}.json").read_text())["search"] for s in (2, 4, 6)]
    assert len({f["ndcg@10"] for f in figures}) == 1 and 0 < figures[0]["ndcg@10"] <= 1
    products = read_products(shop[1], config.model.fields, config.data.columns, None)
    held_out, _ = read_search_log(f"{shop[2]}/val.csv", products.ids)
    assert figures[0]["n_queries"] == len(held_out.queries)  # every query of the held-out log, once
    per_modality = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert sum(figures["n_queries"] for entry, figures in per_modality.items() if entry.startswith("search-")) \
        == len(held_out.queries) and "search-text" in per_modality
    best = tmp_path / "run" / "best"
    record = json.loads((best / "best.json").read_text())
    assert record == {"metric": "search/ndcg@10", "value": summary["best"]["value"], "step": 2}
    # best/ is a model folder: loaded fresh, it scores exactly what the run recorded
    model = load_model(str(best), device="cpu")
    with torch.no_grad():
        again = validate_on_log(model, config, torch.device("cpu"))
    assert again["search"]["ndcg@10"] == pytest.approx(record["value"], abs=1e-6)


@pytest.mark.once  # every figure it compares comes from the same kernels
def test_the_best_model_is_the_evaluation_with_the_highest_figure(shop, tmp_path):
    """A run that learns: best/ holds the first evaluation with the highest figure, as eval.json
    and the per-step evaluations show it; without train.patience the run goes to its last step."""
    extra = ["train.max_steps=8", "train.eval_every=2", "optim.lr=3e-3", "train.best_metric=search/mrr",
             _held_out(shop)]
    summary = train(load_config(None, search_overrides(shop, tmp_path / "run", *extra)))
    assert summary["steps"] == 8 and summary["stopped_early"] is False
    values = [json.loads((tmp_path / "run" / f"eval-step-{s:08d}.json").read_text())["search"]["mrr"]
              for s in (2, 4, 6)] + [summary["eval"]["search"]["mrr"]]
    assert summary["best"]["value"] == max(values)
    assert summary["best"]["step"] == 2 * (values.index(max(values)) + 1)
    assert json.loads((tmp_path / "run" / "best" / "best.json").read_text())["step"] == summary["best"]["step"]


@pytest.mark.parametrize("override, key", [
    (["train.best_metric=search/ndcg@5", "HELD_OUT"], "train.best_metric"),  # not a figure it reports
    (["train.best_metric=search/ndcg@10"], "train.best_metric"),  # nothing evaluated: no held-out log
    (["train.patience=3"], "train.patience"),  # patience without a figure to watch
    (["train.patience=-1", "train.best_metric=search/mrr", "HELD_OUT"], "train.patience"),
])
def test_best_metric_and_patience_are_refused_naming_the_key(shop, tmp_path, override, key):
    override = [_held_out(shop) if o == "HELD_OUT" else o for o in override]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, search_overrides(shop, tmp_path / "run", *override))


def test_held_out_log_is_checked_before_any_work(shop, tmp_path):
    from align.preflight import check_run_inputs

    with pytest.raises(ConfigError, match=r"data\.search_log\.val"):  # without a log to train on
        load_config(None, tiny_overrides(shop[0], tmp_path / "run", _held_out(shop)))
    config = load_config(None, search_overrides(shop, tmp_path / "run", f"data.search_log.val={tmp_path}/none.csv"))
    with pytest.raises(ConfigError, match=r"data\.search_log\.val"):
        check_run_inputs(config)
    assert not (tmp_path / "run").exists()


@pytest.mark.once  # every figure it compares comes from the same kernels
def test_patience_counts_on_across_a_resume(shop, tmp_path):
    """The evaluations without a new best are saved with the checkpoint: a run resumed after two
    of them (steps 2 best, 4) stops at its third further one (8), not three after the resume."""
    common = ["train.eval_every=2", "optim.lr=1e-12", "optim.warmup_steps=1", "train.best_metric=search/mrr",
              "train.patience=3", _held_out(shop)]
    first = train(load_config(None, search_overrides(shop, tmp_path / "run", "train.max_steps=4", *common)))
    assert first["steps"] == 4 and first["stopped_early"] is False and first["best"]["step"] == 2
    for leftover in (".best.k1lled00.tmp", ".best.k1lled01.old"):  # a run killed while writing best/
        (tmp_path / "run" / leftover).mkdir()
        (tmp_path / "run" / leftover / "model.safetensors").write_bytes(b"half")
    resumed = train(load_config(None, search_overrides(shop, tmp_path / "run", "train.max_steps=20",
                                                       "train.resume=latest", *common)))
    assert resumed["steps"] == 8 and resumed["stopped_early"] is True and resumed["best"]["step"] == 2
    assert not [n for n in os.listdir(tmp_path / "run") if n.startswith(".best.")]
    assert json.loads((tmp_path / "run" / "best" / "best.json").read_text())["step"] == 2
