"""Recommender data: interaction logs (reading, bad rows, formats), the shop simulator, the
train/test splits, and the ``align prep interactions`` / ``shop-sim`` tools.

Expected values come from hand-made files, the standard library (``datetime``) or brute-force
Python loops, never from the code under test.
"""
from __future__ import annotations

import datetime
import json
import os

import numpy as np
import pytest

from align.errors import ConfigError, RunError
from align.rec.interactions import (
    InteractionColumns, Interactions, read_catalogue_ids, read_interactions, write_interactions,
)
from align.rec.simulate import EVENT_WEIGHTS, ShopSimConfig, simulate_shop
from align.rec.split import leave_last_out, temporal_split, user_histories

CATALOGUE = ["a1", "a2", "a3", "b1", "b2", "007"]
NEW_YEAR_2024 = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc).timestamp()
ATTRIBUTES = {"kind": ["circle", "square", "star"], "colour": ["red", "green", "blue", "purple"],
              "size": ["small", "large"]}


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------------------------------------
# reading logs
# ------------------------------------------------------------------------------------------------
BAD_LOG = """user_id,item_id,timestamp,event,weight
u1,a1,100,view,1
u1,x9,101,view,1
u2,a2,102,click,2
,a1,103,view,1
u2,zz,104,view,1
u3,a3,yesterday,view,1
u1,a1,100,view,1
u3,b1,105,view,-1
u3,b2,2024-01-01T00:00:00Z,purchase,4
u1,a1,100,click,1
u4,,106,view,1
"""


def test_bad_rows_are_counted_once_per_reason_and_never_used(tmp_path):
    path = write(tmp_path / "log.csv", BAD_LOG)
    inter, bad = read_interactions(path, CATALOGUE, max_bad_fraction=1.0)
    assert bad.counts == {"empty_user": 1, "empty_item": 1, "unknown_item": 2, "bad_timestamp": 1,
                          "bad_weight": 1, "duplicate": 1}
    assert bad.total_rows == 11
    assert bad.examples["unknown_item"] == ["row 2: item 'x9' not in the catalogue",
                                            "row 5: item 'zz' not in the catalogue"]
    assert bad.examples["duplicate"] == ["row 7: exact duplicate of row 1"]  # row 10 differs by event
    assert bad.examples["bad_timestamp"][0].startswith("row 6: timestamp 'yesterday'")
    assert bad.examples["bad_weight"][0].startswith("row 8: weight '-1'")
    assert "header" in bad.report()

    # The kept rows are rows 1, 3, 9 and 10, in file order.
    assert len(inter) == 4
    assert [inter.user_ids[u] for u in inter.users] == ["u1", "u2", "u3", "u1"]
    assert [inter.item_ids[i] for i in inter.items] == ["a1", "a2", "b2", "a1"]
    assert inter.item_ids == CATALOGUE  # the whole catalogue, untouched items included
    np.testing.assert_array_equal(inter.times, [100.0, 102.0, NEW_YEAR_2024, 100.0])
    np.testing.assert_array_equal(inter.weights, np.array([1, 2, 4, 1], dtype=np.float32))
    assert inter.events.tolist() == ["view", "click", "purchase", "click"]


def test_too_many_bad_rows_is_an_error_naming_the_file_fraction_and_reasons(tmp_path):
    path = write(tmp_path / "log.csv", BAD_LOG)
    with pytest.raises(RunError) as error:
        read_interactions(path, CATALOGUE)  # default limit 1%
    message = str(error.value)
    assert path in message and "63.64%" in message  # 7 of 11 rows
    assert "unknown_item: 2" in message and "row 2: item 'x9' not in the catalogue" in message


def test_timestamps_in_seconds_or_iso_8601_naive_means_utc(tmp_path):
    stamps = ["1704067200", "1704067200.5", "2024-01-01T00:00:00Z", "2024-01-01T01:00:00+01:00",
              "2024-01-01 00:00:00", "2024-01-01", "2023-12-31T19:00:00-05:00", "2024-01-01T00:00:00.250Z"]
    expected = [0, 0.5, 0, 0, 0, 0, 0, 0.25]
    rows = "".join(f"u{k},a1,{stamp},view,1\n" for k, stamp in enumerate(stamps))
    path = write(tmp_path / "log.csv", "user_id,item_id,timestamp,event,weight\n" + rows)
    inter, bad = read_interactions(path, CATALOGUE)
    assert bad.n_bad == 0
    np.testing.assert_array_equal(inter.times, NEW_YEAR_2024 + np.array(expected))


def test_parquet_timestamp_columns_and_json_mixed_types(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    plus_one = datetime.timezone(datetime.timedelta(hours=1))
    cases = [(datetime.datetime(2024, 1, 1, 1), pa.timestamp("ms"), 3600.0),  # naive = UTC
             (datetime.datetime(2024, 1, 1, 1, tzinfo=plus_one), pa.timestamp("us", tz="+01:00"), 0.0)]
    for moment, kind, shift in cases:
        table = pa.table({"user_id": ["u1"], "item_id": ["a1"], "timestamp": pa.array([moment], type=kind)})
        pq.write_table(table, tmp_path / "log.parquet")
        inter, _ = read_interactions(str(tmp_path / "log.parquet"), CATALOGUE)
        assert inter.times.tolist() == [NEW_YEAR_2024 + shift]
    # A JSONL column with numbers in some rows and text in others (pyarrow refuses it): numbers
    # are ids as written, so 7 and "007" are different users and item 7 is not item "007".
    lines = [{"user_id": 7, "item_id": "007", "timestamp": 5}, {"user_id": "007", "item_id": "a1", "timestamp": "6"},
             {"user_id": 7, "item_id": 7, "timestamp": 7}]
    path = write(tmp_path / "mixed.jsonl", "\n".join(json.dumps(r) for r in lines) + "\n\n")
    inter, bad = read_interactions(path, CATALOGUE, max_bad_fraction=1.0)
    assert inter.user_ids == ["7", "007"] and [inter.item_ids[i] for i in inter.items] == ["007", "a1"]
    assert bad.counts["unknown_item"] == 1 and inter.times.tolist() == [5.0, 6.0]


@pytest.mark.parametrize("suffix", ["csv", "jsonl", "parquet"])
@pytest.mark.parametrize("with_events", [True, False])
def test_write_then_read_gives_the_same_log(tmp_path, suffix, with_events):
    rng = np.random.default_rng(0)
    n = 50
    user_ids = ["007", 'quote "q"', "comma,user", "ünïcode"]
    inter = Interactions(
        users=np.r_[0, 1, 2, 3, rng.integers(0, 4, n - 4)], items=rng.integers(0, len(CATALOGUE), n),
        times=np.r_[rng.uniform(0, 2e9, n - 1), 1 / 3], weights=rng.uniform(0, 5, n).astype(np.float32),
        events=rng.choice(["view", "click", "purchase"], n) if with_events else None,
        user_ids=user_ids, item_ids=CATALOGUE)
    path = str(tmp_path / f"log.{suffix}")
    write_interactions(inter, path)
    assert os.listdir(tmp_path) == [f"log.{suffix}"]  # no temporary file left behind
    back, bad = read_interactions(path, CATALOGUE)
    assert bad.n_bad == 0 and back.user_ids == user_ids
    for name in ("users", "items", "times", "weights"):
        np.testing.assert_array_equal(getattr(back, name), getattr(inter, name), err_msg=name)
        assert getattr(back, name).dtype == {"users": np.int64, "items": np.int64, "times": np.float64,
                                             "weights": np.float32}[name]
    if with_events:
        assert back.events.tolist() == inter.events.tolist()
    else:
        assert back.events is None


def test_a_missing_column_names_the_file_the_column_and_the_columns_there(tmp_path):
    path = write(tmp_path / "log.csv", "user_id,item_id,when\nu1,a1,5\n")
    with pytest.raises(RunError) as error:
        read_interactions(path, CATALOGUE)
    assert path in str(error.value) and "'timestamp'" in str(error.value)
    assert "['user_id', 'item_id', 'when']" in str(error.value)
    # event/weight under their default names are optional; a weight column named otherwise is not
    inter, _ = read_interactions(path, CATALOGUE, InteractionColumns(time="when"))
    assert inter.weights.tolist() == [1.0] and inter.events is None
    with pytest.raises(RunError, match="'rating' is missing"):
        read_interactions(path, CATALOGUE, InteractionColumns(time="when", weight="rating"))
    with pytest.raises(RunError, match="unknown file format"):
        read_interactions(str(tmp_path / "log.txt"), CATALOGUE)


def test_catalogue_ids_in_file_order_and_duplicates_name_both_files(tmp_path):
    first = write(tmp_path / "a.csv", "id,title\n007,x\na2,y\n")
    second = tmp_path / "b.jsonl"
    second.write_text('{"id": "b1"}\n{"id": 5}\n')
    assert read_catalogue_ids([first, str(second)]) == ["007", "a2", "b1", "5"]
    third = write(tmp_path / "c.csv", "id\nzz\na2\n")
    with pytest.raises(RunError) as error:
        read_catalogue_ids([first, str(second), third])
    assert "'a2'" in str(error.value) and first in str(error.value) and third in str(error.value)


# ------------------------------------------------------------------------------------------------
# the simulator
# ------------------------------------------------------------------------------------------------
def small_shop(n_items=600, n_new=60, seed=0, **knobs):
    rng = np.random.default_rng(123)
    attributes = {name: list(np.asarray(values)[rng.integers(0, len(values), n_items)])
                  for name, values in ATTRIBUTES.items()}
    ids = [f"item{i}" for i in range(n_items)]
    new = np.arange(n_items - n_new, n_items)
    config = ShopSimConfig(n_users=400, seed=seed, **knobs)
    shop = simulate_shop(ids, attributes, config, new)
    return ids, attributes, new, shop.log, shop.release, shop.cutoff


def test_simulator_is_deterministic_by_seed():
    first, second, other = small_shop(seed=1), small_shop(seed=1), small_shop(seed=2)
    for name in ("users", "items", "times", "weights", "events"):
        np.testing.assert_array_equal(getattr(first[3], name), getattr(second[3], name))
    np.testing.assert_array_equal(first[4], second[4])
    assert len(first[3]) != len(other[3]) or not np.array_equal(first[3].items, other[3].items)


def test_simulated_log_respects_release_times_and_marks_the_new_block_late():
    ids, _, new, log, release, cutoff = small_shop()
    assert np.all(np.diff(log.times) >= 0)  # sorted by time
    assert np.all(log.times >= release[log.items])  # nothing is touched before its release
    assert np.all(release[new] >= cutoff)
    late = release >= cutoff
    assert late.sum() == round(0.1 * len(ids))  # the new block plus random items up to 10%
    assert not np.isin(log.items[log.times < cutoff], np.flatnonzero(late)).any()
    assert np.isin(np.flatnonzero(late), log.items).mean() > 0.5  # late items are then bought
    weights = {label: EVENT_WEIGHTS[label] for label in ("view", "click", "purchase")}
    assert all(w == weights[e] for w, e in zip(log.weights.tolist(), log.events.tolist()))


def test_simulated_users_and_items_look_like_a_shop():
    ids, attributes, _, log, _, _ = small_shop(cold_user_fraction=0.2)
    per_user = np.bincount(log.users, minlength=len(log.user_ids))
    assert abs(np.mean(per_user <= 2) - 0.2) < 0.03 and per_user.min() >= 1
    per_item = np.sort(np.bincount(log.items, minlength=len(ids)))[::-1]
    assert per_item[: len(ids) // 10].sum() / per_item.sum() > 0.2  # long tail: top 10% hold > 20%

    # Tastes: a user's items share a colour far more often than popularity alone makes them.
    def colour_focus(inter):
        colour = np.asarray(attributes["colour"])[inter.items]
        shares = [max(np.unique(colour[inter.users == u], return_counts=True)[1]) / np.sum(inter.users == u)
                  for u in np.flatnonzero(np.bincount(inter.users) >= 10)]
        return np.mean(shares)

    no_taste = simulate_shop(ids, {}, ShopSimConfig(n_users=400))[0]
    assert colour_focus(log) > colour_focus(no_taste) + 0.1


def test_simulator_knobs_out_of_range_name_the_knob_and_its_flag():
    with pytest.raises(ConfigError, match=r"noise_click_prob = 1.5.*--noise-click-prob"):
        simulate_shop(["a"], {}, ShopSimConfig(noise_click_prob=1.5))
    with pytest.raises(ConfigError, match="n_users"):
        simulate_shop(["a"], {}, ShopSimConfig(n_users=10.5))


# ------------------------------------------------------------------------------------------------
# splits
# ------------------------------------------------------------------------------------------------
def test_temporal_split_leaks_nothing_and_marks_cold_items_and_users():
    ids, _, _, log, release, cutoff = small_shop()
    split = temporal_split(log, cutoff)
    assert split.cutoff == cutoff and len(split.train) + len(split.test) == len(log)
    assert split.train.times.max() < cutoff <= split.test.times.min()
    trained = set(split.train.items.tolist())
    assert split.cold_items.tolist() == [i not in trained for i in range(len(ids))]
    assert np.all(split.cold_items[release >= cutoff])  # late items are cold
    counts = {}
    for u in split.train.users.tolist():
        counts[u] = counts.get(u, 0) + 1
    assert split.cold_users.tolist() == [counts.get(u, 0) <= 2 for u in range(len(log.user_ids))]
    default = temporal_split(log, test_quantile=0.25)
    assert abs(len(default.test) / len(log) - 0.25) < 0.01
    assert default.train.times.max() < default.cutoff <= default.test.times.min()


def test_leave_last_out_takes_each_users_last_row_ties_by_row_order():
    inter = Interactions(users=np.array([0, 0, 0, 1, 2, 2]), items=np.array([1, 2, 3, 4, 5, 0]),
                         times=np.array([5.0, 3.0, 5.0, 9.0, 1.0, 2.0]), weights=np.ones(6, np.float32),
                         events=None, user_ids=["a", "b", "c"], item_ids=[str(i) for i in range(6)])
    split = leave_last_out(inter)
    assert sorted(zip(split.test.users.tolist(), split.test.items.tolist())) == [(0, 3), (1, 4), (2, 0)]
    assert split.train.users.tolist() == [0, 0, 2] and split.cold_users.tolist() == [True, True, True]
    assert [h.tolist() for h in user_histories(inter)] == [[2, 1, 3], [4], [5, 0]]

    log = small_shop()[3]
    split = leave_last_out(log)
    rows = {}
    for row, (user, time) in enumerate(zip(log.users.tolist(), log.times.tolist())):
        rows.setdefault(user, []).append((time, row))
    expected_test = sorted(max(r)[1] for r in rows.values())
    test_rows = np.flatnonzero(np.isin(np.arange(len(log)), expected_test))
    np.testing.assert_array_equal(split.test.items, log.items[test_rows])
    assert len(split.test) == len(log.user_ids) and len(split.train) == len(log) - len(log.user_ids)
    last_train = {}
    for user, time in zip(split.train.users.tolist(), split.train.times.tolist()):
        last_train[user] = max(time, last_train.get(user, -np.inf))
    assert all(last_train.get(u, -np.inf) <= t for u, t in zip(split.test.users.tolist(), split.test.times.tolist()))
    histories = user_histories(log)
    assert len(histories) == len(log.user_ids)
    assert all(h.tolist() == [log.items[r] for _, r in sorted(rows[u])] for u, h in enumerate(histories))


# ------------------------------------------------------------------------------------------------
# the prep tools
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_catalogue(tmp_path):
    rng = np.random.default_rng(5)
    paths = []
    for name, first, count in (("train.csv", 0, 80), ("test.csv", 80, 10)):
        lines = ["id,title,kind,colour,pattern,size"]
        for i in range(first, first + count):
            values = [rng.choice(v) for v in (["circle", "star"], ["red", "blue", "green"], ["solid", "dots"],
                                              ["small", "large"])]
            lines.append(f"{i:04d},item {i}," + ",".join(values))
        paths.append(write(tmp_path / name, "\n".join(lines) + "\n"))
    return paths


def test_shop_sim_then_interactions_cli(tmp_path, tiny_catalogue, capsys):
    from data_prep import interactions as prep_interactions
    from data_prep import shop_sim

    train, test = tiny_catalogue
    out = tmp_path / "shop"
    argv = ["--catalogue", train, test, "--new", test, "--out", str(out), "--users", "60", "--seed", "3",
            "--horizon-days", "30"]
    assert shop_sim.main(argv) == 0
    assert "cold users" in capsys.readouterr().out
    first = (out / "interactions.csv").read_bytes()
    assert shop_sim.main(argv) == 0 and (out / "interactions.csv").read_bytes() == first
    items = json.loads((out / "items.json").read_text())
    assert items["config"]["n_users"] == 60 and items["config"]["horizon_days"] == 30.0
    assert items["ids"] == [f"{i:04d}" for i in range(90)]
    assert all(items["release_time"][i] >= items["cutoff"] for i in range(80, 90))

    report = tmp_path / "report.json"
    argv = ["--interactions", str(out / "interactions.csv"), "--catalogue", train, test, "--report", str(report)]
    assert prep_interactions.main(argv) == 0
    assert "kept" in capsys.readouterr().out
    summary = json.loads(report.read_text())
    assert summary["ok"] and summary["bad_rows"] == 0 and summary["users"] == 60
    assert summary["items_touched"] + summary["items_never_touched"] == 90
    assert summary["kept_rows"] == first.count(b"\n") - 1

    # Too many bad rows: the report is still written, then the RunError the CLI turns into exit 1.
    broken = write(tmp_path / "broken.csv", (out / "interactions.csv").read_text() + "someone,nope,1,view,1\n")
    with pytest.raises(RunError, match="broken.csv"):
        prep_interactions.main(["--interactions", broken, "--catalogue", train, test, "--report", str(report),
                                "--max-bad-fraction", "0"])
    assert json.loads(report.read_text())["ok"] is False

    with pytest.raises(RunError, match="not in the --catalogue"):
        shop_sim.main(["--catalogue", train, "--new", test, "--out", str(out)])
