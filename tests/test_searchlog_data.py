"""Search-log data: reading and checking a log (bad rows by reason, duplicates merged, events
mapped to grades), the search-log simulator (determinism, held-out queries and products, graded
relevance) and the ``align prep search-log`` tool."""
import csv
import json
import os

import numpy as np
import pytest

from align.errors import ConfigError, RunError
from align.searchlog.log import DROPPED_REASONS, EventGrades, read_search_log

CATALOGUE_IDS = ["a1", "b2", "c3", "007"]
LOG_COLUMNS = ["query", "query_image", "query_audio", "item_id", "relevance", "event", "timestamp"]


def _row(query, item, image="", audio="", relevance="", event="view", time=""):
    """The cells of one log row in ``LOG_COLUMNS`` order: a viewed query unless said otherwise."""
    return [query, image, audio, item, relevance, event, time]


# (row, the reason it must be counted under or None for a good row); rows are numbered from 1.
LOG_ROWS = [
    (_row("red star", "a1", time="2024-01-01T00:00:00Z"), None),
    (_row("Red  Star", "a1", event="BUY", time="1704067300"), "duplicate"),  # same query: case and spaces
    (_row("red star", "b2", relevance="2.5"), None),  # relevance wins over the event
    (_row("", "c3", image="photos/ok.png", event="cart"), None),
    (_row("blue ring", "007", relevance="0", event=""), None),
    (_row("blue ring", "007"), "duplicate"),
    (_row("", "a1"), "empty_query"),
    (_row("  ", "b2"), "empty_query"),
    (_row("red star", "a1", image="photos/ok.png"), "mixed_query"),
    (_row("red star", ""), "empty_item"),
    (_row("red star", "zz9"), "unknown_item"),
    (_row("", "zz9"), "empty_query"),  # the first reason that applies wins
    (_row("red star", "c3", relevance="abc"), "bad_relevance"),
    (_row("red star", "c3", relevance="-1", event=""), "bad_relevance"),
    (_row("green cross", "a1", event="hover"), "unknown_event"),
    (_row("green cross", "b2", event=""), "unknown_event"),
    (_row("green cross", "c3", time="yesterday"), "bad_timestamp"),
    (_row("", "a1", image="photos/missing.png"), "missing_media"),
    (_row("", "b2", audio="voice/missing.flac", event="buy"), "missing_media"),
]


def _write_log(folder, fmt: str) -> str:
    """The log above as CSV, JSONL (numbers as JSON numbers where they parse) or Parquet (text)."""
    os.makedirs(folder / "photos", exist_ok=True)
    (folder / "photos" / "ok.png").write_bytes(b"only its existence is checked")
    rows = [dict(zip(LOG_COLUMNS, cells)) for cells, _ in LOG_ROWS]
    path = str(folder / f"search.{fmt}")
    if fmt == "csv":
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=LOG_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == "jsonl":
        with open(path, "w") as handle:
            for row in rows:
                out = {}
                for key, value in row.items():
                    if value == "":
                        continue  # an absent key is an empty cell
                    try:
                        out[key] = float(value) if key in ("relevance", "timestamp") else value
                    except ValueError:
                        out[key] = value
                handle.write(json.dumps(out) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({c: pa.array([r[c] for r in rows], pa.string()) for c in LOG_COLUMNS}), path)
    return path


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_bad_rows_counted_exactly_by_reason(tmp_path, fmt):
    path = _write_log(tmp_path, fmt)
    log, report = read_search_log(path, CATALOGUE_IDS, max_bad_fraction=1.0)

    expected = {reason: sum(r == reason for _, r in LOG_ROWS) for reason in (*DROPPED_REASONS, "duplicate")}
    assert report.counts == expected
    assert report.total_rows == len(LOG_ROWS) and report.n_bad == 13
    for reason, examples in report.examples.items():  # examples name the right rows, 1-based
        rows = [i + 1 for i, (_, r) in enumerate(LOG_ROWS) if r == reason]
        assert [int(e.split(":")[0].split()[1]) for e in examples] == rows[:5], reason
    assert "same query and item as row 1" in report.examples["duplicate"][0]

    # What is left: one judgement per pair, the highest grade of its rows, the earliest time.
    judged = {(q.modality, q.text or q.media): dict(zip([log.item_ids[i] for i in items], grades.tolist()))
              for q, items, grades in log.judgements()}
    assert judged == {("text", "red star"): {"a1": 3.0, "b2": 2.5}, ("image", "photos/ok.png"): {"c3": 2.0},
                      ("text", "blue ring"): {"007": 1.0}}
    first = np.flatnonzero((log.query_codes == 0) & (log.items == 0))[0]
    assert log.times[first] == 1704067200.0  # 2024-01-01T00:00:00Z, earlier than the BUY row's
    assert log.modality_counts() == {"text": 2, "image": 1, "audio": 0}
    assert log.queries[1].path == str(tmp_path / "photos" / "ok.png")


def test_too_many_bad_rows_names_the_file_and_rows(tmp_path, capsys):
    from align.cli import main as align

    path = _write_log(tmp_path, "csv")
    with pytest.raises(RunError) as error:
        read_search_log(path, CATALOGUE_IDS, max_bad_fraction=0.5)  # 13 of 19 dropped
    message = str(error.value)
    assert path in message and "row 7: no query text" in message and "row 11: item 'zz9'" in message
    assert "68.42%" in message

    catalogue = tmp_path / "catalogue.csv"
    catalogue.write_text("id,title\n" + "".join(f"{i},thing {i}\n" for i in CATALOGUE_IDS))
    report = tmp_path / "report.json"
    argv = ["prep", "search-log", "validate", "--log", path, "--catalogue", str(catalogue), "--report", str(report)]
    assert align(argv) == 1
    err = capsys.readouterr().err
    assert path in err and "row 18: query file" in err and "missing_media: 2" in err
    written = json.loads(report.read_text())
    assert written["ok"] is False and written["counts"]["duplicate"] == 2 and written["pairs"] == 4
    assert align(argv + ["--max-bad-fraction", "0.7"]) == 0
    assert "4 judged pairs of 3 queries" in capsys.readouterr().out


def test_events_map_to_grades(tmp_path):
    assert EventGrades().grades == {"view": 1.0, "click": 1.0, "cart": 2.0, "buy": 3.0, "purchase": 3.0}
    assert EventGrades.parse(" View=0.5, cart=2 ,buy=4").grades == {"view": 0.5, "cart": 2.0, "buy": 4.0}
    for bad in ("view=x", "view", "view=-1", "view=nan", "view=1,VIEW=2", ""):
        with pytest.raises(ConfigError):
            EventGrades.parse(bad)

    log_path = tmp_path / "log.csv"
    log_path.write_text("query,item_id,event,relevance\nq,a1,view,\nq,b2,Cart,\nq,c3,buy,\nq,007,buy,0.25\n"
                        "r,a1,hover,\n")
    log, report = read_search_log(str(log_path), CATALOGUE_IDS, EventGrades.parse("view=0.5,cart=2,buy=4,hover=0"))
    assert report.n_bad == 0
    assert dict(zip(log.items.tolist(), log.grades.tolist())) == {0: 0.0, 1: 2.0, 2: 4.0, 3: 0.25}
    assert log.grades[log.query_codes == 0].tolist() == [0.5, 2.0, 4.0, 0.25]
    _, report = read_search_log(str(log_path), CATALOGUE_IDS, max_bad_fraction=1.0)  # default: no "hover"
    assert report.counts["unknown_event"] == 1 and "'hover'" in report.examples["unknown_event"][0]

    no_grade = tmp_path / "no_grade.csv"
    no_grade.write_text("query,item_id\nq,a1\n")
    with pytest.raises(RunError, match="relevance.*event"):
        read_search_log(str(no_grade), CATALOGUE_IDS)


def test_a_typed_query_is_one_query_whatever_its_unicode_form_case_and_spacing(tmp_path):
    """"café" typed as one code point or as e + a combining accent (NFC and NFD: two clients), in
    capitals or with doubled spaces, is one query: its judgements merge instead of counting twice."""
    log_path = tmp_path / "log.csv"
    forms = ["caf\u00e9 star", "cafe\u0301 star", "CAF\u00c9  star", "caf\u00e9 star "]
    with open(log_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["query", "item_id", "event"])
        writer.writerows([[form, "a1", "view"] for form in forms] + [[forms[1], "b2", "buy"]])
    log, report = read_search_log(str(log_path), CATALOGUE_IDS, max_bad_fraction=1.0)
    assert len(log.queries) == 1 and report.counts["duplicate"] == 3
    assert log.queries[0].text == "caf\u00e9 star"  # as first spelled, in its composed form
    assert sorted(zip(log.items.tolist(), log.grades.tolist())) == [(0, 1.0), (1, 3.0)]


# ------------------------------------------------------------------------------------------------
# the simulator
# ------------------------------------------------------------------------------------------------
SPLIT_FILES = ("train", "eval_in_domain", "eval_novel_queries", "eval_novel_products", "eval_both_novel")


def _simulate(small_demo, out, *extra):
    from data_prep.search_log import main

    manifests = [os.path.join(small_demo, "train.csv"), os.path.join(small_demo, "test.csv")]
    assert main(["simulate", "--catalogue", *manifests, "--new", manifests[1], "--out", str(out),
                 "--queries", "1500", *extra]) == 0
    return manifests


@pytest.fixture(scope="module")
def simulated(small_demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("search_sim")
    manifests = _simulate(small_demo, out)
    return out, manifests


def test_simulator_is_deterministic_from_its_seed(small_demo, tmp_path):
    # Sibling folders: photo/voice paths are written relative to the output folder.
    for name in ("first", "again"):
        _simulate(small_demo, tmp_path / name)
    for name in ("log.csv", *(f"{s}.csv" for s in SPLIT_FILES), "stats.json"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "first" / name).read_bytes(), name
    _simulate(small_demo, tmp_path / "other", "--seed", "1")
    assert (tmp_path / "other" / "log.csv").read_bytes() != (tmp_path / "first" / "log.csv").read_bytes()


@pytest.mark.once  # numpy draws and file bytes: no float kernel in it
def test_val_fraction_keeps_training_queries_apart_and_moves_no_other_split(small_demo, tmp_path):
    """--val-fraction moves a share of the training queries, all their sessions, to val.csv (with
    its complete judgements); the evaluation splits stay byte for byte."""
    out, with_val = tmp_path / "plain", tmp_path / "with_val"  # siblings: media paths are relative
    _simulate(small_demo, out)
    _simulate(small_demo, with_val, "--val-fraction", "0.2")
    for name in SPLIT_FILES[1:]:
        assert (with_val / f"{name}.csv").read_bytes() == (out / f"{name}.csv").read_bytes(), name
        assert (with_val / f"{name}.truth.csv").read_bytes() == (out / f"{name}.truth.csv").read_bytes(), name
    assert not (out / "val.csv").exists()  # off by default

    def queries(path):
        with open(path, newline="") as handle:
            return {(r["query"], r["query_image"], r["query_audio"]) for r in csv.DictReader(handle)}

    train, val, before = queries(with_val / "train.csv"), queries(with_val / "val.csv"), queries(out / "train.csv")
    assert val and not (val & train) and train | val == before  # a query is on one side, whole
    assert 0.1 < len(val) / len(before) < 0.3
    assert queries(with_val / "val.truth.csv") == val
    stats = json.loads((with_val / "stats.json").read_text())["splits"]
    assert stats["val"]["candidates"] == "seen" and stats["val"]["queries"] == len(val)


def _catalogue(manifests):
    rows = {}
    for manifest in manifests:
        with open(manifest, newline="") as handle:
            for row in csv.DictReader(handle):
                row["image_path"] = os.path.join(os.path.dirname(manifest), row["image"]) if row["image"] else ""
                row["audio_path"] = os.path.join(os.path.dirname(manifest), row["audio"]) if row["audio"] else ""
                rows[row["id"]] = row
    return rows


def _simulated_folder(simulated):
    """(folder, manifests, catalogue rows by id, ids, stats.json, held-out ids) of a simulation."""
    out, manifests = simulated
    catalogue = _catalogue(manifests)
    stats = json.loads((out / "stats.json").read_text())
    return out, manifests, catalogue, list(catalogue), stats, set(stats["held_out_items"])


def test_splits_share_no_held_out_query_or_product_with_training(simulated):
    out, manifests, catalogue, ids, stats, held_out = _simulated_folder(simulated)
    with open(manifests[1], newline="") as handle:
        new_ids = {row["id"] for row in csv.DictReader(handle)}
    assert new_ids <= held_out and held_out < set(ids)  # --new items are held out, with others

    logs = {s: read_search_log(str(out / f"{s}.csv"), ids)[0] for s in SPLIT_FILES}  # every file validates
    queries = {s: {q.key for q in log.queries} for s, log in logs.items()}
    items = {s: {log.item_ids[i] for i in log.items} for s, log in logs.items()}
    for split, log in logs.items():
        assert len(log) > 0 and queries[split], f"{split} is empty"

    # Products: training never sees a held-out one; each split is on its own side.
    assert not items["train"] & held_out
    assert not (items["eval_in_domain"] | items["eval_novel_queries"]) & held_out
    assert (items["eval_novel_products"] | items["eval_both_novel"]) <= held_out
    # Queries: the in-domain and novel ones never occur in training; novel-product ones are not novel.
    for split in ("eval_in_domain", "eval_novel_queries", "eval_both_novel"):
        assert not queries[split] & queries["train"], split
    assert not queries["eval_novel_queries"] & (queries["eval_in_domain"] | queries["eval_novel_products"])
    assert not queries["eval_novel_products"] & (queries["eval_novel_queries"] | queries["eval_both_novel"])
    assert queries["eval_novel_products"] & queries["train"]  # seen queries on unseen products
    # No photo or voice of a held-out product is a training query; training never says a reserved word.
    media_of_held_out = {os.path.realpath(catalogue[i][m]) for i in held_out for m in ("image_path", "audio_path")
                         if catalogue[i][m]}
    train_media = {os.path.realpath(q.path) for q in logs["train"].queries if q.path}
    assert train_media and not train_media & media_of_held_out
    train_words = {w for q in logs["train"].queries for w in q.text.split()}
    assert not train_words & {w for phrase in stats["reserved_words"] for w in phrase.split()}
    # Novel queries all come from held-out templates, typos aside, or held-out products' media.
    novel_text = [q.text for q in logs["eval_novel_queries"].queries if q.modality == "text"]
    prefixes = [t.split("{}")[0] for t in stats["held_out_templates"]]
    suffixes = [t.split("{}")[1] for t in stats["held_out_templates"]]
    shaped = [any(t.startswith(p) and t.endswith(s) for p, s in zip(prefixes, suffixes)) for t in novel_text]
    assert np.mean(shaped) > 0.85
    assert {q.modality for q in logs["train"].queries} == {"text", "image", "audio"}


def test_relevance_follows_attribute_match(simulated):
    out, manifests = simulated
    catalogue = _catalogue(manifests)
    with open(out / "log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    depth = {"view": 1, "cart": 2, "buy": 3}
    pairs = {}
    for row in rows:
        key = (row["query"], row["query_image"], row["query_audio"], row["item_id"])
        pairs[key] = (max(pairs.get(key, (0,))[0], depth[row["event"]]), row["intent"])
    grades = np.array([g for g, _ in pairs.values()])
    share = np.bincount(grades, minlength=4)[1:] / len(grades)
    assert (share > 0.1).all(), share  # some 1, some 2, some 3
    assert share[0] > share[2]  # more views than buys

    def all_match(item, intent):
        return all(catalogue[item][kv.split("=")[0]] == kv.split("=")[1] for kv in intent.split(";"))

    matched = {g: np.mean([all_match(k[3], intent) for k, (grade, intent) in pairs.items() if grade == g])
               for g in (1, 2, 3)}
    assert matched[3] > 0.7 and matched[1] < matched[2] < matched[3], matched
    stats = json.loads((out / "stats.json").read_text())
    assert sum(s["rows"] for s in stats["splits"].values()) == len(rows) == stats["rows"]


def _level(item, intent):
    """The docstring's match level, restated: 3 all mentioned match; 2 one non-noun mismatch and two
    or more match; 1 the noun is mentioned and matches, or no noun and something matches; else 0."""
    matched = sum(item[name] == value for name, value in intent.items())
    mismatched = len(intent) - matched
    noun_ok = "kind" not in intent or item["kind"] == intent["kind"]
    if mismatched == 0:
        return 3
    if mismatched == 1 and noun_ok and matched >= 2:
        return 2
    return int(("kind" in intent and noun_ok) or ("kind" not in intent and matched > 0))


def test_complete_judgements_grade_every_fitting_candidate_of_the_log_queries(simulated):
    out, _, catalogue, ids, stats, held_out = _simulated_folder(simulated)
    intents = {}
    with open(out / "log.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            intent = dict(kv.split("=") for kv in row["intent"].split(";"))
            key = (row["query"], row["query_image"], row["query_audio"])
            assert intents.setdefault(key, intent) == intent  # one intent per distinct query
    rng = np.random.default_rng(0)
    for split in SPLIT_FILES[1:]:
        log, _ = read_search_log(str(out / f"{split}.csv"), ids)
        truth, report = read_search_log(str(out / f"{split}.truth.csv"), ids)
        assert report.n_bad == report.n_merged == 0 and truth.queries == log.queries  # same queries, same order
        assert stats["complete_judgements"][split] == len(truth)
        side = [i for i in ids if (i in held_out) == (stats["splits"][split]["candidates"] == "held_out")]
        with open(out / f"{split}.truth.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert {r["item_id"] for r in rows} <= set(side)
        by_query = {}
        for row in rows:
            by_query.setdefault((row["query"], row["query_image"], row["query_audio"]), {})[row["item_id"]] = \
                int(row["relevance"])
        assert len(by_query) == len(log.queries)
        for n in rng.choice(len(by_query), size=min(25, len(by_query)), replace=False):
            key = list(by_query)[n]
            expected = {i: _level(catalogue[i], intents[key]) for i in side}
            assert {i: g for i, g in by_query[key].items() if g} == {i: g for i, g in expected.items() if g}, key
            shown = {log.item_ids[i] for i in log.judgements()[n][1]}  # the truth file keeps the log's order
            assert {i for i, g in by_query[key].items() if not g} <= shown  # grade 0: logged, but does not fit
    # Every logged pair of a query that fits it is judged with its match level: the log is a sample.
    with open(out / "eval_in_domain.csv", newline="") as handle:
        logged = [(r["query"], r["query_image"], r["query_audio"], r["item_id"]) for r in csv.DictReader(handle)]
    with open(out / "eval_in_domain.truth.csv", newline="") as handle:
        judged = {(r["query"], r["query_image"], r["query_audio"], r["item_id"]) for r in csv.DictReader(handle)}
    fitting = [p for p in logged if _level(catalogue[p[3]], intents[p[:3]]) > 0]
    assert fitting and all(p in judged for p in fitting)
    assert len(judged) > 3 * len(set(logged))  # a log judges a small part of what fits


def test_simulator_refuses_bad_knobs(small_demo, tmp_path):
    from data_prep.search_log import main

    with pytest.raises(ConfigError, match="--typo-prob"):
        main(["simulate", "--catalogue", os.path.join(small_demo, "train.csv"), "--out", str(tmp_path),
              "--typo-prob", "1.5"])
    assert not os.listdir(tmp_path)
