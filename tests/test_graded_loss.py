"""Relevance-weighted InfoNCE (``graded_infonce``) and Matryoshka levels in the objective.

graded_infonce is checked against plain ``infonce`` (one positive per query), against a float64
reference written here loop by loop from the module doc's formula (several graded positives),
on hand-computed weights, and across two gloo processes. Matryoshka: one level at the full width
is the plain objective, several are the weighted sum of plain losses on truncated, renormalised
embeddings, and a dim wider than the model is refused naming the key.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from align.config import ConfigError, MatryoshkaConfig, load_config
from align.losses import InfoNCE
from align.losses.graded_infonce import GradedInfoNCE
from align.model import AlignModel
from align.objective import ContrastiveObjective
from align.registry import LOSSES
from tests.conftest import infonce_error, infonce_grad_error, launch_two_processes

SCALE = 1 / 0.07
TABLE = {"1": 0.3, "2": 0.6, "3": 1.0}
WORKER = Path(__file__).with_name("dist_graded_worker.py")


def graded_batch(batch=20, dim=8, k=2, seed=0, invalid=(2, 11), width=5):
    """A batch with graded relevance: every query grades its own product (1-3) and, for most
    queries, 1-2 other products of the batch; some lists also hold a product outside the batch,
    a grade-0 entry and padding. Rows 4 and 13 hold the same product (one key, two columns)."""
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(batch, dim, generator=g), dim=1)
    b = F.normalize(a + 0.8 * torch.randn(batch, dim, generator=g), dim=1)
    valid = torch.ones(batch, dtype=torch.bool)
    valid[list(invalid)] = False
    a, b = a * valid[:, None], b * valid[:, None]
    item_keys = torch.arange(100, 100 + batch)
    item_keys[13] = item_keys[4]
    b[13] = b[4]
    groups = torch.full((batch,), -1, dtype=torch.long)
    groups[[0, 9, 16]] = 5
    groups[[6, 7]] = 2
    keys = torch.full((batch, width), -1, dtype=torch.long)
    grades = torch.zeros(batch, width)
    for i in range(batch):
        keys[i, 0], grades[i, 0] = item_keys[i], float(torch.randint(1, 4, (1,), generator=g))
        extra = int(torch.randint(0, 3, (1,), generator=g))  # 0, 1 or 2 more graded products
        others = torch.randperm(batch, generator=g)[:extra]
        for slot, j in enumerate(others.tolist(), start=1):
            keys[i, slot], grades[i, slot] = item_keys[j], float(torch.randint(1, 4, (1,), generator=g))
        if i % 4 == 1:
            keys[i, 3], grades[i, 3] = 999, 3.0  # a product not in the batch: matches nothing
        if i % 5 == 2:
            keys[i, 4], grades[i, 4] = item_keys[(i + 1) % batch], 0.0  # graded 0: stays a negative
    negatives = F.normalize(a[:, None, :] + 0.5 * torch.randn(batch, k, dim, generator=g), dim=-1)
    negatives_mask = torch.rand(batch, k, generator=g) > 0.3
    return {"a": a, "b": b, "valid": valid, "groups": groups, "negatives": negatives,
            "negatives_mask": negatives_mask, "item_keys": item_keys, "positive_keys": keys,
            "positive_grades": grades}


def relevance(data):
    return {k: data[k] for k in ("item_keys", "positive_keys", "positive_grades")}


def masks(data):
    return {k: data[k] for k in ("valid", "groups", "negatives", "negatives_mask")}


def run(loss, a, b, scale=SCALE, dtype=torch.float32, **kwargs):
    """Forward + backward in ``dtype``: (outputs, grad a, grad b, grad scale)."""
    a = a.to(dtype).clone().requires_grad_()
    b = b.to(dtype).clone().requires_grad_()
    s = torch.tensor(float(scale), dtype=dtype, requires_grad=True)
    kwargs = {k: (v.to(dtype) if k == "negatives" else v) for k, v in kwargs.items()}
    out = loss(a, b, logit_scale=s, **kwargs)
    out["loss"].backward()
    return out, a.grad, b.grad, s.grad


def max_error(x, y):
    return float((x.detach().double() - y.detach().double()).abs().max())


WEIGHT = {"linear": lambda g: g, "log": lambda g: math.log2(1 + g), "table": lambda g: TABLE[str(int(g))]}


def reference(data, scale, weighting, normalise, same_group):
    """float64 loss of the module doc's formula, written as loops over queries and candidates;
    returns (loss, a, b, scale) with a, b, scale leaves for the gradients."""
    a = data["a"].double().clone().requires_grad_()
    b = data["b"].double().clone().requires_grad_()
    s = torch.tensor(float(scale), dtype=torch.float64, requires_grad=True)
    rows = data["valid"].nonzero(as_tuple=True)[0].tolist()
    keys = {r: int(data["item_keys"][r]) for r in rows}
    graded = {}
    for r in rows:
        graded[r] = {}
        for key, grade in zip(data["positive_keys"][r].tolist(), data["positive_grades"][r].tolist()):
            if key >= 0 and grade > 0:
                graded[r][key] = max(graded[r].get(key, 0.0), WEIGHT[weighting](grade))
    groups = data["groups"].tolist()

    def weight(query, candidate, own_query_side):
        """Weight of candidate for query (0: not a positive, None: left out)."""
        w = graded[query].get(keys[candidate], 0.0) if own_query_side else graded[candidate].get(keys[query], 0.0)
        if w > 0:
            return w
        if candidate != query and groups[query] >= 0 and groups[query] == groups[candidate]:
            if same_group == "ignore":
                return None
            return graded[query][keys[query]]  # own pair's weight (a product's own query grades it)
        return 0.0

    def direction(queries, candidates, query_side):
        terms, weights = [], []
        for i in rows:
            logit = {j: s * (queries[i] * candidates[j]).sum() for j in rows}
            w = {j: weight(i, j, query_side) for j in rows}
            negative = [logit[j] for j in rows if w[j] == 0.0]
            if query_side:  # explicit negatives join a -> b
                negative += [s * (queries[i] * data["negatives"][i, k].double()).sum()
                             for k in range(data["negatives"].shape[1]) if data["negatives_mask"][i, k]]
            row_terms, row_weights = [], []
            for j in rows:
                if w[j]:
                    denominator = torch.exp(logit[j]) + sum(torch.exp(z) for z in negative)
                    row_terms.append(w[j] * -(logit[j] - torch.log(denominator)))
                    row_weights.append(w[j])
            terms.append(sum(row_terms))
            weights.append(sum(row_weights))
        if normalise == "query":
            return sum(t / w for t, w in zip(terms, weights)) / len(rows)
        return sum(terms) / sum(weights)

    a2b = direction(a, b, True)
    b2a = direction(b, a, False)
    return (a2b + b2a) / 2, a, b, s


def pair_share_ratio(data, weighting):
    """Under normalise="pair": n times the largest share W_i / W of one query's (or product's)
    weights in the total, the factor by which its gradient may exceed 1 / n of "query"."""
    rows = data["valid"].nonzero(as_tuple=True)[0].tolist()
    weight = torch.zeros(len(rows), len(rows), dtype=torch.float64)
    for qi, q in enumerate(rows):
        listed = {}
        for key, grade in zip(data["positive_keys"][q].tolist(), data["positive_grades"][q].tolist()):
            if key >= 0 and grade > 0:
                listed[key] = max(listed.get(key, 0.0), WEIGHT[weighting](grade))
        for ci, c in enumerate(rows):
            weight[qi, ci] = listed.get(int(data["item_keys"][c]), 0.0)
    largest = max(weight.sum(1).max(), weight.sum(0).max())
    return float(len(rows) * largest / weight.sum())


def test_registered_and_buildable_from_config():
    loss_cls = LOSSES.get("graded_infonce")
    assert loss_cls is GradedInfoNCE
    built = loss_cls.from_config(loss_cls.Config(weighting="table", table=TABLE, normalise="pair"))
    assert built.table == {1.0: 0.3, 2.0: 0.6, 3.0: 1.0} and built.normalise == "pair"


def test_config_file_sets_the_weighting_table(tmp_path):
    path = tmp_path / "graded.yaml"
    path.write_text("base: " + str(Path(__file__).parents[1] / "configs" / "demo.yaml") + "\n"
                    "loss:\n  name: graded_infonce\n  params:\n    weighting: table\n"
                    "    table: {1: 0.3, 2: 0.6, 3: 1.0}\n")
    params = load_config(str(path)).loss.params
    assert params.weighting == "table" and params.table == TABLE
    with pytest.raises(ConfigError, match="loss.params"):
        load_config(str(path), ["loss.params.weighting=log"])  # a table without weighting: table


@pytest.mark.parametrize("values", [{"weighting": "table"}, {"weighting": "linear", "table": TABLE},
                                    {"weighting": "table", "table": {"1": 0.0}},
                                    {"weighting": "table", "table": {"buy": 1.0}}, {"normalise": "batch"},
                                    {"weighting": "square"}])
def test_bad_parameters_are_refused(values):
    with pytest.raises(ValueError):
        GradedInfoNCE(**values)


def test_grade_to_weight_by_hand():
    grades = torch.tensor([[0.0, 1.0, 2.0, 3.0, -1.0]])
    expected = {
        "linear": [0, 1, 2, 3, 0],
        "log": [0, 1, math.log2(3), 2, 0],  # log2(1 + g)
        "table": [0, 0.3, 0.6, 1.0, 0],
    }
    for weighting, values in expected.items():
        loss = GradedInfoNCE(weighting=weighting, table=TABLE if weighting == "table" else None)
        assert loss.weights(grades).tolist()[0] == pytest.approx(values, abs=1e-7)
    with pytest.raises(ValueError, match="grade 4.0 has no entry in table"):
        GradedInfoNCE(weighting="table", table=TABLE).weights(torch.tensor([1.0, 4.0]))


@pytest.mark.parametrize("with_relevance", [False, True])
@pytest.mark.parametrize("normalise", ["query", "pair"])
def test_one_positive_per_query_is_plain_infonce(with_relevance, normalise):
    """Own pair only (no relevance input, or lists holding just the own product): InfoNCE's
    a2b, b2a and gradients, with invalid rows, groups (ignored) and explicit negatives."""
    data = graded_batch()
    extra = {}
    if with_relevance:
        grade = 1.0 if normalise == "pair" else 2.0  # query-normalised: any single weight is 1 after division
        extra = {"item_keys": torch.arange(20), "positive_keys": torch.arange(20)[:, None],
                 "positive_grades": torch.full((20, 1), grade)}
    ours = run(GradedInfoNCE(normalise=normalise), data["a"], data["b"], **masks(data), **extra)
    plain = run(InfoNCE(), data["a"], data["b"], **masks(data))
    n, dim, k = int(data["valid"].sum()), data["a"].shape[1], data["negatives"].shape[1]
    # both lie within float32 rounding of the same exact value
    bound = 2 * infonce_error(dim, n + k, n, SCALE)
    for key in ("loss", "a2b", "b2a"):
        assert ours[0][key].item() == pytest.approx(plain[0][key].item(), abs=bound), key
    grad_bound = 2 * infonce_grad_error(dim, n + k, n, SCALE)
    assert max_error(ours[1], plain[1]) <= grad_bound and max_error(ours[2], plain[2]) <= grad_bound
    assert max_error(ours[3], plain[3]) <= 2 * infonce_grad_error(dim, n + k, n, SCALE, wrt_scale=True)


@pytest.mark.parametrize("weighting", ["linear", "log", "table"])
@pytest.mark.parametrize("normalise,same_group", [("query", "ignore"), ("pair", "ignore"), ("query", "positive")])
def test_several_graded_positives_match_float64_reference(weighting, normalise, same_group):
    data = graded_batch(seed=3)
    loss = GradedInfoNCE(weighting=weighting, table=TABLE if weighting == "table" else None,
                         normalise=normalise, same_group=same_group)
    out, grad_a, grad_b, grad_s = run(loss, data["a"], data["b"], **masks(data), **relevance(data))
    exact, a64, b64, s64 = reference(data, SCALE, weighting, normalise, same_group)
    exact.backward()
    n, dim, k, width = int(data["valid"].sum()), data["a"].shape[1], data["negatives"].shape[1], 5
    # Each positive's term is an InfoNCE row term over at most n + k logits; the weighted mean
    # over a query's <= width positives adds width + 2 roundings. Under "pair" a query's share is
    # its weight over the total instead of 1 / n: the gradients scale by at most that ratio.
    ratio = 1.0 if normalise == "query" else pair_share_ratio(data, weighting)
    assert out["loss"].item() == pytest.approx(exact.item(), abs=infonce_error(dim, n + k, n + width + 2, SCALE))
    assert out["loss"].item() != pytest.approx(run(InfoNCE(), data["a"], data["b"], **masks(data))[0]["loss"].item(),
                                               abs=1e-3)  # the grades change the loss
    grad_bound = ratio * infonce_grad_error(dim, n + k, n + width, SCALE)
    assert max_error(grad_a, a64.grad) <= grad_bound, "gradient of a"
    assert max_error(grad_b, b64.grad) <= grad_bound, "gradient of b"
    assert max_error(grad_s, s64.grad) <= ratio * infonce_grad_error(dim, n + k, n + width, SCALE, wrt_scale=True)


def test_own_product_missing_from_the_list_is_an_error():
    data = graded_batch()
    broken = relevance(data)
    broken["positive_keys"] = broken["positive_keys"].clone()
    broken["positive_keys"][7, 0] = -1
    with pytest.raises(ValueError, match="row 7: positive_keys does not list the row's own product"):
        GradedInfoNCE()(data["a"], data["b"], logit_scale=torch.tensor(SCALE), valid=data["valid"], **broken)


def test_other_positives_leave_each_others_denominator():
    """Two products graded equally by query 0 and nothing else: its term is the mean of two
    two-way softmaxes against the negatives only, by hand."""
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    b = torch.tensor([[0.6, 0.8], [0.8, 0.6], [-1.0, 0.0]])
    keys = torch.tensor([10, 11, 12])
    lists = torch.tensor([[10, 11], [11, -1], [12, -1]])
    grades = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    out = GradedInfoNCE(symmetric=False)(a, b, logit_scale=torch.tensor(1.0), item_keys=keys,
                                         positive_keys=lists, positive_grades=grades)
    z = a.double() @ b.double().T

    def term(i, j, negatives):
        return -(z[i, j] - torch.log(torch.exp(z[i, j]) + sum(torch.exp(z[i, k]) for k in negatives)))

    row0 = (term(0, 0, [2]) + term(0, 1, [2])) / 2
    expected = (row0 + term(1, 1, [0, 2]) + term(2, 2, [0, 1])) / 3
    assert out["loss"].item() == pytest.approx(expected.item(), abs=1e-6)


# ------------------------------------------------------------------ two processes

CASES = [("query", {}), ("pair_table", {"normalise": "pair", "weighting": "table", "table": TABLE}),
         ("positive_log", {"same_group": "positive", "weighting": "log"})]


@pytest.mark.multiprocess
def test_two_ranks_equal_one_process(tmp_path):
    """Rank 0 holds rows 0-8 (lists up to 3 wide), rank 1 rows 9-19 (wider): the graded
    products of a query sit on both ranks, one product on both; loss and gradients as one process."""
    data = graded_batch(seed=5)
    data["positive_keys"][:9, 3:] = -1  # rank 0's lists are narrower: P differs by rank
    data["splits"] = [9]
    torch.save({"scale": SCALE, "cases": CASES, "scenarios": {"split": data}}, tmp_path / "inputs.pt")
    done = launch_two_processes(str(WORKER), str(tmp_path / "inputs.pt"), str(tmp_path / "results.pt"), timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    results = torch.load(tmp_path / "results.pt")["split"]
    n, dim, k, width = int(data["valid"].sum()), data["a"].shape[1], data["negatives"].shape[1], 5
    for key, kwargs in CASES:
        single = run(GradedInfoNCE(**kwargs), data["a"], data["b"], **masks(data), **relevance(data))
        dist = results[key]
        ratio = 1.0 if kwargs.get("normalise", "query") == "query" else pair_share_ratio(data, "table")
        assert dist["loss"].item() == pytest.approx(single[0]["loss"].item(),
                                                    abs=2 * infonce_error(dim, n + k, n + width + 2, SCALE)), key
        grad_bound = 2 * ratio * infonce_grad_error(dim, n + k, n + width, SCALE)
        assert max_error(dist["a"], single[1]) <= grad_bound, key
        assert max_error(dist["b"], single[2]) <= grad_bound, key
        assert max_error(dist["params"][0], single[3]) <= 2 * ratio * infonce_grad_error(
            dim, n + k, n + width, SCALE, wrt_scale=True), key


# ------------------------------------------------------------------ Matryoshka


def objective_with(matryoshka=None, embed_dim=16):
    model = AlignModel({}, embed_dim=embed_dim)
    return ContrastiveObjective(model, {("text", "image"): (InfoNCE(), 1.0), ("text", "audio"): (InfoNCE(), 0.5)},
                                matryoshka=matryoshka)


def embeddings(rows=12, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(rows, dim, generator=g), dim=1)
    out = {"text": text.requires_grad_(),
           "image": F.normalize(text.detach() + torch.randn(rows, dim, generator=g), dim=1).requires_grad_(),
           "audio": F.normalize(text.detach() + torch.randn(rows, dim, generator=g), dim=1).requires_grad_()}
    masks_ = {m: torch.ones(rows, dtype=torch.bool) for m in out}
    masks_["audio"][[1, 5]] = False
    return out, masks_, torch.tensor([0, 0, -1, 1, 1, -1, -1, 2, 2, -1, -1, -1])


def test_matryoshka_at_the_full_width_is_the_plain_objective():
    emb, masks_, groups = embeddings()
    plain = objective_with().loss_from_embeddings(emb, masks_, groups)
    plain["loss"].backward()
    plain_grads = [emb[m].grad.clone() for m in ("text", "image", "audio")]
    for m in emb:
        emb[m].grad = None
    one = objective_with(MatryoshkaConfig(dims=[16], weights=[3.0])).loss_from_embeddings(emb, masks_, groups)
    one["loss"].backward()
    assert one["loss"].item() == plain["loss"].item()  # exactly
    assert one["text-image"].item() == plain["text-image"].item()
    assert all(torch.equal(emb[m].grad, g) for m, g in zip(("text", "image", "audio"), plain_grads))


def test_matryoshka_is_the_weighted_sum_of_plain_losses_on_prefixes():
    emb, masks_, groups = embeddings()
    dims, weights = [4, 8, 16], [1.0, 2.0, 1.0]
    out = objective_with(MatryoshkaConfig(dims=dims, weights=weights)).loss_from_embeddings(emb, masks_, groups)
    expected, pair_terms = 0.0, {}
    for name, pair_weight in (("text-image", 1.0), ("text-audio", 0.5)):
        a, b = name.split("-")
        valid = masks_[a] & masks_[b]
        pair = 0.0
        for dim, weight in zip(dims, weights):
            # independent of the objective: float64 truncation and renormalisation
            x, y = (F.normalize(emb[m].detach().double()[:, :dim], dim=1) for m in (a, b))
            value = InfoNCE()(x, y, logit_scale=torch.tensor(SCALE, dtype=torch.float64), valid=valid,
                              groups=groups)["loss"].item()
            assert out[f"{name}@{dim}"].item() == pytest.approx(value, abs=infonce_error(dim, 12, 12, SCALE))
            pair += weight / sum(weights) * value
        pair_terms[name] = pair
        expected += pair_weight * pair
    for name, value in pair_terms.items():
        assert out[name].item() == pytest.approx(value, abs=2 * infonce_error(16, 12, 12, SCALE))
    assert out["loss"].item() == pytest.approx(expected, abs=3 * infonce_error(16, 12, 12, SCALE))
    out["loss"].backward()
    # coordinates 8-15 are seen only by the full-width level, of weight 1/4: their gradient is a
    # quarter of the plain objective's (a power of two: equal up to the order of additions)
    plain_emb = {m: e.detach().clone().requires_grad_() for m, e in emb.items()}
    objective_with().loss_from_embeddings(plain_emb, masks_, groups)["loss"].backward()
    for m in emb:
        assert emb[m].grad[:, 8:].abs().sum() > 0
        assert max_error(emb[m].grad[:, 8:], plain_emb[m].grad[:, 8:] / 4) <= 1e-6 * plain_emb[m].grad.abs().max()


def test_matryoshka_equal_weights_by_default():
    emb, masks_, groups = embeddings()
    equal = objective_with(MatryoshkaConfig(dims=[4, 16])).loss_from_embeddings(emb, masks_, groups)
    for name in ("text-image", "text-audio"):
        mean = (equal[f"{name}@4"] + equal[f"{name}@16"]) / 2
        assert equal[name].item() == pytest.approx(mean.item(), rel=1e-6)


@pytest.mark.parametrize("override, message", [
    ("loss.matryoshka.dims=[16,256]", r"loss.matryoshka.dims\[1\] = 256 must lie in \[1, model.embed_dim = 128\]"),
    ("loss.matryoshka.dims=[64,32]", "loss.matryoshka.dims .* must increase"),
    ("loss.matryoshka.weights=[1.0]", "loss.matryoshka.weights given without loss.matryoshka.dims"),
    ("loss.matryoshka.sizes=[16]", "unknown key loss.matryoshka.sizes"),
])
def test_matryoshka_config_refusals_name_the_key(override, message):
    demo = str(Path(__file__).parents[1] / "configs" / "demo.yaml")
    assert load_config(demo, ["loss.matryoshka.dims=[16,32,64,128]"]).loss.matryoshka.dims == [16, 32, 64, 128]
    with pytest.raises(ConfigError, match=message):
        load_config(demo, [override])
    with pytest.raises(ConfigError, match="has 1 values for 2 dims"):
        load_config(demo, ["loss.matryoshka.dims=[16,128]", "loss.matryoshka.weights=[1.0]"])
