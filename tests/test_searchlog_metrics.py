"""Graded search-log metrics against hand-computed cases and a slow float64 per-query reference."""
import math

import numpy as np
import pytest
import torch

from align.rec.metrics import ranking_metrics
from align.searchlog import metrics
from align.searchlog.metrics import (GradedRelevance, err_at_k, graded_report, listed_grades, ndcg_at_k,
                                     rank_by_score, rank_by_similarity, rbp, recall_at_k, reciprocal_rank)

L3 = 1 / math.log2(3)  # discount at rank 2
L5 = 1 / math.log2(5)  # discount at rank 4 (rank 3's is 1/log2(4) = 1/2)


def _grades(lists, judgements):
    return listed_grades(torch.tensor(lists), GradedRelevance.from_dicts(judgements))


def test_ndcg_graded_gains_with_fewer_relevant_than_k():
    # Query judges item 4 grade 3, item 7 grade 1, item 9 grade 0 (judged not relevant); K = 5.
    judgements = [{4: 3, 7: 1, 9: 0}]
    relevance = GradedRelevance.from_dicts(judgements)
    grades = listed_grades(torch.tensor([[9, 7, 4, 1, 2]]), relevance)  # grades 0, 1, 3, 0, 0
    assert grades.tolist() == [[0.0, 1.0, 3.0, 0.0, 0.0]]
    # DCG  = (2^0-1)/1 + (2^1-1)/log2(3) + (2^3-1)/log2(4) = 1/log2(3) + 7/2
    # IDCG = best order of ALL judged items (3, 1, 0), cut at 5 = 7/1 + 1/log2(3) + 0
    #        (not 5 slots of gain 7: the query has only 2 relevant items)
    expected = (L3 + 3.5) / (7 + L3)  # = 0.54134...
    assert ndcg_at_k(grades, relevance, 5).item() == pytest.approx(expected, abs=1e-15)
    # Cut at K = 2: DCG = 0 + 1/log2(3); IDCG = 7 + 1/log2(3).
    assert ndcg_at_k(grades, relevance, 2).item() == pytest.approx(L3 / (7 + L3), abs=1e-15)


def test_ndcg_of_a_perfect_ranking_is_one():
    relevance = GradedRelevance.from_dicts([{4: 3, 7: 1, 9: 0}, {0: 2, 1: 2, 5: 1}])
    # Query 0 lists its grade-0 item third or not at all: either way its best DCG.
    grades = listed_grades(torch.tensor([[4, 7, 9, 1, 2], [1, 0, 5, 3, -1]]), relevance)
    assert ndcg_at_k(grades, relevance, 5).tolist() == pytest.approx([1.0, 1.0], abs=1e-15)
    grades = listed_grades(torch.tensor([[4, 7, 1, 2, 3], [0, 1, 5, -1, -1]]), relevance)
    assert ndcg_at_k(grades, relevance, 5).tolist() == pytest.approx([1.0, 1.0], abs=1e-15)


def test_ndcg_of_a_reversed_ranking_exact_value():
    relevance = GradedRelevance.from_dicts([{0: 3, 1: 2, 2: 1}])
    grades = listed_grades(torch.tensor([[2, 1, 0]]), relevance)  # grades 1, 2, 3
    # DCG  = (2^1-1)/1 + (2^2-1)/log2(3) + (2^3-1)/log2(4) = 1 + 3/log2(3) + 7/2
    # IDCG = 7/1 + 3/log2(3) + 1/2
    expected = (1 + 3 * L3 + 3.5) / (7 + 3 * L3 + 0.5)  # = 0.68061...
    assert ndcg_at_k(grades, relevance, 3).item() == pytest.approx(expected, abs=1e-15)


def test_rank_by_score_breaks_ties_by_lower_item_index():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1],     # 0.9 tie (1, 3); 0.5 tie (0, 2) straddles the cut at 3
                           [1.0, 1.0, 1.0, 1.0, 1.0],     # all tied
                           [0.2, 0.3, 0.1, 0.0, -0.1]])   # no tie
    assert rank_by_score(scores, 3).tolist() == [[1, 3, 0], [0, 1, 2], [1, 0, 2]]
    assert rank_by_score(scores, 2).tolist() == [[1, 3], [0, 1], [1, 0]]
    # Deeper than the catalogue: every item, then pads.
    assert rank_by_score(scores, 7).tolist() == [[1, 3, 0, 2, 4, -1, -1], [0, 1, 2, 3, 4, -1, -1],
                                                  [1, 0, 2, 3, 4, -1, -1]]
    # The tie decides the metric: row 0's relevant item 2 loses its tie with item 0 and falls out
    # of the top 3 (nDCG@3 = 0; had it won, (2^2-1)/log2(4) / (2^2-1) = 1/2). Row 1's item 1 comes
    # second: nDCG@3 = (1/log2(3)) / 1. Row 2's item 2 is third: (1/2) / 1.
    relevance = GradedRelevance.from_dicts([{2: 2}, {1: 1}, {2: 1}])
    grades = listed_grades(rank_by_score(scores, 3), relevance)
    assert ndcg_at_k(grades, relevance, 3).tolist() == pytest.approx([0.0, L3, 0.5], abs=1e-15)


def test_rank_by_score_matches_a_stable_sort_across_chunks(monkeypatch):
    generator = np.random.default_rng(0)
    scores = generator.integers(0, 6, size=(50, 30)).astype(np.float32)  # many ties at every cut
    scores[7] = 2.0  # an all-tied row
    scores[8, :] = -np.inf
    scores[8, 3] = 1.0
    reference = np.argsort(-scores, axis=1, kind="stable")  # descending, equal scores in index order
    monkeypatch.setattr(metrics, "RANK_CHUNK_ELEMENTS", 4 * 30)  # 4 rows a chunk: 13 chunks
    for depth in (1, 5, 30):
        assert np.array_equal(rank_by_score(torch.from_numpy(scores), depth).numpy(), reference[:, :depth])


def test_rank_by_similarity_equals_rank_by_score(monkeypatch):
    generator = torch.Generator().manual_seed(1)
    items = torch.randn(40, 8, generator=generator)
    items[10] = items[3]  # identical vectors: exact ties, 3 must come before 10
    queries = torch.randn(23, 8, generator=generator)
    queries[0] = items[3]
    monkeypatch.setattr(metrics, "RANK_CHUNK_ELEMENTS", 5 * 40)
    ranked = rank_by_similarity(queries, items, 12)
    assert torch.equal(ranked, rank_by_score(queries @ items.T, 12))
    assert ranked[0, :2].tolist() == [3, 10]


def test_err_on_three_items_by_hand():
    grades = _grades([[0, 1, 2]], [{0: 2, 2: 3}])  # grades 2, 0, 3 on a 0..3 scale
    # R = (2^g - 1) / 2^3: R1 = 3/8, R2 = 0, R3 = 7/8.
    # ERR = R1/1 + (1-R1) R2/2 + (1-R1)(1-R2) R3/3 = 3/8 + 0 + (5/8)(7/8)/3 = 72/192 + 35/192 = 107/192
    assert err_at_k(grades, 3, max_grade=3).item() == pytest.approx(107 / 192, abs=1e-15)
    # At K = 1 only rank 1: 3/8. On a 0..4 scale R1 = 3/16, R3 = 7/16:
    # 3/16 + (13/16)(7/16)/3 = 144/768 + 91/768 = 235/768.
    assert err_at_k(grades, 1, max_grade=3).item() == pytest.approx(3 / 8, abs=1e-15)
    assert err_at_k(grades, 3, max_grade=4).item() == pytest.approx(235 / 768, abs=1e-15)


def test_rbp_with_p_0_9_by_hand():
    grades = _grades([[0, 1, 2]], [{0: 3, 2: 1}])  # grades 3, 0, 1 on a 0..3 scale
    # RBP = (1 - 0.9) (3/3 * 0.9^0 + 0/3 * 0.9^1 + 1/3 * 0.9^2) = 0.1 (1 + 0.27) = 0.127
    value, residual = rbp(grades, max_grade=3, p=0.9)
    assert value.item() == pytest.approx(0.127, abs=1e-15)
    assert residual == pytest.approx(0.9 ** 3, abs=1e-15)  # 0.729: ranks below 3 could add that much


def test_mrr_recall_and_queries_without_relevant_items():
    lists = torch.tensor([[1, 2, 6, 5, 9],
                          [0, 1, 2, 4, 7],
                          [0, 1, 2, 3, 4],
                          [3, 4, 5, -1, -1]])
    judgements = [{5: 1, 6: 2, 8: 3},  # first relevant at rank 3; 2 of its 3 relevant in the top 4
                  {3: 1},              # its relevant item is not listed
                  {0: 0, 1: 0},        # judged, none relevant: left out
                  {}]                  # never judged: left out
    relevance = GradedRelevance.from_dicts(judgements)
    grades = listed_grades(lists, relevance)
    assert reciprocal_rank(grades).tolist() == pytest.approx([1 / 3, 0, 0, 0], abs=1e-15)
    recall2 = recall_at_k(grades, relevance, 2).tolist()
    assert recall2[:2] == [0.0, 0.0] and math.isnan(recall2[2]) and math.isnan(recall2[3])
    assert recall_at_k(grades, relevance, 4)[:2].tolist() == pytest.approx([2 / 3, 0.0], abs=1e-15)
    # More relevant items (3) than K (2): the denominator stays |R| = 3, so the best is 2/3, not 1.
    best = _grades([[6, 5, 8]], [judgements[0]])
    assert recall_at_k(best, GradedRelevance.from_dicts([judgements[0]]), 2).item() == pytest.approx(2 / 3, abs=1e-15)

    report = graded_report(lists, relevance, max_grade=3, k=4)
    assert report["n_queries"] == 4 and report["n_without_relevant"] == 2 and report["depth"] == 5
    # Means over queries 0 and 1 only.
    assert report["mrr"] == pytest.approx((1 / 3 + 0) / 2, abs=1e-15)
    assert report["recall@4"] == pytest.approx((2 / 3 + 0) / 2, abs=1e-15)
    # Query 0 @4: grades 0, 0, 2, 1 -> DCG = 3/log2(4) + 1/log2(5); IDCG = 7 + 3/log2(3) + 1/2.
    assert report["ndcg@4"] == pytest.approx(((1.5 + L5) / (7.5 + 3 * L3) + 0) / 2, abs=1e-15)
    # Query 0: R = 0, 0, 3/8, 1/8 -> ERR@4 = (3/8)/3 + (5/8)(1/8)/4 = 1/8 + 5/256 = 37/256.
    assert report["err@4"] == pytest.approx((37 / 256 + 0) / 2, abs=1e-15)
    # Query 0: RBP = 0.1 (2/3 * 0.9^2 + 1/3 * 0.9^3) = 0.1 (0.54 + 0.243) = 0.0783.
    assert report["rbp_p0.9"] == pytest.approx((0.0783 + 0) / 2, abs=1e-15)
    assert report["rbp_p0.9_residual"] == pytest.approx(0.9 ** 5, abs=1e-15)
    assert set(report) == {"ndcg@4", "err@4", "rbp_p0.9", "rbp_p0.9_residual", "mrr", "recall@4",
                           "n_queries", "n_without_relevant", "depth"}


def test_no_query_with_a_relevant_item_gives_nan_means():
    report = graded_report(torch.tensor([[0, 1]]), GradedRelevance.from_dicts([{0: 0}]), max_grade=3, k=2)
    assert report["n_queries"] == 1 and report["n_without_relevant"] == 1
    assert all(math.isnan(report[name]) for name in ("ndcg@2", "err@2", "rbp_p0.9", "mrr", "recall@2"))


def _reference(scores, judgements, depth, k, max_grade, p):
    """Per-query metrics written from the definitions with Python floats, dicts and sorted()."""
    rows = []
    for row, judged in zip(scores, judgements):
        ranked = sorted(range(len(row)), key=lambda j: (-row[j], j))[:depth]
        g = [float(judged.get(j, 0)) for j in ranked]
        n_relevant = sum(1 for grade in judged.values() if grade > 0)
        if n_relevant == 0:
            rows.append(None)
            continue
        dcg = sum((2.0 ** g[r] - 1) / math.log2(r + 2) for r in range(k))
        ideal = sorted(judged.values(), reverse=True)[:k]
        idcg = sum((2.0 ** grade - 1) / math.log2(r + 2) for r, grade in enumerate(ideal))
        err, reach = 0.0, 1.0
        for r in range(k):
            satisfied = (2.0 ** g[r] - 1) / 2.0 ** max_grade
            err += reach * satisfied / (r + 1)
            reach *= 1 - satisfied
        rbp_value = sum((1 - p) * g[r] / max_grade * p ** r for r in range(depth))
        first = next((r + 1 for r in range(depth) if g[r] > 0), None)
        rows.append({"ndcg": dcg / idcg, "err": err, "rbp": rbp_value, "mrr": 1 / first if first else 0.0,
                     "recall": sum(1 for grade in g[:k] if grade > 0) / n_relevant})
    return rows


def test_vectorised_metrics_match_a_slow_float64_reference():
    generator = np.random.default_rng(42)
    n_queries, n_items, depth, k = 200, 60, 15, 10
    scores = generator.integers(0, 12, size=(n_queries, n_items)).astype(np.float64)  # ties included
    judgements = []
    for _ in range(n_queries):
        judged = generator.choice(n_items, size=generator.integers(0, 12), replace=False)
        judgements.append({int(j): int(generator.integers(0, 4)) for j in judged})  # grades 0..3
    relevance = GradedRelevance.from_dicts(judgements)
    lists = rank_by_score(torch.from_numpy(scores), depth)
    grades = listed_grades(lists, relevance)
    expected = _reference(scores.tolist(), judgements, depth, k, max_grade=3, p=0.9)
    counted = [i for i, row in enumerate(expected) if row is not None]
    assert 0 < len(counted) < n_queries  # both kinds of query are exercised

    per_query = {"ndcg": ndcg_at_k(grades, relevance, k), "err": err_at_k(grades, k, 3),
                 "rbp": rbp(grades, 3, 0.9)[0], "mrr": reciprocal_rank(grades),
                 "recall": recall_at_k(grades, relevance, k)}
    for name, values in per_query.items():
        reference = [expected[i][name] for i in counted]
        assert values[counted].tolist() == pytest.approx(reference, rel=1e-13, abs=1e-15), name

    report = graded_report(lists, relevance, max_grade=3, k=k)
    assert report["n_without_relevant"] == n_queries - len(counted)
    for key, name in (("ndcg@10", "ndcg"), ("err@10", "err"), ("rbp_p0.9", "rbp"), ("mrr", "mrr"),
                      ("recall@10", "recall")):
        assert report[key] == pytest.approx(math.fsum(expected[i][name] for i in counted) / len(counted),
                                            rel=1e-13), key


def test_binary_grades_agree_with_the_recommender_metrics():
    # align.rec.metrics implements binary NDCG/Recall/MRR independently (numpy, searchsorted keys):
    # with grades 0/1 the gain 2^g - 1 is 0/1 and every definition must coincide.
    generator = np.random.default_rng(3)
    lists = np.stack([generator.permutation(80)[:20] for _ in range(100)])
    relevant = [generator.choice(80, size=generator.integers(0, 25), replace=False) for _ in range(100)]
    relevance = GradedRelevance.from_dicts([{int(j): 1 for j in items} for items in relevant])
    ours = graded_report(lists, relevance, max_grade=1, k=10)
    theirs = ranking_metrics(lists, relevant, ks=(10,))
    assert ours["n_queries"] - ours["n_without_relevant"] == theirs["users"]
    for key in ("ndcg@10", "recall@10", "mrr"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-13), key


def test_select_keeps_the_chosen_queries_in_order():
    lists = torch.tensor([[0, 1], [1, 0], [2, 3]])
    relevance = GradedRelevance.from_dicts([{0: 1}, {0: 3, 1: 1}, {3: 2}])
    chosen = torch.tensor([2, 0])
    assert graded_report(lists[chosen], relevance.select(chosen), max_grade=3, k=2) == \
        graded_report(lists[[2, 0]], GradedRelevance.from_dicts([{3: 2}, {0: 1}]), max_grade=3, k=2)


@pytest.mark.parametrize("build, message", [
    (lambda: listed_grades(torch.tensor([[1, 2, 1]]), GradedRelevance.from_dicts([{1: 1}])), "item 1 more than once"),
    (lambda: graded_report(torch.tensor([[1, 2]]), GradedRelevance.from_dicts([{2: 5}]), max_grade=3, k=2),
     "item 2 with grade 5.0 > max_grade=3"),
    (lambda: err_at_k(_grades([[2, 1]], [{2: 5}]), 2, max_grade=3), "rank 1 an item of grade 5.0 > max_grade=3"),
    (lambda: GradedRelevance.from_triples([0, 0], [4, 4], [1, 2], n_queries=1), "judges item 4 more than once"),
    (lambda: GradedRelevance.from_triples([0], [4], [-1], n_queries=1), "grade -1.0"),
    (lambda: rank_by_score(torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]), 1), "row 1 holds NaN"),
    (lambda: graded_report(torch.tensor([[1, 2]]), GradedRelevance.from_dicts([{2: 1}]), max_grade=3, k=3),
     "K=3 is outside 1..2"),
    (lambda: listed_grades(torch.tensor([[1, 2]]), GradedRelevance.from_dicts([{2: 1}, {}])), "2 queries"),
])
def test_bad_inputs_are_errors_that_say_what_to_fix(build, message):
    with pytest.raises(ValueError, match=message):
        build()
