"""Retrieval metrics on constructed cases whose ranks are known by hand."""
import math

import pytest
import torch

from align.eval.retrieval import RetrievalEvaluator, retrieval_metrics


def test_known_ranks_with_duplicate_positives():
    # Candidates are the identity, so scores == query rows.
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3],   # positive {2}: rank 2, AP 1/2
                           [0.2, 0.8, 0.7, 0.1],   # positives {1, 2} (same text): ranks 1, 2, AP 1
                           [0.1, 0.2, 0.3, 0.4]])  # positive {0}: rank 4, AP 1/4
    positive = torch.tensor([[0, 0, 1, 0], [0, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    m = retrieval_metrics(scores, torch.eye(4), lambda rows: positive[rows], ks=(1, 2, 5))
    assert m["R@1"] == pytest.approx(1 / 3)
    assert m["R@2"] == pytest.approx(2 / 3)
    assert m["R@5"] == pytest.approx(1.0)
    assert m["median_rank"] == 2
    assert m["mAP"] == pytest.approx((0.5 + 1 + 0.25) / 3)
    assert m["n_queries"] == 3


def test_identical_texts_are_shared_positives_and_missing_rows_are_skipped():
    # Items 0 and 1 share a title; item 2 has no image; item 3's image sits nearest item 0's text.
    text = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    image = torch.tensor([[0, 0, 1.0], [1.0, 0, 0], [0, 0, 0], [0.9, 0, 0.1]])
    image = torch.nn.functional.normalize(image + 1e-12, dim=-1)
    masks = {"text": torch.tensor([True, True, True, True]), "image": torch.tensor([True, True, False, True])}
    texts = ["Red star", "red  star", "blue ring", "green cube"]
    out = RetrievalEvaluator(ks=(1,))({"text": text, "image": image}, masks, ["a", "b", "c", "d"],
                                     torch.full((4,), -1), texts)
    t2i = out["text->image"]
    # Query 0 ("red star"): best image is item 1, whose text is identical -> hit.
    # Query 1: best image is item 1 itself -> hit. Query 2 has no image positive -> not counted.
    # Query 3 ("green cube"): its own image ranks below image 0 ([0,0,1]) ... image 0 is exactly its
    # direction, so image 0 ranks first and is not a positive -> miss.
    assert t2i["n_queries"] == 3
    assert t2i["R@1"] == pytest.approx(2 / 3)
    assert set(out) == {"text->image", "image->text"}


def test_no_positive_anywhere_gives_nan_and_zero_queries():
    m = retrieval_metrics(torch.eye(2), torch.eye(2), lambda rows: torch.zeros(2, 2, dtype=torch.bool)[rows])
    assert m["n_queries"] == 0 and math.isnan(m["R@1"])
