"""Relevance-weighted InfoNCE (``graded_infonce``, and ``graded_infonce_tiled``, the same loss
tile by tile) and Matryoshka levels in the objective.

Both are checked against plain ``infonce`` (one positive per query), against a float64
reference written here loop by loop from the module doc's formula (several graded positives;
the tiled one at tile sizes that do and do not divide the batch, on its fast and its exact
log-sum-exp path), on hand-computed cases, and across two gloo processes; the tiled one also
never makes a tensor the size of the (n, N) logits. Matryoshka: one level at the full width
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
from align.losses.graded_tiled import GradedInfoNCETiled
from align.losses.tiled import tiled_negative_logsumexp
from align.losses.pairs import pair_up
from align.model import AlignModel
from align.objective import ContrastiveObjective
from align.registry import LOSSES
from tests.conftest import infonce_error, infonce_grad_error, launch_two_processes
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

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


def reference(data, scale, weighting, normalise, same_group, symmetric=True):
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
    if not symmetric:
        return a2b, a, b, s
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
    tiled_cls = LOSSES.get("graded_infonce_tiled")
    assert tiled_cls is GradedInfoNCETiled
    built = tiled_cls.from_config(tiled_cls.Config(weighting="log", tile_size=64, same_group="positive"))
    assert (built.weighting, built.tile_size, built.same_group) == ("log", 64, "positive")
    with pytest.raises(ValueError, match="tile_size must be positive"):
        GradedInfoNCETiled(tile_size=0)


def test_config_file_sets_the_weighting_table(tmp_path):
    path = tmp_path / "graded.yaml"
    path.write_text("base: " + str(Path(__file__).parents[1] / "configs" / "demo.yaml") + "\n"
                    "loss:\n  name: graded_infonce\n  params:\n    weighting: table\n"
                    "    table: {1: 0.3, 2: 0.6, 3: 1.0}\n")
    params = load_config(str(path)).loss.params
    assert params.weighting == "table" and params.table == TABLE
    with pytest.raises(ConfigError, match="loss.params"):
        load_config(str(path), ["loss.params.weighting=log"])  # a table without weighting: table
    # the tiled path is chosen as for infonce: by the loss name, its block size a parameter
    tiled = load_config(str(path), ["loss.name=graded_infonce_tiled", "loss.params.tile_size=512"]).loss.params
    assert tiled.weighting == "table" and tiled.table == TABLE and tiled.tile_size == 512


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


def tiled(**kwargs):
    """graded_infonce_tiled in blocks of 4: several blocks, the last one partial (18 valid rows)."""
    return GradedInfoNCETiled(tile_size=4, **kwargs)


LOSS_CLASSES = pytest.mark.parametrize("graded", [GradedInfoNCE, tiled], ids=["dense", "tiled"])


@LOSS_CLASSES
@pytest.mark.parametrize("with_relevance", [False, True])
@pytest.mark.parametrize("normalise", ["query", "pair"])
def test_one_positive_per_query_is_plain_infonce(graded, with_relevance, normalise):
    """Own pair only (no relevance input, or lists holding just the own product): InfoNCE's
    a2b, b2a and gradients, with invalid rows, groups (ignored) and explicit negatives."""
    data = graded_batch()
    extra = {}
    if with_relevance:
        grade = 1.0 if normalise == "pair" else 2.0  # query-normalised: any single weight is 1 after division
        extra = {"item_keys": torch.arange(20), "positive_keys": torch.arange(20)[:, None],
                 "positive_grades": torch.full((20, 1), grade)}
    ours = run(graded(normalise=normalise), data["a"], data["b"], **masks(data), **extra)
    plain = run(InfoNCE(), data["a"], data["b"], **masks(data))
    n, dim, k = int(data["valid"].sum()), data["a"].shape[1], data["negatives"].shape[1]
    # both lie within float32 rounding of the same exact value
    bound = 2 * infonce_error(dim, n + k, n, SCALE)
    for key in ("loss", "a2b", "b2a"):
        assert ours[0][key].item() == pytest.approx(plain[0][key].item(), abs=bound), key
    grad_bound = 2 * infonce_grad_error(dim, n + k, n, SCALE)
    assert max_error(ours[1], plain[1]) <= grad_bound and max_error(ours[2], plain[2]) <= grad_bound
    assert max_error(ours[3], plain[3]) <= 2 * infonce_grad_error(dim, n + k, n, SCALE, wrt_scale=True)


def assert_matches_reference(loss, data, weighting, normalise, same_group, scale=SCALE, symmetric=True):
    """``loss`` on ``data`` (fp32) lies within float32 rounding of the float64 reference, in value
    and in the gradients wrt both embeddings and the logit scale."""
    out, grad_a, grad_b, grad_s = run(loss, data["a"], data["b"], scale=scale, **masks(data), **relevance(data))
    exact, a64, b64, s64 = reference(data, scale, weighting, normalise, same_group, symmetric)
    exact.backward()
    n, dim, k, width = int(data["valid"].sum()), data["a"].shape[1], data["negatives"].shape[1], 5
    # Each positive's term is an InfoNCE row term over at most n + k logits; the weighted mean
    # over a query's <= width positives adds width + 2 roundings. Under "pair" a query's share is
    # its weight over the total instead of 1 / n: the gradients scale by at most that ratio.
    ratio = 1.0 if normalise == "query" else pair_share_ratio(data, weighting)
    assert out["loss"].item() == pytest.approx(exact.item(), abs=infonce_error(dim, n + k, n + width + 2, scale))
    assert out["loss"].item() != pytest.approx(run(InfoNCE(), data["a"], data["b"], scale=scale, **masks(data))[0]
                                               ["loss"].item(), abs=1e-3)  # the grades change the loss
    grad_bound = ratio * infonce_grad_error(dim, n + k, n + width, scale)
    assert max_error(grad_a, a64.grad) <= grad_bound, "gradient of a"
    assert max_error(grad_b, b64.grad) <= grad_bound, "gradient of b"
    assert max_error(grad_s, s64.grad) <= ratio * infonce_grad_error(dim, n + k, n + width, scale, wrt_scale=True)


def graded_loss(cls, weighting, **kwargs):
    return cls(weighting=weighting, table=TABLE if weighting == "table" else None, **kwargs)


@pytest.mark.parametrize("weighting", ["linear", "log", "table"])
@pytest.mark.parametrize("normalise,same_group", [("query", "ignore"), ("pair", "ignore"), ("query", "positive")])
def test_several_graded_positives_match_float64_reference(weighting, normalise, same_group):
    data = graded_batch(seed=3)
    loss = graded_loss(GradedInfoNCE, weighting, normalise=normalise, same_group=same_group)
    assert_matches_reference(loss, data, weighting, normalise, same_group)


# ------------------------------------------------------------------ tiled


# 18 valid rows: blocks of 4 leave a partial last block, blocks of 6 divide them, 64 is one block
@pytest.mark.parametrize("tile", [4, 6, 64])
@pytest.mark.parametrize("weighting,normalise,same_group,symmetric", [
    ("linear", "query", "ignore", True), ("table", "pair", "ignore", True), ("log", "query", "positive", True),
    ("table", "pair", "positive", False)])
def test_tiled_matches_float64_reference(tile, weighting, normalise, same_group, symmetric):
    """Graded positives (some in the query's group, one product in two rows), group masking,
    explicit hard negatives and invalid rows, tile by tile: the reference's value and gradients."""
    data = graded_batch(seed=3)
    loss = graded_loss(GradedInfoNCETiled, weighting, normalise=normalise, same_group=same_group,
                       symmetric=symmetric, tile_size=tile)
    assert_matches_reference(loss, data, weighting, normalise, same_group, symmetric=symmetric)


def test_tiled_exact_path_at_a_large_scale():
    """At logit scale 100 the negatives' log-sum-exp lies more than SAFE_MARGIN below the logit
    bound, so the blocks are summed with exact per-line maxima: still the reference."""
    data = graded_batch(seed=3)
    valid = data["valid"]
    a, b = data["a"][valid], data["b"][valid]
    positives = GradedInfoNCE().relevance_pairs(pair_up(a, b, groups=data["groups"][valid]), None,
                                                data["item_keys"][valid], data["positive_keys"][valid],
                                                data["positive_grades"][valid])[0]
    for scale, exact in ((SCALE, False), (100.0, True)):
        lse, _, _ = tiled_negative_logsumexp(a.requires_grad_(), b, torch.tensor(scale), torch.arange(len(a)),
                                             positives.rows, positives.cols, tile=4)
        assert lse.grad_fn.exact is exact  # the path the forward took
    for weighting, normalise, same_group in (("linear", "query", "ignore"), ("log", "pair", "positive")):
        loss = graded_loss(GradedInfoNCETiled, weighting, normalise=normalise, same_group=same_group, tile_size=4)
        assert_matches_reference(loss, data, weighting, normalise, same_group, scale=100.0)


@LOSS_CLASSES
def test_a_query_grading_every_product_has_no_negatives(graded):
    """Query 0 grades all three products: each of its terms has an empty negative set, so it
    adds 0 (softplus(-inf)) and no gradient; the other queries are two-way softmaxes by hand."""
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, -0.8]])
    b = torch.tensor([[0.6, 0.8], [0.8, 0.6], [-1.0, 0.0]])
    keys = torch.tensor([10, 11, 12])
    lists = torch.tensor([[10, 11, 12], [11, -1, -1], [12, -1, -1]])
    grades = torch.tensor([[3.0, 2.0, 1.0], [1.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    loss = graded(symmetric=False) if graded is GradedInfoNCE else GradedInfoNCETiled(symmetric=False, tile_size=2)
    out, grad_a, grad_b, grad_s = run(loss, a, b, scale=2.0, item_keys=keys, positive_keys=lists,
                                      positive_grades=grades)
    z = 2.0 * a.double() @ b.double().T
    expected = sum(F.softplus(torch.logsumexp(z[i, [j for j in range(3) if j != i]], 0) - z[i, i]) for i in (1, 2)) / 3
    assert out["loss"].item() == pytest.approx(expected.item(), abs=1e-6)
    assert grad_a[0].abs().max() == 0 and torch.isfinite(grad_b).all() and torch.isfinite(grad_s)


class LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an operation returns while it is active."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.numel = max([self.numel] + [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)])
        return out


@pytest.mark.parametrize("same_group", ["ignore", "positive"])
def test_tiled_never_makes_the_logit_matrix(same_group):
    """Forward and backward of 128 queries in blocks of 16: no tensor beyond a block, the
    embeddings and the per-query lists, where the dense loss makes (128, 128) ones."""
    rows, dim, tile, width = 128, 8, 16, 3
    g = torch.Generator().manual_seed(0)
    a, b = (F.normalize(torch.randn(rows, dim, generator=g), dim=1).requires_grad_() for _ in range(2))
    keys = torch.arange(rows)
    relevance_input = {"item_keys": keys, "positive_keys": torch.stack([keys, (keys + 1) % rows, (keys * 7) % rows], 1),
                       "positive_grades": torch.randint(1, 4, (rows, width), generator=g).float()}
    groups = torch.arange(rows) // 4  # groups of 4: up to 3 mates a query
    sizes = {}
    for name, loss in (("dense", GradedInfoNCE(same_group=same_group)),
                       ("tiled", GradedInfoNCETiled(same_group=same_group, tile_size=tile))):
        with LargestTensor() as largest:
            loss(a, b, logit_scale=torch.tensor(SCALE, requires_grad=True), groups=groups,
                 **relevance_input)["loss"].backward()
        sizes[name] = largest.numel
    assert sizes["dense"] >= rows * rows  # the recorder sees the logit matrix where there is one
    # a block, the (rows, dim) embeddings and their gradients, the listed positives and mates
    assert sizes["tiled"] <= max(tile * tile, rows * dim, rows * (width + 3)), sizes


def test_own_product_missing_from_the_list_is_an_error():
    data = graded_batch()
    broken = relevance(data)
    broken["positive_keys"] = broken["positive_keys"].clone()
    broken["positive_keys"][7, 0] = -1
    with pytest.raises(ValueError, match="row 7: positive_keys does not list the row's own product"):
        GradedInfoNCE()(data["a"], data["b"], logit_scale=torch.tensor(SCALE), valid=data["valid"], **broken)


@LOSS_CLASSES
def test_other_positives_leave_each_others_denominator(graded):
    """Two products graded equally by query 0 and nothing else: its term is the mean of two
    two-way softmaxes against the negatives only, by hand."""
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    b = torch.tensor([[0.6, 0.8], [0.8, 0.6], [-1.0, 0.0]])
    keys = torch.tensor([10, 11, 12])
    lists = torch.tensor([[10, 11], [11, -1], [12, -1]])
    grades = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    out = graded(symmetric=False)(a, b, logit_scale=torch.tensor(1.0), item_keys=keys,
                                  positive_keys=lists, positive_grades=grades)
    z = a.double() @ b.double().T

    def term(i, j, negatives):
        return -(z[i, j] - torch.log(torch.exp(z[i, j]) + sum(torch.exp(z[i, k]) for k in negatives)))

    row0 = (term(0, 0, [2]) + term(0, 1, [2])) / 2
    expected = (row0 + term(1, 1, [0, 2]) + term(2, 2, [0, 1])) / 3
    assert out["loss"].item() == pytest.approx(expected.item(), abs=1e-6)


# ------------------------------------------------------------------ two processes

PAIR_TABLE = {"normalise": "pair", "weighting": "table", "table": TABLE}
POSITIVE_LOG = {"same_group": "positive", "weighting": "log"}
CASES = [("query", "graded_infonce", {}), ("pair_table", "graded_infonce", PAIR_TABLE),
         ("positive_log", "graded_infonce", POSITIVE_LOG),
         ("tiled_query", "graded_infonce_tiled", {"tile_size": 4}),
         ("tiled_pair_table", "graded_infonce_tiled", {**PAIR_TABLE, "tile_size": 4}),
         ("tiled_positive_log", "graded_infonce_tiled", {**POSITIVE_LOG, "tile_size": 4}),
         ("tiled_one_way", "graded_infonce_tiled", {"symmetric": False, "tile_size": 4})]


@pytest.mark.multiprocess
def test_two_ranks_equal_one_process(tmp_path):
    """Rank 0 holds rows 0-8 (lists up to 3 wide), rank 1 rows 9-19 (wider): the graded
    products of a query sit on both ranks, one product on both; loss and gradients as the same
    loss in one process, dense and tiled (blocks of 4 over each rank's 8 and 10 valid rows)."""
    data = graded_batch(seed=5)
    data["positive_keys"][:9, 3:] = -1  # rank 0's lists are narrower: P differs by rank
    data["splits"] = [9]
    torch.save({"scale": SCALE, "cases": CASES, "scenarios": {"split": data}}, tmp_path / "inputs.pt")
    done = launch_two_processes(str(WORKER), str(tmp_path / "inputs.pt"), str(tmp_path / "results.pt"), timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    results = torch.load(tmp_path / "results.pt")["split"]
    n, dim, k, width = int(data["valid"].sum()), data["a"].shape[1], data["negatives"].shape[1], 5
    for key, name, kwargs in CASES:
        single = run(LOSSES.get(name)(**kwargs), data["a"], data["b"], **masks(data), **relevance(data))
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
