"""Recommendation metrics against hand-computed cases and a per-user brute-force reference."""
import math

import numpy as np
import pytest

from align.rec import metrics
from align.rec.metrics import (beyond_accuracy, gini_exposure, intra_list_diversity, item_coverage,
                               long_tail_mask, novelty, ranking_metrics, tail_percentage)

L3 = 1 / math.log2(3)  # discount at rank 2
L4 = 1 / math.log2(4)  # discount at rank 3 (= 0.5)


def test_ranking_metrics_by_hand():
    recommended = np.array([[3, 8, 1, 9],
                            [4, 2, 6, 0],
                            [7, 8, 9, 10],
                            [2, -1, -1, -1],
                            [1, 2, 3, 4]])
    relevant = [np.array([1, 3]),            # |R| = 2 < K = 3
                np.array([0, 2, 5, 6, 11]),  # |R| = 5 > K = 3
                np.array([11]),              # misses; item 11 is what user 3's pad key would alias
                np.array([4, 2, 4]),         # {2, 4}: the repeat is ignored; list padded after rank 1
                np.array([], dtype=np.int64)]  # no relevant item: not counted
    m = ranking_metrics(recommended, relevant, ks=(1, 3))
    assert m["users"] == 4
    # user 0: hits at ranks 1, 3. @1: recall 1/2, DCG 1, IDCG over min(2,1)=1 rank = 1.
    #   @3: recall 2/2, DCG 1 + 1/log2(4), IDCG over 2 ranks = 1 + 1/log2(3). RR 1.
    # user 1: hits at ranks 2, 3 (and 4). @1 all 0. @3: recall 2/5, DCG 1/log2(3) + 1/log2(4),
    #   IDCG over min(5,3)=3 ranks = 1 + 1/log2(3) + 1/log2(4). RR 1/2.
    # user 2: no hit: all 0.
    # user 3: hit at rank 1 only. @1: recall 1/2, NDCG 1. @3: recall 1/2, DCG 1, IDCG 1 + 1/log2(3). RR 1.
    assert m["recall@1"] == pytest.approx((0.5 + 0 + 0 + 0.5) / 4, abs=1e-15)
    assert m["recall@3"] == pytest.approx((1 + 2 / 5 + 0 + 0.5) / 4, abs=1e-15)
    assert m["hit@1"] == pytest.approx((1 + 0 + 0 + 1) / 4, abs=1e-15)
    assert m["hit@3"] == pytest.approx((1 + 1 + 0 + 1) / 4, abs=1e-15)
    assert m["ndcg@1"] == pytest.approx((1 + 0 + 0 + 1) / 4, abs=1e-15)
    ndcg3 = ((1 + L4) / (1 + L3) + (L3 + L4) / (1 + L3 + L4) + 0 + 1 / (1 + L3)) / 4
    assert m["ndcg@3"] == pytest.approx(ndcg3, abs=1e-15)
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 0 + 1) / 4, abs=1e-15)
    assert set(m) == {"recall@1", "recall@3", "ndcg@1", "ndcg@3", "hit@1", "hit@3", "mrr", "users"}


def test_padding_never_hits_even_when_its_key_aliases_a_relevant_item():
    # With 3 items, user 1's pad would encode as user 0's item 2 if it were not masked.
    m = ranking_metrics(np.array([[0, 1], [-1, -1]]), [np.array([2]), np.array([0])], ks=(2,))
    assert m["users"] == 2 and m["hit@2"] == 0 and m["recall@2"] == 0 and m["mrr"] == 0


def test_no_counted_user_gives_nan():
    m = ranking_metrics(np.array([[0, 1]]), [np.array([], dtype=np.int64)], ks=(1,))
    assert m["users"] == 0 and math.isnan(m["recall@1"]) and math.isnan(m["mrr"])


def _brute_force(recommended, relevant, ks):
    """Per-user reference written from the definitions with Python sets and loops."""
    sums = {f"{name}@{k}": 0.0 for k in ks for name in ("recall", "ndcg", "hit")}
    sums["mrr"] = 0.0
    users = 0
    for row, items in zip(recommended.tolist(), relevant):
        wanted = set(int(i) for i in items)
        if not wanted:
            continue
        users += 1
        for k in ks:
            found = [rank for rank, item in enumerate(row[:k], start=1) if item != -1 and item in wanted]
            sums[f"recall@{k}"] += len(found) / len(wanted)
            sums[f"hit@{k}"] += 1.0 if found else 0.0
            dcg = sum(1 / math.log2(rank + 1) for rank in found)
            idcg = sum(1 / math.log2(rank + 1) for rank in range(1, min(len(wanted), k) + 1))
            sums[f"ndcg@{k}"] += dcg / idcg
        first = next((rank for rank, item in enumerate(row, start=1) if item != -1 and item in wanted), None)
        sums["mrr"] += 1 / first if first else 0.0
    return {key: value / users for key, value in sums.items()}, users


def test_ranking_metrics_match_brute_force_on_random_lists():
    rng = np.random.default_rng(7)
    n_users, n_items, kmax = 400, 40, 8
    recommended = np.stack([rng.permutation(n_items)[:kmax] for _ in range(n_users)])
    short = rng.integers(0, kmax + 1, size=n_users)  # list length per user; the rest is padding
    recommended[np.arange(kmax)[None, :] >= short[:, None]] = -1
    relevant = [rng.integers(0, n_items, size=rng.integers(0, 12)) for _ in range(n_users)]  # repeats, empties
    ks = (1, 3, 5, 8)
    expected, users = _brute_force(recommended, relevant, ks)
    got = ranking_metrics(recommended, relevant, ks)
    assert got["users"] == users
    for key, value in expected.items():
        assert abs(got[key] - value) <= 1e-12, key


def test_ranking_metrics_errors_name_the_problem():
    recommended = np.array([[0, 1, 2], [2, 1, 0]])
    relevant = [np.array([0]), np.array([1])]
    with pytest.raises(ValueError, match="K=4 is outside 1..Kmax=3"):
        ranking_metrics(recommended, relevant, ks=(1, 4))
    with pytest.raises(ValueError, match="relevant has 1 entries but recommended has 2 rows"):
        ranking_metrics(recommended, relevant[:1], ks=(1,))
    with pytest.raises(ValueError, match="shape"):
        ranking_metrics(np.array([0, 1, 2]), relevant, ks=(1,))
    with pytest.raises(ValueError, match="row 1 lists item 2 more than once"):
        ranking_metrics(np.array([[0, 1, 2], [2, 3, 2]]), relevant, ks=(1,))
    with pytest.raises(ValueError, match=r"recommended\[0, 1\] = -2"):
        ranking_metrics(np.array([[0, -2, 2], [2, 1, 0]]), relevant, ks=(1,))


def test_beyond_accuracy_functions_reject_k_above_kmax():
    recommended = np.array([[0, 1], [1, 2]])
    for call in (lambda: item_coverage(recommended, 5, 3), lambda: gini_exposure(recommended, 5, 3),
                 lambda: tail_percentage(recommended, np.zeros(5, dtype=bool), 3),
                 lambda: intra_list_diversity(recommended, np.eye(5), 3),
                 lambda: novelty(recommended, np.full(5, 0.2), 3)):
        with pytest.raises(ValueError, match="K=3 is outside 1..Kmax=2"):
            call()
    with pytest.raises(ValueError, match="not an item index"):
        item_coverage(recommended, 2, 2)  # item 2 in a 2-item catalogue


def test_item_coverage():
    recommended = np.array([[0, 1, -1], [1, 2, 3]])
    assert item_coverage(recommended, 10, 2) == pytest.approx(3 / 10, abs=1e-15)  # {0, 1, 2}
    assert item_coverage(recommended, 10, 3) == pytest.approx(4 / 10, abs=1e-15)  # {0, 1, 2, 3}
    # Item 0 never shown, pads ignored: {3, 5} of 8.
    assert item_coverage(np.array([[3, 5], [5, -1]]), 8, 2) == pytest.approx(2 / 8, abs=1e-15)


def test_gini_exposure():
    # Equal exposure: items 0..3 shown once each -> 0.
    assert gini_exposure(np.array([[0, 1], [2, 3]]), 4, 2) == pytest.approx(0.0, abs=1e-15)
    # All exposure on item 2 of 5: counts ascending 0,0,0,0,3 -> (2*5 - 5 - 1) * 3 / (5 * 3) = 4/5.
    assert gini_exposure(np.array([[2], [2], [2]]), 5, 1) == pytest.approx(4 / 5, abs=1e-15)
    # Counts [0, 1, 3] (item 0 never shown, pads ignored): (-2*0 + 0*1 + 2*3) / (3 * 4) = 1/2.
    assert gini_exposure(np.array([[2, 1], [2, -1], [2, -1]]), 3, 2) == pytest.approx(0.5, abs=1e-15)


def test_tail_percentage_and_long_tail_mask():
    tail = np.array([False, False, True, True, True, True])
    recommended = np.array([[0, 2, -1], [3, 1, 5]])
    # k=3 shown slots 0, 2, 3, 1, 5: tail 2, 3, 5 -> 3/5. k=2: 0, 2, 3, 1 -> 2/4.
    assert tail_percentage(recommended, tail, 3) == pytest.approx(3 / 5, abs=1e-15)
    assert tail_percentage(recommended, tail, 2) == pytest.approx(2 / 4, abs=1e-15)

    counts = np.array([5, 9, 0, 9, 1, 3, 3, 0, 2, 7])
    # head = floor(0.2 * 10) = 2 items: the two 9s (items 1 and 3).
    np.testing.assert_array_equal(long_tail_mask(counts), [True, False, True, False] + [True] * 6)
    # head of 3 adds the 7 (item 9).
    np.testing.assert_array_equal(long_tail_mask(counts, 0.3), [True, False, True, False] + [True] * 5 + [False])
    # Tie at the edge: counts [3, 5, 3, 1], head 2 = item 1 (5) then item 0 (3, lower index than item 2).
    np.testing.assert_array_equal(long_tail_mask(np.array([3, 5, 3, 1]), 0.5), [False, False, True, True])
    assert long_tail_mask(counts, 0.0).all() and not long_tail_mask(counts, 1.0).any()
    # 0.29 * 100 is 28.999999999999996 in floats: still a head of 29 items.
    assert np.count_nonzero(~long_tail_mask(np.arange(100), 0.29)) == 29


# Hand-made 2-D vectors, not unit length: a and c point the same way, b is orthogonal to a,
# d is 60 degrees from a (and 30 from b), z is zero.
VECTORS = np.array([[1.0, 0.0],            # 0: a
                    [0.0, 2.0],            # 1: b
                    [3.0, 0.0],            # 2: c
                    [1.0, math.sqrt(3)],   # 3: d
                    [0.0, 0.0]])           # 4: z


def test_intra_list_diversity_by_hand():
    assert intra_list_diversity(np.array([[0, 1]]), VECTORS, 2) == pytest.approx(1.0, abs=1e-15)  # cos 0
    assert intra_list_diversity(np.array([[0, 2]]), VECTORS, 2) == pytest.approx(0.0, abs=1e-15)  # cos 1
    assert intra_list_diversity(np.array([[0, 3]]), VECTORS, 2) == pytest.approx(0.5, abs=1e-15)  # cos 60 = 1/2
    assert intra_list_diversity(np.array([[0, 4]]), VECTORS, 2) == pytest.approx(1.0, abs=1e-15)  # zero row: cos 0
    # Three items a, b, d: pairs cos(a,b) = 0, cos(a,d) = 1/2, cos(b,d) = cos 30 = sqrt(3)/2.
    expected = 1 - (0 + 0.5 + math.sqrt(3) / 2) / 3
    assert intra_list_diversity(np.array([[0, 1, 3]]), VECTORS, 3) == pytest.approx(expected, abs=1e-15)
    # Mean over lists; [2, -1] has one item and is skipped: (1 + 0 + 0.5) / 3.
    lists = np.array([[0, 1], [0, 2], [3, 0], [2, -1]])
    assert intra_list_diversity(lists, VECTORS, 2) == pytest.approx(0.5, abs=1e-15)
    assert math.isnan(intra_list_diversity(np.array([[2, -1]]), VECTORS, 2))


def test_intra_list_diversity_matches_pairwise_loop_across_chunks(monkeypatch):
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(30, 5)).astype(np.float32) * rng.uniform(0.1, 10, size=(30, 1)).astype(np.float32)
    vectors[7] = 0
    recommended = np.stack([rng.permutation(30)[:4] for _ in range(53)])
    recommended[::5, 2:] = -1
    recommended[::11, 1:] = -1  # single-item lists: skipped
    monkeypatch.setattr(metrics, "ILD_CHUNK_USERS", 6)  # 53 lists in chunks of 6, the last one short
    unit = vectors.astype(np.float64)
    norms = np.linalg.norm(unit, axis=1)
    per_list = []
    for row in recommended.tolist():
        items = [i for i in row if i != -1]
        if len(items) < 2:
            continue
        cosines = [0.0 if norms[i] == 0 or norms[j] == 0 else float(unit[i] @ unit[j] / (norms[i] * norms[j]))
                   for n, i in enumerate(items) for j in items[n + 1:]]
        per_list.append(1 - sum(cosines) / len(cosines))
    assert abs(intra_list_diversity(recommended, vectors, 4) - sum(per_list) / len(per_list)) <= 1e-12


def test_novelty_with_a_cold_item():
    # Training counts [2, 1, 1, 0]: p = [1/2, 1/4, 1/4, 0], N = 4 interactions, cold p = 1/5.
    probability = np.array([0.5, 0.25, 0.25, 0.0])
    recommended = np.array([[0, 1, -1], [2, 3, -1]])
    # -log2: 1, 2, 2, log2(5); pads ignored.
    expected = (1 + 2 + 2 + math.log2(5)) / 4
    assert novelty(recommended, probability, 3, n_interactions=4) == pytest.approx(expected, abs=1e-15)
    assert novelty(recommended[:, :1], probability, 1) == pytest.approx((1 + 2) / 2, abs=1e-15)  # no cold item
    with pytest.raises(ValueError, match="item 3 is recommended but has probability 0"):
        novelty(recommended, probability, 2)


def test_beyond_accuracy_by_hand():
    counts = np.array([6, 4, 0, 0, 0, 0, 0, 0, 0, 0])  # 10 interactions; head = floor(0.2 * 10) = items 0, 1
    vectors = np.zeros((10, 2))
    vectors[0], vectors[1], vectors[2] = [1, 0], [0, 1], [1, 1]
    recommended = np.array([[0, 2, 5], [1, 0, -1]])
    out = beyond_accuracy(recommended, 10, 2, counts, vectors)
    # top-2 slots: 0, 2 | 1, 0.
    assert out["coverage@2"] == pytest.approx(3 / 10, abs=1e-15)  # {0, 1, 2}
    assert out["tail@2"] == pytest.approx(1 / 4, abs=1e-15)  # only item 2 is tail
    # exposure ascending: seven 0s, 1 (item 1), 1 (item 2), 2 (item 0); n = 10, total 4:
    # ((2*8 - 11) * 1 + (2*9 - 11) * 1 + (2*10 - 11) * 2) / (10 * 4) = (5 + 7 + 18) / 40.
    assert out["gini@2"] == pytest.approx(30 / 40, abs=1e-15)
    # [0, 2]: cos 45 degrees = 1/sqrt(2); [1, 0]: cos 0.
    assert out["ild@2"] == pytest.approx(((1 - 1 / math.sqrt(2)) + 1) / 2, abs=1e-15)
    # p(0) = 0.6, p(1) = 0.4, item 2 cold: p = 1 / 11.
    expected_novelty = (-math.log2(0.6) + math.log2(11) - math.log2(0.4) - math.log2(0.6)) / 4
    assert out["novelty"] == pytest.approx(expected_novelty, abs=1e-15)
    assert set(out) == {"coverage@2", "tail@2", "gini@2", "ild@2", "novelty"}
