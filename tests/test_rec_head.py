"""The recommender head: its loss against a float64 reference, the (history -> next item)
examples against brute force, MMR and the hub penalty on hand-made cases, and the whole path on a simulated shop:
train, evaluate against peers, recommend, add a cold item with no retraining, two processes."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from align.index.vectors import ItemEmbeddings, append_item_embeddings, load_item_embeddings, save_item_embeddings
from align.losses.sampled_softmax import SampledSoftmax
from align.rec.config import load_rec_config
from align.rec.data import last_items, training_examples
from align.rec.interactions import Interactions
from align.rec.rerank import hub_weights, hubness, mmr
from tests.conftest import EPS32, REPO, launch_two_processes


def test_sampled_softmax_matches_a_float64_reference_with_logq_and_repeated_items():
    g = torch.Generator().manual_seed(0)
    users = F.normalize(torch.randn(7, 5, generator=g, dtype=torch.float64), dim=1)
    items = F.normalize(torch.randn(7, 5, generator=g, dtype=torch.float64), dim=1)
    item_ids = torch.tensor([3, 1, 3, 0, 2, 1, 4])  # rows 0/2 and 1/5 hold the same item
    items[2], items[5] = items[0], items[1]
    log_q = torch.log(torch.tensor([0.1, 0.3, 0.2, 0.3, 0.1], dtype=torch.float64))[item_ids]
    scale = 20.0
    expected = 0.0
    for i in range(7):  # the definition, row by row
        logits = [scale * float(users[i] @ items[j]) - float(log_q[j]) for j in range(7)
                  if j == i or item_ids[j] != item_ids[i]]
        positive = scale * float(users[i] @ items[i]) - float(log_q[i])
        expected += math.log(sum(math.exp(z) for z in logits)) - positive
    expected /= 7
    loss = SampledSoftmax(gather=False)(users, items, logit_scale=torch.tensor(scale, dtype=torch.float64),
                                        log_q=log_q, groups=item_ids)["loss"]
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    # float32 inputs: 7 logits of size-5 unit vectors at scale 20 (each within 20 * 8 eps of the
    # exact cosine), a logsumexp and a mean: well inside 1e3 eps of the loss's magnitude
    loss32 = SampledSoftmax(gather=False)(users.float(), items.float(), logit_scale=torch.tensor(scale),
                                          log_q=log_q.float(), groups=item_ids)["loss"]
    assert loss32.item() == pytest.approx(expected, abs=1e3 * EPS32 * max(1.0, abs(expected)))


def interactions(users, items, times, n_users, n_items):
    return Interactions(users=np.asarray(users, dtype=np.int64), items=np.asarray(items, dtype=np.int64),
                        times=np.asarray(times, dtype=np.float64), weights=np.ones(len(users), dtype=np.float32),
                        events=None, user_ids=[f"u{i}" for i in range(n_users)],
                        item_ids=[f"i{i}" for i in range(n_items)])


def test_training_examples_are_each_users_previous_items_in_time_order():
    rng = np.random.default_rng(0)
    users = rng.integers(0, 5, 60)
    items = rng.integers(0, 9, 60)
    times = rng.permutation(60).astype(float)
    log = interactions(users, items, times, 5, 9)
    histories, targets = training_examples(log, history=3)
    got = sorted(zip(targets.tolist(), map(tuple, histories.tolist())))
    expected = []
    for user in range(5):  # brute force: each interaction with the <= 3 before it, left-padded
        mine = sorted((t, i) for u, i, t in zip(users, items, times) if u == user)
        for n, (_, item) in enumerate(mine):
            before = [i for _, i in mine[max(0, n - 3):n]]
            expected.append((int(item), tuple([-1] * (3 - len(before)) + before)))
    assert got == sorted(expected)
    last = last_items(log, history=3)
    for user in range(5):
        mine = [i for _, i in sorted((t, i) for u, i, t in zip(users, items, times) if u == user)][-3:]
        assert last[user].tolist() == [-1] * (3 - len(mine)) + mine


def test_mmr_picks_by_relevance_minus_similarity_to_the_picked():
    vectors = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # items 0 and 1 are the same look
    scores = torch.tensor([[0.9, 0.85, 0.5]])
    candidates = torch.tensor([[0, 1, 2]])
    assert mmr(scores, candidates, vectors, 3, lam=1.0).tolist() == [[0, 1, 2]]
    # lambda 0.5: after item 0, item 1 is worth 0.5*0.85 - 0.5*1 = -0.075, item 2 0.5*0.5 - 0 = 0.25
    assert mmr(scores, candidates, vectors, 3, lam=0.5).tolist() == [[0, 2, 1]]
    # a pool shorter than k pads with -1
    assert mmr(torch.tensor([[0.3, -torch.inf, -torch.inf]]), candidates, vectors, 2, lam=0.5).tolist() == [[0, -1]]


def test_hubness_is_the_mean_cosine_to_the_nearest_users_and_weights_grow_with_history():
    items = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    users = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    # item 0: cosines 1, 0.8, 0 -> best two 1 and 0.8; item 1: 0, 0.6, 1; item 2: 0.6, 0.96, 0.8
    expected = torch.tensor([0.9, 0.8, 0.88])
    assert torch.allclose(hubness(items, users, k=2, chunk=2), expected, atol=1e-6)
    assert torch.allclose(hubness(items, users, k=10), items.mm(users.T).mean(1), atol=1e-6)  # k capped at M
    weights = hub_weights(torch.tensor([0, 1, 4, 12]), strength=2.0, half_history=4.0)
    assert torch.allclose(weights, torch.tensor([0.0, 0.4, 1.0, 1.5]))
    assert torch.equal(hub_weights(torch.tensor([0, 3]), 2.0, 0.0), torch.tensor([2.0, 2.0]))


# ---------------------------------------------------------------- the whole path on a simulated shop

ATTRIBUTES = ("kind", "colour", "pattern", "size")


def attribute_vectors(values):
    """A stand-in aligned space: items one-hot over their attribute values, plus a little noise
    (the real path, `align embed` with a checkpoint, is tested in test_index.py)."""
    vocab = sorted({(a, v) for a in ATTRIBUTES for v in values[a]})
    column = {key: n for n, key in enumerate(vocab)}
    n = len(values[ATTRIBUTES[0]])
    x = torch.zeros(n, len(vocab) + 8)
    for a in ATTRIBUTES:
        for row, v in enumerate(values[a]):
            x[row, column[(a, v)]] = 1.0
    x[:, len(vocab):] = 0.1 * torch.randn(n, 8, generator=torch.Generator().manual_seed(0))
    return F.normalize(x, dim=1)


def embeddings_for(ids, vectors):
    mask = torch.ones(len(ids), dtype=torch.bool)
    meta = {"format": "align-item-embeddings/1", "checkpoint": "synthetic", "dim": str(vectors.shape[1]),
            "modalities": "text", "fusion": "mean"}
    return ItemEmbeddings(list(ids), {"text": vectors, "fused": vectors.clone()}, {"text": mask, "fused": mask.clone()},
                          meta)


@pytest.fixture(scope="module")
def shop(small_demo, tmp_path_factory):
    """The small demo catalogue, its attribute vectors as item embeddings, 400 simulated users."""
    from data_prep.shop_sim import main as shop_sim
    from align.rec.interactions import read_catalogue_columns

    out = tmp_path_factory.mktemp("shop")
    manifests = [os.path.join(small_demo, "train.csv"), os.path.join(small_demo, "test.csv")]
    assert shop_sim(["--catalogue", *manifests, "--new", manifests[1], "--out", str(out / "shop"),
                     "--users", "400", "--seed", "0"]) == 0
    ids, values = read_catalogue_columns(manifests, ATTRIBUTES)
    save_item_embeddings(embeddings_for(ids, attribute_vectors(values)), str(out / "items"))
    return {"root": out, "manifests": manifests, "ids": ids, "values": values}


def rec_overrides(shop, out, *extra):
    return [f"data.interactions={shop['root'] / 'shop' / 'interactions.csv'}",
            f"data.catalogue=[{','.join(shop['manifests'])}]", f"data.items={shop['root'] / 'items'}",
            f"train.output_dir={out}", "train.epochs=3", "train.batch_size=64", "train.wandb=disabled",
            "train.progress=false", "head.dim=32", "head.hidden=64", "rerank.pool=30", *extra]


@pytest.fixture(scope="module")
def trained(shop):
    from align.rec.train import train_head

    out = shop["root"] / "head"
    summary = train_head(load_rec_config(None, rec_overrides(shop, out)))
    return out, summary


def test_the_head_trains_and_is_saved_without_pickle(trained):
    out, summary = trained
    assert {"head.safetensors", "rec_config.yaml", "items.json", "summary.json",
            "reference_users.safetensors"} <= set(os.listdir(out))
    losses = [h["loss"] for h in summary["history"]]
    assert losses[-1] < losses[0]  # it learns something from the log
    assert summary["examples"] > 0 and summary["steps"] == 3 * (summary["examples"] // 64)


def test_rec_eval_reports_every_segment_for_the_head_and_its_peers(trained):
    from align.rec.evaluate import main as rec_eval

    out, _ = trained
    assert rec_eval(["--checkpoint", str(out), "--peers", "most_pop,content_knn"]) == 0
    report = json.loads((out / "rec_eval.json").read_text())
    for segment in ("all", "warm", "cold_items"):
        assert set(report["segments"][segment]) == {"ours", "most_pop", "content_knn"}
        for name, figures in report["segments"][segment].items():
            assert 0 <= figures["ndcg@10"] <= 1 and 0 <= figures["recall@10"] <= 1
            assert 0 < figures["coverage@10"] <= 1 or (name, segment) == ("most_pop", "cold_items")
    # popularity cannot rank items nobody touched in training: its cold-item lists hold nothing
    assert report["segments"]["cold_items"]["most_pop"]["ndcg@10"] == 0
    assert report["segments"]["cold_items"]["most_pop"]["coverage@10"] == 0
    assert report["segments"]["cold_items"]["ours"]["ndcg@10"] > 0
    assert [p["mmr_lambda"] for p in report["mmr_sweep"]] == [1.0, 0.99, 0.97, 0.95, 0.93, 0.9, 0.8, 0.5]
    assert (out / "rec_mmr.png").stat().st_size > 0 and (out / "rec_recall.png").stat().st_size > 0


def with_config(out, folder, **sections):
    """A copy of the trained head whose saved config has ``sections`` updated (section -> keys)."""
    import shutil

    import yaml

    shutil.copytree(out, folder)
    config = yaml.safe_load((folder / "rec_config.yaml").read_text())
    for section, values in sections.items():
        config[section].update(values)
    (folder / "rec_config.yaml").write_text(yaml.safe_dump(config))
    return folder


def test_rec_eval_shows_the_cut_offs_it_measured_and_refuses_an_unknown_peer_before_reading(trained, tmp_path,
                                                                                           capsys):
    from align.cli import main as cli

    out, _ = trained
    folder = with_config(out, tmp_path / "ks", eval={"ks": [5, 20]}, rerank={"pool": 30})
    assert cli(["rec-eval", "--checkpoint", str(folder), "--peers", "most_pop"]) == 0  # no @10 to show: @20
    table = capsys.readouterr().out
    assert "NDCG@20" in table and "NDCG@10" not in table and (folder / "rec_mmr.png").stat().st_size > 0
    report = json.loads((folder / "rec_eval.json").read_text())
    assert report["ks"] == [5, 20] and "ndcg@20" in report["segments"]["all"]["ours"]
    (folder / "rec_eval.json").unlink()
    assert cli(["rec-eval", "--checkpoint", str(folder), "--peers", "most_pop,most_popp"]) == 2
    assert "--peers: unknown recommender 'most_popp'" in capsys.readouterr().err
    assert not (folder / "rec_eval.json").exists()


def test_rec_eval_never_ranks_an_item_that_align_recommend_cannot_return(trained, shop, tmp_path):
    """An item without the head's vector (its modality missing) is never recommended, so the
    evaluated lists leave it out too: they are the lists the service would show."""
    from align.rec.data import load_rec_data, seen_items
    from align.rec.evaluate import HeadMethod, segment_users, top_lists
    from align.rec.recommend import Recommender

    out, _ = trained
    vectors = load_item_embeddings(str(shop["root"] / "items"))
    absent = np.arange(0, len(vectors.ids), 7)  # every seventh item lost its vector
    for modality in vectors.vectors:
        vectors.vectors[modality][absent] = 0
        vectors.masks[modality][absent] = False
    save_item_embeddings(vectors, str(tmp_path / "items"))
    folder = with_config(out, tmp_path / "head")
    meta = json.loads((folder / "items.json").read_text())
    (folder / "items.json").write_text(json.dumps({**meta, "items": str(tmp_path / "items")}))
    rec = Recommender.load(str(folder))
    data = load_rec_data(rec.config)
    method = HeadMethod(rec, data)
    gone = np.flatnonzero(~rec.present.numpy()[method.to_recommender])  # catalogue codes
    assert len(gone) == len(absent)
    seen = seen_items(data.split.train)
    segments = segment_users(data, seen)
    rows = top_lists(method, segments, seen, 20, 64)["all"][1]
    assert (rows >= 0).any() and not np.isin(rows, gone).any()


def test_a_new_item_is_recommended_after_align_embed_with_no_retraining(trained, shop, capsys):
    from align.rec.recommend import Recommender, main as recommend

    out, _ = trained
    ids = shop["ids"]
    history = ids[:3]
    before = Recommender.load(str(out))
    rows, _ = before.recommend([before.rows_of(history, "test")], len(ids))
    ranked = [before.item_ids[r] for r in rows[0] if r >= 0]
    # the best-ranked item the head has no ID for (no training interaction): content alone
    cold = next(i for i in ranked if before.id_rows[before.item_ids.index(i)] < 0)
    # a new product that looks exactly like it arrives through `align embed --append`
    vectors = load_item_embeddings(str(shop["root"] / "items"))
    new = embeddings_for(["brand-new"], vectors.vectors["fused"][vectors.row_of()[cold]][None].clone())
    items = shop["root"] / "items-plus"
    save_item_embeddings(append_item_embeddings(vectors, new), str(items))
    k = ranked.index(cold) + 2
    assert recommend(["--checkpoint", str(out), "--items", str(items), "--history", ",".join(history), "-k", str(k),
                      "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["results"]
    scores = {entry["id"]: entry["score"] for entry in listed}
    assert "brand-new" in scores and cold in scores and not set(history) & set(scores)
    assert scores["brand-new"] == pytest.approx(scores[cold], abs=1e-6)  # the same content, the same score
    # the head folder's own items (no --items) do not know it
    assert recommend(["--checkpoint", str(out), "--history", ",".join(history), "-k", str(k), "--json"]) == 0
    assert "brand-new" not in {entry["id"] for entry in json.loads(capsys.readouterr().out)["results"]}


def with_rerank(out, folder, **rerank):
    """A copy of the trained head whose saved config re-ranks with ``rerank``."""
    import shutil

    import yaml

    shutil.copytree(out, folder)
    config = yaml.safe_load((folder / "rec_config.yaml").read_text())
    config["rerank"].update(rerank)
    (folder / "rec_config.yaml").write_text(yaml.safe_dump(config))
    return folder


def test_recommend_and_rec_eval_rank_by_cosine_minus_the_users_hub_penalty(trained, tmp_path):
    """Against a float64 reference built from the saved files: each list is a top k of
    cos(u, i) - w(n_u) * r(i), and rec-eval scores users exactly as recommend ranks them."""
    from safetensors.torch import load_file

    from align.rec.data import load_rec_data
    from align.rec.evaluate import HeadMethod
    from align.rec.recommend import Recommender

    out, _ = trained
    folder = with_rerank(out, tmp_path / "hub", hub_penalty=1.5, hub_k=5, hub_half_history=2.0, pool=200)
    rec = Recommender.load(str(folder))
    users64 = load_file(str(folder / "reference_users.safetensors"))["users"].double()
    items64 = rec.item_vectors.double()
    r64 = (items64 @ users64.T).topk(5, dim=1).values.mean(1)  # (N,)
    assert torch.allclose(rec.hub.double(), r64, atol=1e-5)
    data = load_rec_data(rec.config)
    method = HeadMethod(rec, data)
    # float32 cosines of unit vectors of width 32 and a mean of 5 of them: |error| far below 1e-5
    bound = 1e-5
    for user in np.flatnonzero(method.lengths > 0)[:20]:
        hist = method.histories[user][method.histories[user] >= 0]
        history = [int(method.to_recommender[c]) for c in hist]
        n = int(method.lengths[user])
        padded = np.full((1, rec.config.head.history), -1, dtype=np.int64)
        padded[0, -len(history):] = history
        u64 = rec.user_vectors(padded)[0].double()
        w = 1.5 * n / (n + 2.0)
        ref = items64 @ u64 - w * r64  # (N,)
        evaluated = method.scores(np.array([user]))[0]  # catalogue order
        assert np.allclose(evaluated, ref[method.to_recommender].numpy(), atol=bound)
        # recommend() with the full history (its length is n, repeats included)
        full = [int(method.to_recommender[c]) for c in data.split.train.items[data.split.train.users == user]]
        rows, _ = rec.recommend([full], 10)
        allowed = torch.ones(len(ref), dtype=torch.bool)
        allowed[full] = False
        kth = ref[allowed].topk(10).values[-1]
        assert all(ref[r] >= kth - bound for r in rows[0]) and not set(rows[0].tolist()) & set(full)


def test_the_hub_penalty_without_the_saved_users_is_an_error_naming_the_file(trained, tmp_path):
    from align.errors import RunError
    from align.rec.recommend import Recommender

    out, _ = trained
    folder = with_rerank(out, tmp_path / "hub", hub_penalty=1.0)
    (folder / "reference_users.safetensors").unlink()
    with pytest.raises(RunError, match="reference_users.safetensors: missing"):
        Recommender.load(str(folder))
    assert Recommender.load(str(with_rerank(out, tmp_path / "off", hub_penalty=0.0))).hub.abs().sum() == 0


def test_an_unknown_history_item_is_an_error_naming_it(trained):
    from align.cli import main

    out, _ = trained
    assert main(["recommend", "--checkpoint", str(out), "--history", "nope-1", "-k", "5"]) == 1


def test_align_recommend_prints_the_history_and_items_with_their_catalogue_cells(trained, shop, capsys):
    import csv

    from align.cli import main

    out, _ = trained
    rows = {}
    for manifest in shop["manifests"]:
        with open(manifest, newline="", encoding="utf-8") as handle:
            rows.update({row["id"]: row for row in csv.DictReader(handle)})
    history = shop["ids"][:7]
    assert main(["recommend", "--checkpoint", str(out), "--history", ",".join(history), "-k", "4"]) == 0
    text = capsys.readouterr().out
    head, table = text.split("\n\n")
    assert head.splitlines()[0] == "history: 7 items, the last 5:"
    assert [line.split()[0] for line in head.splitlines()[1:]] == history[-5:]
    assert all(line.split(None, 1)[1] == rows[line.split()[0]]["title"] for line in head.splitlines()[1:])
    lines = table.splitlines()[1:]
    assert lines[0].split()[:4] == ["rank", "cosine", "item", "title"] and len(lines) == 5
    for rank, line in enumerate(lines[1:], 1):
        number, _, item, title = line.split(None, 3)
        assert int(number) == rank and title == rows[item]["title"] and item not in history

    assert main(["recommend", "--checkpoint", str(out), "--history", history[0], "-k", "2", "--show", "kind,colour"]) == 0
    lines = capsys.readouterr().out.split("\n\n")[1].splitlines()[1:]
    assert lines[0].split() == ["rank", "cosine", "item", "kind", "colour"]
    assert all(line.split()[3:] == [rows[line.split()[2]]["kind"], rows[line.split()[2]]["colour"]] for line in lines[1:])
    assert main(["recommend", "--checkpoint", str(out), "--history", history[0], "-k", "2", "--show", "price"]) == 1
    assert "column 'price' is missing" in capsys.readouterr().err


def test_a_history_needs_no_catalogue_unless_its_columns_are_asked_for(trained, tmp_path, capsys):
    import yaml

    from align.cli import main

    out, _ = trained
    moved = with_rerank(out, tmp_path / "head")  # the catalogue manifests it names are gone
    config = yaml.safe_load((moved / "rec_config.yaml").read_text())
    config["data"]["catalogue"] = [str(tmp_path / "gone.csv")]
    (moved / "rec_config.yaml").write_text(yaml.safe_dump(config))
    history = ",".join(load_item_embeddings(config["data"]["items"]).ids[:3])
    assert main(["recommend", "--checkpoint", str(moved), "--history", history, "-k", "2"]) == 0
    lines = capsys.readouterr().out.split("\n\n")[1].splitlines()[1:]
    assert lines[0].split() == ["rank", "cosine", "item"] and len(lines) == 3
    assert main(["recommend", "--checkpoint", str(moved), "--history", history, "-k", "2", "--show", "title"]) == 1
    assert "gone.csv" in capsys.readouterr().err


@pytest.mark.multiprocess
def test_two_processes_train_the_same_head_as_one(shop, tmp_path):
    from align.rec.train import train_head

    exact = ["head.dropout=0", "head.id_dropout=0", "train.log_every=1", "train.epochs=1"]
    single = train_head(load_rec_config(None, rec_overrides(shop, tmp_path / "one", *exact)))
    two = rec_overrides(shop, tmp_path / "two", *exact)
    two = [o.replace("train.batch_size=64", "train.batch_size=32") for o in two]
    launched = launch_two_processes(os.path.join(REPO, "align", "cli.py"), "rec-train", *two, timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["global_batch"] == 64 and summary["steps"] == single["steps"]
    ones = [h["loss"] for h in single["history"]]
    twos = [h["loss"] for h in summary["history"]]
    assert twos == pytest.approx(ones, rel=1e-4)  # float32 summation order aside, the same steps


def test_every_peer_runs_on_the_same_split_and_scores_cold_items_only_if_it_can(trained):
    """The real libraries (cornac, implicit) on our split: collaborative models cannot rank an
    item nobody touched in training, so their cold-item figures are 0; content-kNN's are not."""
    from align.rec.baselines import PEERS
    from align.rec.evaluate import evaluate_head

    out, _ = trained
    report = evaluate_head(str(out), list(PEERS), str(out / "all_peers.json"), plots=False)
    assert set(report["segments"]["warm"]) == {"ours", *PEERS}
    for name in PEERS:
        warm, cold = report["segments"]["warm"][name], report["segments"]["cold_items"][name]
        assert 0 <= warm["ndcg@10"] <= 1
        if name != "content_knn":
            assert cold["ndcg@10"] == 0 and cold["coverage@10"] == 0, name
    assert report["segments"]["cold_items"]["content_knn"]["ndcg@10"] > 0
    # popularity is popularity, whichever library computes it
    assert report["segments"]["warm"]["cornac_mostpop"]["ndcg@10"] == pytest.approx(
        report["segments"]["warm"]["most_pop"]["ndcg@10"], abs=0.02)


# --- head.fusion: learned ---------------------------------------------------------------------

def two_modality_embeddings(ids, text, image, image_mask):
    """Item embeddings with a text and an image modality (image missing where ``image_mask`` is
    False) and their plain-mean fused vector, as `align embed` writes them."""
    from align.index.vectors import fuse

    text_mask = torch.ones(len(ids), dtype=torch.bool)
    image = image * image_mask[:, None]
    vectors, masks = {"text": text, "image": image}, {"text": text_mask, "image": image_mask}
    fused, present = fuse(vectors, masks)
    meta = {"format": "align-item-embeddings/1", "checkpoint": "synthetic", "dim": str(text.shape[1]),
            "modalities": "text,image", "fusion": "mean"}
    return ItemEmbeddings(list(ids), {**vectors, "fused": fused}, {**masks, "fused": present}, meta)


@pytest.fixture(scope="module")
def noisy_items(shop):
    """The shop's items with two modalities: text = the attribute vectors (what the simulated users
    choose by), image = pure noise: each item gets one of 4 random unit vectors by a coin that
    ignores the item, so it tells neither the item's attributes nor, for a warm item, which item it
    is (per-item random vectors would act as ID vectors). One item in 10 has no image."""
    text = attribute_vectors(shop["values"])
    g = torch.Generator().manual_seed(1)
    choices = F.normalize(torch.randn(4, text.shape[1], generator=g), dim=1)
    image = choices[torch.randint(0, 4, (len(text),), generator=g)]
    image_mask = torch.rand(len(text), generator=g) >= 0.1
    folder = shop["root"] / "items-two"
    save_item_embeddings(two_modality_embeddings(shop["ids"], text, image, image_mask), str(folder))
    return folder


def test_learned_fusion_starts_as_the_mean_align_embed_computes():
    from align.index.vectors import fuse
    from align.rec.head import ModalityFusion

    g = torch.Generator().manual_seed(0)
    n, d, names = 50, 16, ("image", "text", "audio")
    vectors = {m: F.normalize(torch.randn(n, d, generator=g), dim=1) for m in names}
    masks = {m: torch.rand(n, generator=g) > 0.3 for m in names}
    for m in names:
        masks[m][0] = False  # item 0 has no modality: a zero vector, as embed gives it
        vectors[m] = vectors[m] * masks[m][:, None]
    stacked = torch.stack([vectors[m] for m in names], dim=1)  # (N, M, D)
    stacked_masks = torch.stack([masks[m] for m in names], dim=1)  # (N, M)
    fused = ModalityFusion(names)(stacked, stacked_masks)
    # float64 reference: the plain mean of the unit vectors an item has, normalised
    v64, m64 = stacked.double(), stacked_masks.double()
    mean64 = (v64 * m64[..., None]).sum(1) / m64.sum(1, keepdim=True).clamp(min=1)
    ref = mean64 / mean64.norm(dim=1, keepdim=True).clamp(min=1e-300)
    # unit-scale entries through a normalise per modality (d + 3 roundings each), a sum of M terms,
    # a division and the final normalise (d + 3 more): far below (M + 2) * (d + 4) * EPS32
    bound = (len(names) + 2) * (d + 4) * EPS32
    assert (fused.double() - ref).abs().max() <= bound
    assert fused[0].abs().sum() == 0 and torch.equal(fused.norm(dim=1) > 0, stacked_masks.any(1))
    expected, present = fuse(vectors, masks)
    assert (fused - expected).abs().max() <= bound and torch.equal(present, stacked_masks.any(1))


def test_learned_fusion_needs_the_fused_modality_and_two_modalities(shop, tmp_path):
    from align.errors import ConfigError
    from align.rec.data import load_rec_data

    with pytest.raises(ConfigError, match="head.fusion"):
        load_rec_config(None, rec_overrides(shop, tmp_path, "head.fusion=learned", "head.modality=text"))
    one = load_rec_config(None, rec_overrides(shop, tmp_path, "head.fusion=learned"))  # items: text only
    with pytest.raises(ConfigError, match=r"head.fusion.*data.items"):
        load_rec_data(one)


@pytest.fixture(scope="module")
def trained_learned(shop, noisy_items):
    from align.rec.train import train_head

    # No ID vectors (content alone must score) and a faster, undecayed lr: in 3 epochs the weights
    # move well clear of their start (text 0.63-0.71 over seeds 0-2; 0.58 with IDs at lr 3e-3)
    out = shop["root"] / "head-learned"
    summary = train_head(load_rec_config(None, rec_overrides(
        shop, out, "head.fusion=learned", f"data.items={noisy_items}", "head.id_embeddings=false", "train.lr=1e-2",
        "train.weight_decay=0")))
    return out, summary


def test_a_learned_fusion_head_reloads_with_the_same_item_vectors_and_reports_its_weights(trained_learned):
    from safetensors.torch import load_file

    from align.rec.data import item_features, load_rec_data, popularity_scale
    from align.rec.head import RecHead
    from align.rec.recommend import Recommender

    out, summary = trained_learned
    weights = summary["fusion_weights"]
    assert list(weights) == ["text", "image"] == json.loads((out / "items.json").read_text())["modalities"]
    assert sum(weights.values()) == pytest.approx(1, abs=1e-6) and all(w > 0 for w in weights.values())
    rec = Recommender.load(str(out))
    assert rec.fusion_weights() == pytest.approx(weights, abs=0)
    # the training path: the same features from load_rec_data, the saved head on them
    data = load_rec_data(rec.config)
    features = item_features(data.content, data.train_counts, popularity_scale(data.train_counts),
                             rec.config.head.popularity_feature, data.modality_vectors, data.modality_masks)
    head = RecHead(features.shape[1], len(data.item_ids), rec.config.head, data.modalities)
    head.load_state_dict(load_file(str(out / "head.safetensors")))
    head.eval()
    with torch.no_grad():
        trained = head.encode_items(features, data.id_rows)  # (N, dim) catalogue order
    rows = rec.rows_of(data.item_ids, "test")
    assert torch.equal(rec.item_vectors[rows], trained)  # the same float32 operations on the same inputs
    # and against float64: the weighted mean of the saved weights, then the adapter in float64
    w64 = torch.tensor([weights["text"], weights["image"]], dtype=torch.float64)
    masks64 = data.modality_masks.double() * w64  # (N, M)
    fused64 = (data.modality_vectors.double() * masks64[..., None]).sum(1) / masks64.sum(1, keepdim=True)
    fused64 = F.normalize(fused64, dim=1)
    head64 = head.double()
    with torch.no_grad():
        x64 = head64.items.adapter(torch.cat([fused64, features[:, -1:].double()], dim=1))  # no ID vectors here
    ref = F.normalize(x64, dim=1)
    # float32 through a normalise and two small matrix products (width <= 64 + 33): a few hundred
    # roundings of unit-scale terms, far below 1e-4; a wrong modality order or mask is off by O(0.1)
    assert (rec.item_vectors[rows].double() - ref).abs().max() < 1e-4


def test_a_learned_fusion_head_scores_an_appended_item_and_refuses_other_modalities(trained_learned, noisy_items,
                                                                                     shop):
    from align.errors import RunError
    from align.rec.recommend import Recommender

    out, _ = trained_learned
    rec = Recommender.load(str(out))
    cold = next(r for r in range(len(rec.item_ids)) if rec.id_rows[r] < 0)
    existing = load_item_embeddings(str(noisy_items))
    row = existing.row_of()[rec.item_ids[cold]]
    new = existing.select([row])
    new.ids = ["brand-new"]
    folder = shop["root"] / "items-two-plus"
    save_item_embeddings(append_item_embeddings(existing, new), str(folder))
    plus = Recommender.load(str(out), str(folder))
    assert plus.item_ids[-1] == "brand-new"
    assert torch.equal(plus.item_vectors[-1], plus.item_vectors[cold])  # same modalities, same vector
    with pytest.raises(RunError, match=r"modalities text.*fuses text, image"):
        Recommender.load(str(out), str(shop["root"] / "items"))  # a text-only folder


def test_the_learned_weight_of_the_informative_modality_ends_higher(trained_learned):
    """text carries what users choose by, image is noise: training moves weight from image to text
    (from 0.5 each at init)."""
    _, summary = trained_learned
    weights = summary["fusion_weights"]
    assert weights["text"] > 0.55 > weights["image"], weights
