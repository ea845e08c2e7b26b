"""Explanations (align/explain): history contributions equal hand-computed leave-one-out and
gradient x input values and a float64 reference; modality shares sum to the score they split
(fused cosine with its rest, or the head's score with its base; tests/test_explain_widths.py for
catalogues cut with --dim or embedded by fields); the explanation's top history item matters
more than a random other one for >= 80% of simulated users and the top attribute word finds the
simulated taste well above chance; `align recommend --explain` and `align search --explain` print
text; a real uvicorn server answers `"explain": true` with structured JSON and refuses a bad
value naming the field."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from align.rec.faithfulness import faithfulness, simulated_tastes, taste_match
from align.explain.history import history_contributions
from align.explain.modalities import linear_shares, shapley_shares
from align.explain.words import Terms, WordProbe, catalogue_terms
from align.index.vectors import ItemEmbeddings
from align.rec.config import HeadConfig, RecConfig
from align.rec.head import RecHead
from align.rec.recommend import Recommender
from tests.conftest import EPS32
from tests.test_rec_head import ATTRIBUTES, shop, trained  # noqa: F401
from tests.test_search import checkpoint  # noqa: F401
from tests.test_serve import SCORE_BOUND, head, items, server  # noqa: F401


def hand_recommender(model, content, features=None, ids=None):
    """A ``Recommender`` over ``content`` (N, Dc) with the head ``model``, built in memory (no files), no rerank."""
    features = content if features is None else features
    model.eval()
    count = len(content)
    id_rows = torch.full((count,), -1, dtype=torch.long)
    with torch.no_grad():
        vectors = model.encode_items(features, id_rows)
    return Recommender(head=model, config=RecConfig(head=model.config), item_ids=ids or [f"i{n}" for n in range(count)],
                       content=content, features=features, present=torch.ones(count, dtype=torch.bool),
                       id_rows=id_rows, item_vectors=vectors, log_counts=torch.zeros(count), hub=torch.zeros(count))


def identity_head(dim, history=4):
    """A mean-encoder head whose towers are the identity: item = normalize(content), user =
    normalize(mean of the history's item vectors). Float64."""
    config = HeadConfig(dim=dim, hidden=3, id_embeddings=False, popularity_feature=False, history=history)
    model = RecHead(dim, 0, config).double()
    with torch.no_grad():
        for mlp in (model.items.adapter, model.users.mlp):
            mlp.proj.weight.copy_(torch.eye(dim))
            mlp.mlp[-1].weight.zero_()
            mlp.mlp[-1].bias.zero_()
        model.users.lengths.weight.zero_()
    return model


def test_history_contributions_on_a_hand_computed_case():
    # items e1..e4; history e1, e2, e3: the user is (1, 1, 1, 0) / sqrt(3)
    rec = hand_recommender(identity_head(4), torch.eye(4, dtype=torch.float64))
    loo = history_contributions(rec, [0, 1, 2], [0, 3], method="leave_one_out")
    assert loo.method == "leave_one_out" and loo.positions.tolist() == [0, 1, 2] and loo.unread == 0
    # item e1: score 1/sqrt(3); without e1 the user is (e2 + e3)/sqrt(2): 0; without e2 or e3: 1/sqrt(2)
    expected = [1 / math.sqrt(3), 1 / math.sqrt(3) - 1 / math.sqrt(2), 1 / math.sqrt(3) - 1 / math.sqrt(2)]
    assert loo.scores[0] == pytest.approx(1 / math.sqrt(3), abs=1e-15)
    assert np.allclose(loo.values[:, 0], expected, atol=1e-15, rtol=0)
    assert np.allclose(loo.values[:, 1], 0.0, atol=1e-15)  # e4 is orthogonal to every history
    assert loo.ranking(0)[0] == 0
    # gradient x input: d<u, e1>/dx_j = (I - u u^T) e1 / (n |mean|), |mean| = 1/sqrt(3), n = 3, so
    # x_1 gets sqrt(3)/3 * 2/3 and x_2, x_3 get sqrt(3)/3 * -1/3
    grad = history_contributions(rec, [0, 1, 2], [0], method="gradient_x_input")
    assert grad.method == "gradient_x_input"
    third = math.sqrt(3) / 3
    assert np.allclose(grad.values[:, 0], [third * 2 / 3, -third / 3, -third / 3], atol=1e-15, rtol=0)
    # a history longer than the window (4): the oldest entry is not read; removing a read one lets it in
    loo = history_contributions(rec, [3, 0, 1, 2, 1], [0], method="leave_one_out")
    assert loo.positions.tolist() == [1, 2, 3, 4] and loo.unread == 1
    # without e1 (position 1): window e4, e2, e3, e2 -> u . e1 = 0; score (e1 + 2 e2 + e3)/sqrt(6) . e1
    assert loo.values[0, 0] == pytest.approx(1 / math.sqrt(6), abs=1e-15)
    # auto: leave-one-out up to loo_max entries read, the gradient above
    assert history_contributions(rec, [0, 1, 2], [0], loo_max=3).method == "leave_one_out"
    assert history_contributions(rec, [0, 1, 2], [0], loo_max=2).method == "gradient_x_input"


def _gelu(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _mlp(module, x):
    """A ``ResidualMLP`` in float64 numpy: proj(x) + W2 gelu(W1 x + b1) + b2."""
    w = {name: p.detach().double().numpy() for name, p in module.named_parameters()}
    hidden = _gelu(x @ w["mlp.0.weight"].T + w["mlp.0.bias"])
    return x @ w["proj.weight"].T + hidden @ w["mlp.3.weight"].T + w["mlp.3.bias"]


def test_leave_one_out_matches_a_float64_reference_of_the_mean_head():
    torch.manual_seed(1)
    dim, hidden, count, window = 8, 16, 12, 6
    config = HeadConfig(dim=dim, hidden=hidden, id_embeddings=False, popularity_feature=False, history=window)
    model = RecHead(dim, 0, config)
    content = F.normalize(torch.randn(count, dim), dim=1)
    rec = hand_recommender(model, content)
    history, targets = [3, 5, 1, 7, 3, 9, 2, 4], [0, 6, 11]
    got = history_contributions(rec, history, targets, method="leave_one_out")

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    item_vectors = unit(_mlp(model.items.adapter, content.double().numpy()))  # (N, dim)
    lengths = model.users.lengths.weight.detach().double().numpy()

    def score(entries, item):
        read = entries[-window:]
        user = unit(_mlp(model.users.mlp, item_vectors[read].mean(0) + lengths[len(read)]))
        return float(user @ item_vectors[item])

    for column, item in enumerate(targets):
        full = score(history, item)
        assert got.scores[column] == pytest.approx(full, abs=1e-5)
        for row, position in enumerate(got.positions):
            expected = full - score(history[:position] + history[position + 1:], item)
            # each of the two float32 cosines carries the rounding of two residual MLPs (dot products
            # of <= hidden + dim terms of size <= 2), a mean and two normalisations: within
            # 8 (hidden + dim) eps; their difference within twice that (measured: 2 eps)
            assert abs(got.values[row, column] - expected) <= 16 * (hidden + dim) * EPS32, (position, item)


@pytest.mark.parametrize("encoder", ["mean", "sasrec"])
def test_leave_one_out_rescores_each_history_as_align_recommend_does(encoder):
    torch.manual_seed(3)
    dim, count, window = 8, 10, 5
    config = HeadConfig(dim=dim, hidden=16, id_embeddings=True, popularity_feature=False, history=window,
                        user_encoder=encoder, heads=2, layers=1)
    model = RecHead(dim, count, config)
    with torch.no_grad():
        model.items.ids.weight.normal_()  # ID vectors count too
    rec = hand_recommender(model, F.normalize(torch.randn(count, dim), dim=1))
    rec.id_rows = torch.arange(count)
    with torch.no_grad():
        rec.item_vectors = model.encode_items(rec.features, rec.id_rows)
    for history in ([4, 2], [1, 2, 3, 4, 5, 6, 7, 8]):  # shorter than the window (padding), and longer (slide-in)
        got = history_contributions(rec, history, [0, 9], method="leave_one_out")
        assert got.positions.tolist() == list(range(max(0, len(history) - window), len(history)))
        users = rec.history_vectors([history] + [history[:p] + history[p + 1:] for p in got.positions])
        scores = (users @ rec.item_vectors[[0, 9]].T).double()  # (1 + P, 2) as align recommend scores them
        # the same float32 operations on other batches (each item through the tower once; zero
        # padding, which neither encoder reads): unit-vector cosines of dim 8 within 64 eps each
        assert np.allclose(got.values, (scores[:1] - scores[1:]).numpy(), atol=128 * EPS32, rtol=0)
        grad = history_contributions(rec, history, [0, 9], method="gradient_x_input")
        assert grad.values.shape == got.values.shape and np.isfinite(grad.values).all()


def test_linear_modality_shares_split_the_fused_cosine_and_what_lies_outside_is_the_rest():
    g = torch.Generator().manual_seed(0)
    vectors = {m: torch.randn(6, 6, generator=g) * 3 for m in ("text", "image", "audio")}  # any length: split alike
    masks = {"text": torch.tensor([1, 1, 1, 0, 1, 0]).bool(), "image": torch.tensor([1, 0, 1, 1, 1, 0]).bool(),
             "audio": torch.tensor([1, 1, 0, 1, 0, 0]).bool()}  # the last item has none
    weights = {"text": 1.0, "image": 2.0, "audio": 0.5}
    query = F.normalize(torch.randn(6, generator=g, dtype=torch.float64), dim=0)
    unit = {m: F.normalize(v.double(), dim=1) for m, v in vectors.items()}
    total = sum(weights[m] * masks[m].double() for m in vectors)  # (6,)
    mean = sum(weights[m] * masks[m].double()[:, None] * unit[m] for m in vectors) / total.clamp_min(1)[:, None]
    fused = F.normalize(mean, dim=1)  # the weighted fusion, in float64; zero for the last item
    shares, rest, scores = linear_shares(query, fused, vectors, masks)
    for n in range(6):  # the definition, item by item: w_k <q, v_k> / (sum_j w_j * |m|)
        for k, m in enumerate(vectors):
            expected = weights[m] * float(query @ unit[m][n]) / (float(total[n]) * float(mean[n].norm())) \
                if masks[m][n] else 0.0
            assert shares[n, k] == pytest.approx(expected, abs=1e-12)
        assert rest[n] == pytest.approx(0.0, abs=1e-12)
        assert scores[n] == pytest.approx(float(query @ fused[n]), abs=1e-12)
    # a fused vector with a part outside the item's modality vectors (no fusion align embed makes):
    # that part's cosine is the rest, and the shares are those of the part inside
    row, outside = 1, torch.randn(6, generator=g, dtype=torch.float64)
    inside = torch.stack([unit["text"][row], unit["audio"][row]], 1)  # the item has text and audio
    outside -= inside @ torch.linalg.lstsq(inside, outside[:, None]).solution[:, 0]
    skewed = fused.clone()
    skewed[row] += 0.5 * outside
    shares, rest, scores = linear_shares(query, skewed, vectors, masks)
    assert shares[row] == pytest.approx(linear_shares(query, fused, vectors, masks)[0][row], abs=1e-12)
    assert rest[row] == pytest.approx(0.5 * float(query @ outside), abs=1e-12) and abs(rest[row]) > 0.01
    assert scores[row] == pytest.approx(float(query @ skewed[row]), abs=1e-12)
    assert shares[row].sum() + rest[row] == pytest.approx(scores[row], abs=1e-12)


def test_shapley_shares_of_a_learned_fusion_head_follow_the_definition():
    torch.manual_seed(2)
    names, dim, count = ("text", "image"), 4, 6
    modal = {m: F.normalize(torch.randn(count, dim, dtype=torch.float64), dim=1) for m in names}
    masks = {"text": torch.ones(count, dtype=torch.bool), "image": torch.tensor([1, 1, 1, 0, 1, 1]).bool()}
    features = torch.cat([modal["text"], modal["image"] * masks["image"][:, None].double(),
                          masks["text"][:, None].double(), masks["image"][:, None].double()], 1)  # [M*D | M masks]
    config = HeadConfig(dim=5, hidden=7, id_embeddings=False, popularity_feature=False, fusion="learned", history=4)
    model = RecHead(features.shape[1], 0, config, names).double()
    with torch.no_grad():
        model.items.fusion.logits.copy_(torch.tensor([0.3, -0.4], dtype=torch.float64))
    rec = hand_recommender(model, features, features)
    embeddings = ItemEmbeddings(rec.item_ids, {**modal, "fused": modal["text"]}, {**masks, "fused": masks["text"]}, {})
    user = rec.history_vectors([[0, 1]])[0]
    got_names, shares, base, scores = shapley_shares(rec, embeddings, user, [2, 3, 4])
    assert got_names == list(names)
    weight = torch.softmax(torch.tensor([0.3, -0.4], dtype=torch.float64), 0)

    def value(item, keep):  # the model's score of the item with only the modalities in ``keep``
        total = sum(weight[k] * modal[m][item] for k, m in enumerate(names) if m in keep and masks[m][item])
        if isinstance(total, int):  # no modality: a zero vector, as the fusion gives it
            fused = torch.zeros(dim, dtype=torch.float64)
        else:
            fused = F.normalize(total, dim=0)
        with torch.no_grad():
            return float(F.normalize(model.items.adapter(fused), dim=0) @ user)

    for row, item in enumerate([2, 3, 4]):
        none, text, image, both = (value(item, keep) for keep in ((), ("text",), ("image",), names))
        assert scores[row] == pytest.approx(both, abs=1e-12)
        assert base[row] == pytest.approx(none, abs=1e-12)
        assert shares[row, 0] == pytest.approx(0.5 * (text - none) + 0.5 * (both - image), abs=1e-12)
        assert shares[row, 1] == pytest.approx(0.5 * (image - none) + 0.5 * (both - text), abs=1e-12)
        assert shares[row].sum() + base[row] == pytest.approx(scores[row], abs=1e-12)
    assert shares[1, 1] == pytest.approx(0.0, abs=1e-12)  # item 3 has no image: it cannot carry the score


def test_catalogue_words_are_the_attribute_values_and_frequent_title_words(small_demo):
    terms = catalogue_terms([os.path.join(small_demo, "train.csv"), os.path.join(small_demo, "test.csv")])
    fields = dict(zip(terms.words, terms.fields))
    for word, field in (("star", "kind"), ("red", "colour"), ("dots", "pattern"), ("large", "size")):
        assert fields[word] == field
    assert {"striped", "checked", "dotted"} <= {w for w, f in fields.items() if f == "title"}
    assert not {"image", "audio", "description", "id", "group"} & set(terms.fields)  # not attributes
    assert len(set(terms.words)) == len(terms)


def stand_in_probe(recommender, small_demo):
    """Words in the stand-in space of test_rec_head's shop (one-hot attribute values): a word's
    vector is its value's one-hot column, what a perfect text tower would give."""
    from align.rec.interactions import read_catalogue_columns

    _, values = read_catalogue_columns([os.path.join(small_demo, "train.csv"), os.path.join(small_demo, "test.csv")],
                                       ATTRIBUTES)
    vocab = sorted({(a, v) for a in ATTRIBUTES for v in values[a]})  # the columns of attribute_vectors
    terms = Terms([v for _, v in vocab], [a for a, _ in vocab])
    width = recommender.content.shape[1]

    def encode(words):
        return torch.eye(width)[[vocab.index((terms.fields[terms.words.index(w)], w)) for w in words]]

    return WordProbe.build(terms, encode, recommender.content, recommender.present)


def shop_histories(recommender, shop_root):  # noqa: F811
    from align.rec.interactions import read_interactions
    from align.rec.split import user_histories

    log, _ = read_interactions(str(shop_root / "shop" / "interactions.csv"), recommender.item_ids)
    return {user: [log.item_ids[i] for i in codes] for user, codes in zip(log.user_ids, user_histories(log))}


def test_explanations_are_faithful_on_a_simulated_shop(trained, shop, small_demo):  # noqa: F811
    out, _ = trained
    rec = Recommender.load(str(out))
    histories = shop_histories(rec, shop["root"])
    assert sum(len(h) >= 3 for h in histories.values()) >= 300
    # leave-one-out ranks by the very removals it is checked with: every user passes
    assert faithfulness(rec, histories, max_users=100) >= 0.99
    # gradient x input only estimates them to first order (0.97 measured): the bar
    assert faithfulness(rec, histories, method="gradient_x_input", max_users=100) >= 0.8
    # the top attribute word against the simulated users' strongest taste (0.30 vs 0.05 measured)
    tastes = simulated_tastes(str(shop["root"] / "shop"))
    match, chance = taste_match(rec, histories, tastes, stand_in_probe(rec, small_demo))
    assert chance < 0.15 and match >= 3 * chance, (match, chance)


def test_simulated_tastes_are_those_the_simulator_drew(shop, tmp_path):  # noqa: F811
    """``align prep shop-sim`` writes the tastes its users chose with; read back, they are the
    simulator's own (run again from items.json here); a folder without them, or with a broken
    file, is a RunError naming the file."""
    import shutil

    from align.errors import RunError
    from align.rec.interactions import read_catalogue_columns
    from align.rec.simulate import ShopSimConfig, simulate_shop
    from data_prep.simulator_flags import new_item_positions

    folder = shop["root"] / "shop"
    meta = json.loads((folder / "items.json").read_text())
    item_ids, values = read_catalogue_columns(meta["catalogue"], meta["attributes"])
    new = np.asarray(new_item_positions(item_ids, meta["new"], "id"), dtype=np.int64)
    drawn = simulate_shop(item_ids, values, ShopSimConfig(**meta["config"]), new).tastes
    read = simulated_tastes(str(folder))
    assert read.user_ids == drawn.user_ids and read.features == drawn.features
    np.testing.assert_array_equal(read.weights, drawn.weights)
    assert {a for a, _ in read.features} == set(meta["attributes"])
    copy = tmp_path / "shop"
    shutil.copytree(folder, copy)
    (copy / "tastes.safetensors").write_bytes((folder / "tastes.safetensors").read_bytes()[:100])
    with pytest.raises(RunError, match="tastes.safetensors"):
        simulated_tastes(str(copy))
    (copy / "tastes.safetensors").unlink()
    with pytest.raises(RunError, match="tastes.safetensors"):
        simulated_tastes(str(copy))


def test_align_recommend_and_search_explain_in_text_and_json(server, head, items, capsys):  # noqa: F811
    from align.search.command import main as search
    from align.rec.recommend import main as recommend

    rec = server.recommender
    history = rec.item_ids[:4]
    assert recommend(["--checkpoint", head, "--history", ",".join(history), "-k", "3", "--explain"]) == 0
    text = capsys.readouterr().out
    assert "history: leave-one-out" in text and "modalities: Shapley" in text and "the user's words:" in text
    assert text.count("      history     ") == 3 and text.count("      words       ") == 3
    assert recommend(["--checkpoint", head, "--history", ",".join(history), "-k", "3", "--explain", "--json",
                      "--explain-method", "gradient_x_input"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["user_words"] and all(e["explanation"]["history"]["method"] == "gradient_x_input"
                                        for e in answer["results"])
    # one answer for one question, from the command line or over HTTP (the same head, CPU and batch)
    assert recommend(["--checkpoint", head, "--history", ",".join(history), "-k", "3", "--json"]) == 0
    served = server.client.post("/recommend", json={"history": history, "k": 3})
    assert served.status_code == 200 and json.loads(capsys.readouterr().out) == served.json()
    assert search(["--index", items, "--text", "small red star", "-k", "2", "--explain", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "the query's words:" in text and "modalities: an exact split" in text and "history" not in text


def test_the_service_answers_explain_with_structured_json(server):  # noqa: F811
    rec = server.recommender
    history = rec.item_ids[:5]
    response = server.client.post("/recommend", json={"history": history, "k": 3, "explain": True})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert len(answer["results"]) == 3 and answer["user_words"]
    rows = rec.rows_of(history, "test")
    targets = rec.rows_of([r["id"] for r in answer["results"]], "test")
    # the exact re-scorings as `align recommend` scores each history, in float64 from its float32 vectors
    users = rec.history_vectors([rows] + [rows[:p] + rows[p + 1:] for p in range(len(rows))]).double()
    scores = users @ rec.item_vectors[targets].double().T  # (1 + 5, 3)
    for column, result in enumerate(answer["results"]):
        why = result["explanation"]
        assert why["history"]["method"] == "leave_one_out" and why["history"]["unread"] == 0
        contributions = why["history"]["contributions"]
        assert sorted(c["position"] for c in contributions) == list(range(5))
        assert [c["contribution"] for c in contributions] == sorted((c["contribution"] for c in contributions),
                                                                     reverse=True)
        for c in contributions:
            assert c["id"] == history[c["position"]]
            # the explainer runs the item tower once per distinct item, not per history slot: the same
            # float32 operations in other batches, so each of the two cosines may round differently
            # (a 16-wide head: well within 80 eps each)
            assert c["contribution"] == pytest.approx(float(scores[0, column] - scores[1 + c["position"], column]),
                                                      abs=160 * EPS32)
        modalities = why["modalities"]
        assert modalities["method"] == "shapley" and set(modalities["shares"]) == {"text", "image", "audio"}
        assert sum(modalities["shares"].values()) + modalities["base"] == pytest.approx(modalities["score"], abs=1e-9)
        assert modalities["score"] == pytest.approx(result["score"], abs=1e-5)  # the head's cosine, float32
        for word in why["words"]:  # the item shows it and the user wants it: both positive
            assert word["item"] > 0 and word["user"] > 0
            assert word["score"] == pytest.approx(word["item"] * word["user"], rel=1e-12)
        assert [w["score"] for w in why["words"]] == sorted((w["score"] for w in why["words"]), reverse=True)
    assert any(result["explanation"]["words"] for result in answer["results"])
    response = server.client.post("/search", json={"text": "small red star", "k": 4, "explain": True})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["query_words"]
    for result in answer["results"]:
        modalities = result["explanation"]["modalities"]
        assert modalities["method"] == "linear" and "base" not in modalities
        assert sum(modalities["shares"].values()) + modalities["rest"] == pytest.approx(modalities["score"], abs=1e-12)
        assert modalities["score"] == pytest.approx(result["score"], abs=SCORE_BOUND)  # exact index: the same cosine
    plain = server.client.post("/search", json={"text": "small red star", "k": 4}).json()
    assert "query_words" not in plain and all("explanation" not in r for r in plain["results"])


def test_a_bad_explain_value_is_a_422_naming_the_field(server, small_demo):  # noqa: F811
    image = next(os.path.join(small_demo, "images", name) for name in sorted(os.listdir(os.path.join(small_demo,
                                                                                                       "images"))))
    with open(image, "rb") as handle:
        photo = handle.read()
    history = server.recommender.item_ids[:2]
    for path, request in (("/search", {"json": {"text": "star", "explain": "maybe"}}),
                          ("/search", {"json": {"text": "star", "explain": 1}}),
                          ("/recommend", {"json": {"history": history, "explain": [True]}}),
                          ("/search", {"files": {"image": ("p.png", photo)}, "data": {"explain": "perhaps"}})):
        response = server.client.post(path, **request)
        assert response.status_code == 422, (path, request.get("json"), response.text)
        assert response.json()["field"] == "explain" and "explain" in response.json()["detail"]
    response = server.client.post("/search", files={"image": ("p.png", photo)}, data={"explain": "true", "k": "2"})
    assert response.status_code == 200, response.text
    assert all("explanation" in r for r in response.json()["results"])

