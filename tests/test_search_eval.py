"""`align search-eval` judges a checkpoint on a simulated search log: every split and query modality
is reported, at the full dimension the figures are those of metrics.graded_report over the same
vectors (judged by the log or by the simulator's complete judgements), ranked among the candidates stats.json names (recomputed here from the split CSVs),
--dims adds prefix dimensions, a PNG is drawn, and bad flags are refused with exit 2 naming them."""
import csv
import json
import math
import os

import pytest
import torch

from align.cli import main as cli_main
from align.index.embed import embed_manifests
from align.index.search import QueryEncoder
from align.searchlog.metrics import GradedRelevance, graded_report, rank_by_similarity
from tests.conftest import one_step_checkpoint

SPLITS = ("eval_in_domain", "eval_novel_queries", "eval_novel_products", "eval_both_novel")
GRADES = {"view": 1, "cart": 2, "buy": 3}
BATCH = 64  # the command's default --batch-size: queries and items are encoded in the same batches


@pytest.fixture(scope="module")
def evaluated(small_demo, tmp_path_factory):
    from data_prep.search_log import main as search_log_main

    root = tmp_path_factory.mktemp("search_eval")
    checkpoint = one_step_checkpoint(small_demo, root / "run")
    manifests = [os.path.join(small_demo, "train.csv"), os.path.join(small_demo, "test.csv")]
    log_dir = str(root / "search")
    assert search_log_main(["simulate", "--catalogue", *manifests, "--new", manifests[1], "--out", log_dir,
                            "--queries", "300"]) == 0
    output = str(root / "out" / "search_eval.json")
    assert cli_main(["search-eval", "--checkpoint", checkpoint, "--catalogue", *manifests, "--log-dir", log_dir,
                     "--dims", "8,16", "--device", "cpu", "--output", output]) == 0
    with open(output) as handle:
        result = json.load(handle)
    return checkpoint, manifests, log_dir, output, result


def split_judgements(path):
    """Distinct queries in order of first appearance as (modality, text or path), and {(query, item): grade}."""
    queries, grades = {}, {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            if row["query_image"]:
                key = ("image", os.path.normpath(os.path.join(os.path.dirname(path), row["query_image"])))
            elif row["query_audio"]:
                key = ("audio", os.path.normpath(os.path.join(os.path.dirname(path), row["query_audio"])))
            else:
                key = ("text", " ".join(row["query"].split()).casefold())
            if key not in queries:
                queries[key] = (key[0], " ".join(row["query"].split()) if key[0] == "text" else key[1])
            pair = (list(queries).index(key), row["item_id"])
            grade = float(row["relevance"]) if row.get("relevance") else GRADES[row["event"]]
            grades[pair] = max(grades.get(pair, 0), grade)
    return list(queries.values()), grades


def test_every_split_and_modality_is_reported_with_metrics_in_range(evaluated):
    _, _, log_dir, output, result = evaluated
    with open(os.path.join(log_dir, "stats.json")) as handle:
        stats = json.load(handle)["splits"]
    assert set(result["splits"]) == set(SPLITS)
    for split in SPLITS:
        expected = {m for m, n in stats[split]["queries_by_modality"].items() if n} | {"all"}
        assert set(result["splits"][split]) == expected, split
        assert result["splits"][split]["all"]["full"]["n_queries"] == stats[split]["queries"]
        for modality, by_dim in result["splits"][split].items():
            assert set(by_dim) == {"8", "16", "full"}
            if modality != "all":
                assert by_dim["full"]["n_queries"] == stats[split]["queries_by_modality"][modality]
            for report in by_dim.values():
                for name in ("ndcg@10", "err@10", "rbp_p0.9", "mrr", "recall@10"):
                    assert 0.0 <= report[name] <= 1.0, (split, modality, name)
    assert os.path.getsize(os.path.join(os.path.dirname(output), "search_eval_ndcg.png")) > 0


@pytest.mark.parametrize("judged_by", ["log", "truth"])
def test_full_dimension_equals_graded_report_over_the_same_vectors(evaluated, judged_by, tmp_path):
    checkpoint, manifests, log_dir, _, result = evaluated
    if judged_by == "truth":  # the simulator's complete judgements of the same queries
        output = str(tmp_path / "truth.json")
        assert cli_main(["search-eval", "--checkpoint", checkpoint, "--catalogue", *manifests, "--log-dir",
                         log_dir, "--judged-by", "truth", "--device", "cpu", "--output", output]) == 0
        with open(output) as handle:
            result = json.load(handle)
        assert result["judged_by"] == "truth"
    with open(os.path.join(log_dir, "stats.json")) as handle:
        stats = json.load(handle)
    items = embed_manifests(checkpoint, manifests, BATCH, "cpu", progress=False)
    encoder = QueryEncoder(checkpoint, "cpu")
    held_out = set(stats["held_out_items"])
    for split in SPLITS:
        want_held = stats["splits"][split]["candidates"] == "held_out"
        candidates = [n for n, item in enumerate(items.ids) if (item in held_out) == want_held]
        position = {items.ids[n]: p for p, n in enumerate(candidates)}
        name = f"{split}.csv" if judged_by == "log" else f"{split}.truth.csv"
        queries, grades = split_judgements(os.path.join(log_dir, name))
        vectors = torch.zeros(len(queries), encoder.dim)
        for modality in ("text", "image", "audio"):
            rows = [n for n, (m, _) in enumerate(queries) if m == modality]
            for start in range(0, len(rows), BATCH):
                chunk = rows[start:start + BATCH]
                vectors[chunk] = encoder.encode(modality, [queries[n][1] for n in chunk])
        lists = rank_by_similarity(vectors, items.vectors["fused"][candidates], 100)
        for modality in ("all", "text", "image", "audio"):
            rows = [n for n, (m, _) in enumerate(queries) if modality in ("all", m)]
            if not rows:
                continue
            renumber = {q: i for i, q in enumerate(rows)}
            triples = [(renumber[q], position[item], g) for (q, item), g in grades.items() if q in renumber]
            relevance = GradedRelevance.from_triples(*zip(*triples), n_queries=len(rows))
            expected = graded_report(lists[rows], relevance, max_grade=3.0, k=10)
            got = result["splits"][split][modality]["full"]
            assert set(got) == set(expected)
            for name, value in expected.items():
                assert got[name] == pytest.approx(value, rel=1e-12, abs=1e-15), (split, modality, name)


def test_bad_flags_are_refused_naming_them(evaluated, tmp_path, capsys):
    checkpoint, manifests, log_dir, _, _ = evaluated
    base = ["search-eval", "--checkpoint", checkpoint, "--catalogue", *manifests, "--device", "cpu",
            "--output", str(tmp_path / "out.json")]
    cases = [
        (["--log-dir", log_dir, "--splits", "eval_nowhere"], "--splits"),
        (["--log-dir", log_dir, "--dims", "8,4096"], "--dims"),
        (["--log-dir", log_dir, "--k", "0"], "--k"),
        (["--log-dir", str(tmp_path)], "stats.json"),
        (["--log-dir", log_dir, "--max-grade", "2"], "--max-grade 2: "),  # the log has buys (3)
        (["--log-dir", log_dir, "--output", str(tmp_path)], "is a folder"),
        (["--log-dir", log_dir, "--fields-from", str(tmp_path)], "is a folder"),
    ]
    for extra, named in cases:
        assert cli_main(base + extra) == 2, extra
        assert named in capsys.readouterr().err, extra
    assert not (tmp_path / "out.json").exists()


def test_missing_split_file_and_unknown_item_are_config_errors(evaluated, tmp_path, capsys):
    checkpoint, manifests, log_dir, _, _ = evaluated
    copy = tmp_path / "log"
    copy.mkdir()
    for name in ("stats.json", "eval_in_domain.csv"):
        (copy / name).write_bytes(open(os.path.join(log_dir, name), "rb").read())
    base = ["search-eval", "--checkpoint", checkpoint, "--catalogue", *manifests, "--log-dir", str(copy),
            "--device", "cpu", "--output", str(tmp_path / "out.json")]
    assert cli_main(base + ["--splits", "eval_both_novel"]) == 2
    assert "eval_both_novel.csv" in capsys.readouterr().err
    with open(copy / "eval_in_domain.csv", "a") as handle:
        handle.write("red star,,,no-such-item,buy,2024-01-01T00:00:00Z,eval_in_domain,\n")
    assert cli_main(base + ["--splits", "eval_in_domain"]) == 2
    err = capsys.readouterr().err
    assert "eval_in_domain.csv" in err and "no-such-item" in err
    assert not (tmp_path / "out.json").exists()


# ---------------------------------------------------------------- the model is loaded once
# A loader that counts and delegates: the real model is still loaded, only its loads are counted.
PRODUCT_FIELDS = {"image": ("image", [], 1.0), "title": ("text", ["title"], 1.0),
                  "attributes": ("text", ["colour", "kind"], 2.0)}


def product_fields():
    from align.config import FieldConfig

    return {name: FieldConfig(*spec) for name, spec in PRODUCT_FIELDS.items()}


def count_calls(monkeypatch, modules, name):
    """Replace ``name`` in each of ``modules`` by one wrapper that records its first argument and calls
    the real function; returns the record."""
    calls = []
    real = getattr(modules[0], name)

    def counted(*args, **kwargs):
        calls.append(args[0] if args else None)
        return real(*args, **kwargs)

    for module in modules:
        monkeypatch.setattr(module, name, counted)
    return calls


def test_judge_loads_the_model_once_for_queries_and_catalogue(evaluated, monkeypatch):
    import align.index.embed as embed_module
    import align.index.search as search_module
    from align.searchlog.evaluate import judge

    checkpoint, manifests, log_dir, _, result = evaluated
    loads = count_calls(monkeypatch, [embed_module, search_module], "load_model")
    got, full_dim, _ = judge(checkpoint, manifests, log_dir, ["eval_in_domain", "eval_novel_products"], [8], BATCH,
                             "cpu", fields=product_fields())
    assert len(loads) == 1, loads
    assert full_dim == result["dim"] and set(got) == {"eval_in_domain", "eval_novel_products"}


def test_fields_embedding_loads_once_and_builds_no_modality_catalogue(evaluated, monkeypatch):
    """With fields the manifests are read once per field (their own text columns), the model loaded
    and the config read once, and the vectors are those of ``embed_fields`` on a fresh model."""
    import align.index.embed as embed_module
    from align.loading import load_model, model_folder, read_saved_config

    checkpoint, manifests, _, _, _ = evaluated
    fields = product_fields()
    reference = embed_module.embed_fields(load_model(checkpoint, torch.device("cpu")),
                                          read_saved_config(model_folder(checkpoint), [f"eval.batch_size={BATCH}"]),
                                          manifests, BATCH, torch.device("cpu"), fields)
    loads = count_calls(monkeypatch, [embed_module], "load_model")
    configs = count_calls(monkeypatch, [embed_module], "read_saved_config")
    loaders = count_calls(monkeypatch, [embed_module], "loader_from_config")
    items = embed_manifests(checkpoint, manifests, BATCH, "cpu", progress=False, fields=fields)
    assert (len(loads), len(configs)) == (1, 1), (loads, configs)
    # one loader per (field, manifest): none for a catalogue of the model's modalities
    assert len(loaders) == len(fields) * len(manifests), [config.data.columns.text for config in loaders]
    ids, vectors, masks = reference
    assert items.ids == ids and items.metadata["fusion"] == "fields"
    for name in vectors:
        assert torch.equal(items.vectors[name], vectors[name]), name
        assert torch.equal(items.masks[name], masks[name]), name


def without_times(metadata):
    from align.index.vectors import EMBEDDED_AT

    return {key: value for key, value in metadata.items() if key != EMBEDDED_AT}


@pytest.mark.parametrize("with_fields", [False, True])
def test_embedding_with_a_loaded_model_gives_the_vectors_of_a_fresh_load(evaluated, monkeypatch, with_fields):
    import align.index.embed as embed_module

    checkpoint, manifests, _, _, _ = evaluated
    fields = product_fields() if with_fields else None
    fresh = embed_manifests(checkpoint, manifests, BATCH, "cpu", progress=False, fields=fields)
    encoder = QueryEncoder(checkpoint, "cpu")
    encoder.encode("text", ["red striped scarf"])  # queries first, as judge() does
    loads = count_calls(monkeypatch, [embed_module], "load_model")
    shared = embed_manifests(checkpoint, manifests, BATCH, "cpu", progress=False, fields=fields, model=encoder.model)
    assert loads == []
    # when each embedding started (embedded_at) differs; what the vectors are must not
    assert shared.ids == fresh.ids and without_times(shared.metadata) == without_times(fresh.metadata)
    for name in fresh.vectors:
        assert torch.equal(shared.vectors[name], fresh.vectors[name]), name
        assert torch.equal(shared.masks[name], fresh.masks[name]), name
