"""`align eval` at scale: chunked ranking gives the dense float64 figures (ties to the lower index, as
before) without a query x candidate matrix; ranking through an exact index gives the same R@K; two
processes give one process's results; zero-shot classification on a hand-made case; the Recall@K
plot; classify keys refused with their name."""
import csv
import json
import os

import numpy as np
import pytest
import torch

from align.config import load_config
from align.errors import ConfigError
from align.eval import retrieval
from align.eval.classify import accuracy
from align.eval.retrieval import RetrievalEvaluator, positive_pairs, text_keys
from align.eval.runner import evaluate_checkpoint
from tests.conftest import REPO, launch_two_processes, one_step_checkpoint, read_rows, write_rows
from tests.test_train_e2e import tiny_overrides

CLI = os.path.join(REPO, "align", "cli.py")
PAIRS = {"text->image", "image->text", "text->audio", "audio->text", "image->audio", "audio->image"}


@pytest.fixture(scope="module")
def checkpoint(small_demo, tmp_path_factory):
    return one_step_checkpoint(small_demo, tmp_path_factory.mktemp("run"), "train.max_steps=2")


def dense_reference(queries, candidates, q_keys, c_keys, ks):
    """The metrics from the full float64 score matrix and a stable descending sort (ties to the lower
    candidate index), positives straight from their definition."""
    scores = queries.double() @ candidates.double().T  # (Q, C), exact for the data below
    (qi, qg, qt), (ci, cg, ct) = q_keys, c_keys
    positive = (qi[:, None] == ci[None]) | ((qg[:, None] == cg[None]) & (qg[:, None] != -1)) \
        | ((qt[:, None] == ct[None]) & (qt[:, None] != -1))
    firsts, aps = [], []
    for q in range(len(queries)):
        if not positive[q].any():
            continue
        order = np.argsort(-scores[q].numpy(), kind="stable")
        hits = positive[q].numpy()[order]
        ranks = np.flatnonzero(hits) + 1
        firsts.append(ranks[0])
        aps.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
    firsts = np.array(firsts)
    return {**{f"R@{k}": float(np.mean(firsts <= k)) for k in ks}, "median_rank": float(np.median(firsts)),
            "mAP": float(np.mean(aps)), "n_queries": len(firsts)}


def test_chunked_ranks_equal_the_dense_float64_reference_with_ties_and_shared_positives(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    # Entries k/4 with |k| <= 3 in 12 dimensions: every dot product is a multiple of 1/16 below 16,
    # exact in float32 whatever the summation order, so ties are real ties and the float64
    # reference is the exact answer; repeated rows and few values make many ties.
    n, dim = 90, 12
    base = torch.randint(-3, 4, (n, dim), generator=generator).float() / 4
    base[10:20] = base[0:10]  # identical vectors
    embeddings = {"text": base, "image": torch.randint(-3, 4, (n, dim), generator=generator).float() / 4}
    embeddings["image"][30:40] = embeddings["image"][40:50]
    masks = {"text": torch.rand(n, generator=generator) > 0.1, "image": torch.rand(n, generator=generator) > 0.2}
    ids = [f"item-{i % 80}" for i in range(n)]  # ten ids twice
    groups = torch.where(torch.rand(n, generator=generator) > 0.7, torch.randint(0, 6, (n,), generator=generator),
                         torch.full((n,), -1))
    texts = [None if i % 9 == 0 else f"Title {i % 23}" for i in range(n)]
    monkeypatch.setattr(retrieval, "COMPARISONS", 40)  # several passes over the positives of a chunk
    ks = (1, 3, 10)
    chunked = RetrievalEvaluator(ks=ks, query_chunk=7, candidate_chunk=13)(embeddings, masks, ids, groups, texts)
    id_table = {}
    keys = (torch.tensor([id_table.setdefault(i, len(id_table)) for i in ids]), groups, text_keys(texts))
    for query, candidate in (("text", "image"), ("image", "text")):
        q_rows, c_rows = masks[query].nonzero().flatten(), masks[candidate].nonzero().flatten()
        expected = dense_reference(embeddings[query][q_rows], embeddings[candidate][c_rows],
                                   [k[q_rows] for k in keys], [k[c_rows] for k in keys], ks)
        got = chunked[f"{query}->{candidate}"]
        assert {k: got[k] for k in expected if k != "mAP"} == {k: v for k, v in expected.items() if k != "mAP"}
        assert got["mAP"] == pytest.approx(expected["mAP"], rel=1e-12)
    # The pairs found from keys are exactly the dense definition's.
    q_rows = masks["text"].nonzero().flatten()
    dense = retrieval.positives(*[k[q_rows] for pair in zip(keys, keys) for k in pair])
    pair_query, pair_candidate = positive_pairs([k[q_rows] for k in keys], [k[q_rows] for k in keys])
    assert torch.equal(torch.stack([pair_query, pair_candidate], 1), dense.nonzero())


def test_classification_accuracy_on_a_hand_made_case():
    # Three class vectors on the axes; each sample's scores are its own coordinates.
    vectors = torch.eye(3)
    samples = torch.nn.functional.normalize(torch.tensor([
        [0.9, 0.3, 0.1],   # class 0: ranks 0 first -> top1 hit
        [0.5, 0.4, 0.3],   # class 1: second -> top2 hit only
        [0.6, 0.1, 0.2],   # class 2: second -> top2 hit only
        [0.1, 0.2, 0.9],   # class 2: first
        [0.2, 0.0, 0.1],   # class 1: last -> no hit within 2
    ]), dim=1)
    labels = torch.tensor([0, 1, 2, 2, 1])
    report = accuracy(samples, labels, vectors, ["circle", "star", "cross"], ks=(1, 2, 5))
    assert report["top1"] == pytest.approx(2 / 5) and report["top2"] == pytest.approx(4 / 5)
    assert report["top5"] == 1.0  # capped at the 3 classes: every sample is a hit
    assert report["per_class"] == {"circle": {"top1": 1.0, "top2": 1.0, "top5": 1.0, "n": 1},
                                   "star": {"top1": 0.0, "top2": 0.5, "top5": 1.0, "n": 2},
                                   "cross": {"top1": 0.5, "top2": 1.0, "top5": 1.0, "n": 2}}
    assert report["n"] == 5 and report["classes"] == 3


def test_eval_with_an_exact_index_classification_and_plot(checkpoint, small_demo, tmp_path, capsys):
    split = os.path.join(small_demo, "test.csv")
    plain = evaluate_checkpoint(checkpoint, split, ["eval.plots=false"], str(tmp_path / "plain.json"), "cpu")
    assert set(plain) == PAIRS and not os.path.exists(tmp_path / "recall_at_k.png")
    capsys.readouterr()
    results = evaluate_checkpoint(checkpoint, split, [
        "eval.index=exact", "eval.index_min_candidates=0", "eval.classify.column=kind",
        'eval.classify.templates=["a {}", "a photo of a {}."]'], str(tmp_path / "out" / "eval.json"), "cpu")
    printed = capsys.readouterr().out
    for pair in PAIRS:  # the exact figures are unchanged, and the exact index's top lists give the same R@K
        assert {k: results[pair][k] for k in plain[pair]} == plain[pair]
        for k in (1, 5, 10):
            assert results[pair][f"R@{k}~"] == results[pair][f"R@{k}"], (pair, k)
        assert results[pair]["index_recall10"] == 1.0
    assert results["index"]["setting"] == "exact" and "R@1~" in printed
    kinds = {row["kind"] for row in csv.DictReader(open(split, newline=""))}
    report = results["classify"]
    assert report["modality"] == "image" and set(report["per_class"]) <= kinds and report["classes"] >= 2
    assert sum(m["n"] for m in report["per_class"].values()) == report["n"] > 0
    assert 0 <= report["top1"] <= report["top5"] <= 1 and "zero-shot classification" in printed
    assert json.loads((tmp_path / "out" / "eval.json").read_text()) == json.loads(json.dumps(results))
    assert (tmp_path / "out" / "recall_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_classify_keys_are_checked(checkpoint, small_demo, tmp_path):
    with pytest.raises(ConfigError, match=r"templates\[1\].*has no \{\}"):
        load_config(None, tiny_overrides(small_demo, tmp_path, "eval.classify.column=kind",
                                         'eval.classify.templates=["a {}", "a photo"]'))
    with pytest.raises(ConfigError, match="'flavour' is absent"):
        evaluate_checkpoint(checkpoint, os.path.join(small_demo, "test.csv"), ["eval.classify.column=flavour"],
                            str(tmp_path / "eval.json"), "cpu")


@pytest.mark.multiprocess
@pytest.mark.once  # the same figures, exactly, from runs on the same kernels
def test_two_processes_evaluate_as_one(checkpoint, small_demo, tmp_path):
    """Metrics, and data.max_bad_fraction: held for the whole split, not each rank's share (the last
    rows' 6 missing photos are 3.75% of 160 samples, under 5%, but 7.5% of the second rank's 80)."""
    rows = read_rows(os.path.join(small_demo, "train.csv"))
    for row in rows[-6:]:
        row["image"] = "images/missing.png"
    split = write_rows(rows, os.path.join(small_demo, "late_gaps.csv"))  # beside the images its paths name
    overrides = ["eval.batch_size=8", "eval.plots=false", "eval.classify.column=kind"]
    launched = launch_two_processes(CLI, "eval", "--checkpoint", checkpoint, "--split", split, "--device", "cpu",
                                    "--output", tmp_path / "two.json", *overrides, timeout=240)
    assert launched.returncode == 0, launched.stderr[-3000:]
    threads = torch.get_num_threads()  # the ranks run on one thread each (see test_embed_sharded.py)
    torch.set_num_threads(1)
    try:
        one = evaluate_checkpoint(checkpoint, split, overrides, str(tmp_path / "one.json"), "cpu")
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "two.json").read_text()) == json.loads(json.dumps(one))
