"""Keeping recommendations fresh: live events through a REAL uvicorn `align serve` change the user's
next recommendation with no retraining, within bounded memory, and bad events get a 4xx naming the
field; `align rec-update` continues training a saved head on new events only (its starting loss is
the checkpoint's, computed here from the saved files; it ranks the next window better than no
update) and swaps its folder in at once."""
import json
import math
import os

import numpy as np
import pytest
import torch

from align.rec.events import Event, LiveEvents
from align.rec.interactions import (InteractionColumns, Interactions, read_catalogue_ids, read_interactions,
                                    write_interactions)
from tests.test_rec_head import rec_overrides, shop  # noqa: F401  (pytest fixtures)
from tests.test_search import checkpoint  # noqa: F401
from tests.test_serve import _first_user, head, items, server  # noqa: F401


# ---------------------------------------------------------------- the store's bounds


def test_a_user_keeps_the_newest_n_events_by_time():
    store = LiveEvents(max_events_per_user=3, max_users=10)
    for n, when in enumerate([50.0, 10.0, 40.0, 20.0]):  # arrive out of order
        store.add(Event("u", f"i{n}", "view", when))
    # 10 (i1) was the oldest of four: dropped; the rest read oldest first
    assert store.user_items("u") == ["i3", "i2", "i0"]
    assert store.add(Event("u", "late", "view", 5.0)) == 3  # older than all three kept: it is the one dropped
    assert store.user_items("u") == ["i3", "i2", "i0"]
    assert store.stats()["events"] == 3


def test_the_least_recently_used_user_is_forgotten_past_the_bound():
    store = LiveEvents(max_events_per_user=2, max_users=2)
    store.add(Event("a", "i1", "view", 1.0))
    store.add(Event("b", "i2", "view", 2.0))
    assert store.user_items("a") == ["i1"]  # a read is a use: now b is the least recent
    store.add(Event("c", "i3", "view", 3.0))
    assert store.user_items("b") == [] and store.user_items("a") == ["i1"] and store.user_items("c") == ["i3"]
    assert len(store) == 2 and store.stats()["evicted_users"] == 1
    for n in range(50):  # however many users and events come, N x M events at most
        store.add(Event(f"user{n}", "i1", "view", float(n)))
        store.add(Event(f"user{n}", "i2", "view", float(n)))
        store.add(Event(f"user{n}", "i3", "view", float(n)))
    assert store.stats()["users"] == 2 and store.stats()["events"] == 4


# ---------------------------------------------------------------- the service


def recommended(server, body):
    response = server.client.post("/recommend", json={**body, "k": 5})
    assert response.status_code == 200, response.text
    return response.json()


def library_top(recommender, history, k=5):
    rows, _ = recommender.recommend([recommender.rows_of(history, "test")], k)
    return [recommender.item_ids[r] for r in rows[0] if r >= 0]


def test_events_change_the_users_next_recommendation_with_no_retraining(server):
    from align.rec.recommend import user_history

    rec = server.recommender
    user = _first_user(rec)
    logged = user_history(rec, user)
    before = recommended(server, {"user": user})
    top = [r["id"] for r in before["results"]][:3]
    # the user now looks at what we showed them: those items join their history (so they are not
    # recommended again) and move their taste
    for n, item in enumerate(top):
        answer = server.client.post("/events", json={"user": user, "item": item, "event": "click",
                                                     "timestamp": 1e9 + n})
        assert answer.status_code == 200, answer.text
        assert answer.json()["events"] == n + 1
    after = recommended(server, {"user": user})
    assert after["history"] == logged + top
    assert [r["id"] for r in after["results"]] == library_top(rec, logged + top)
    assert [r["id"] for r in after["results"]] != [r["id"] for r in before["results"]]
    assert not set(top) & {r["id"] for r in after["results"]}


def test_a_user_the_log_lacks_is_served_from_events_in_time_order(server):
    rec = server.recommender
    assert server.client.post("/recommend", json={"user": "walk-in", "k": 5}).status_code == 404
    first, second = rec.item_ids[7], rec.item_ids[3]
    for item, when in ((second, "2024-03-01T10:00:05Z"), (first, "2024-03-01T10:00:00Z")):  # sent newest first
        assert server.client.post("/events", json={"user": "walk-in", "item": item, "event": "view",
                                                   "timestamp": when}).status_code == 200
    answer = recommended(server, {"user": "walk-in"})
    assert answer["history"] == [first, second]
    assert [r["id"] for r in answer["results"]] == library_top(rec, [first, second])


def test_a_user_holds_at_most_n_events_in_the_service(server):
    rec = server.recommender
    limit = server.client.get("/healthz").json()["events"]["max_events_per_user"]
    sent = [rec.item_ids[n % len(rec.item_ids)] for n in range(limit + 1)]
    for n, item in enumerate(sent):
        answer = server.client.post("/events", json={"user": "busy", "item": item, "event": "view", "timestamp": n})
        assert answer.status_code == 200, answer.text
        assert answer.json()["events"] == min(n + 1, limit) and answer.json()["limits"]["events_per_user"] == limit
    assert recommended(server, {"user": "busy"})["history"] == sent[1:]  # N + 1 sent, the newest N kept


def bad_events(item):
    """(name, body, the field the 422 must name)."""
    good = {"user": "u1", "item": item, "event": "click"}
    return [
        ("no user", {"item": item, "event": "click"}, "user"),
        ("no item", {"user": "u1", "event": "click"}, "item"),
        ("no event", {"user": "u1", "item": item}, "event"),
        ("unknown item", {**good, "item": "no-such-item"}, "item"),
        ("item not a string", {**good, "item": 17}, "item"),
        ("unknown event type", {**good, "event": "teleport"}, "event"),
        ("empty user", {**good, "user": " "}, "user"),
        ("timestamp not a time", {**good, "timestamp": "yesterday"}, "timestamp"),
        ("timestamp a boolean", {**good, "timestamp": True}, "timestamp"),
        ("timestamp not finite", {**good, "timestamp": float("nan")}, "timestamp"),
        ("timestamp past a float's range", {**good, "timestamp": 10 ** 400}, "timestamp"),
        ("unknown field", {**good, "rating": 5}, "rating"),
        ("not an object", [good], "body"),
    ]


def test_every_bad_event_gets_a_422_naming_its_field_and_the_server_keeps_serving(server):
    item = server.recommender.item_ids[0]
    before = server.client.get("/healthz").json()["events"]["received"]
    for name, body, field in bad_events(item):
        response = server.client.post("/events", content=json.dumps(body), headers={"content-type": "application/json"})
        assert response.status_code == 422, (name, response.text)
        assert response.json()["field"] == field, (name, response.json())
        assert field in response.json()["detail"] or field == "body", (name, response.json())
        assert server.client.post("/events", json={"user": "steady", "item": item, "event": "view"}).status_code == 200
    response = server.client.post("/events", content=b'{"user": "u1", ', headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["field"] == "body"
    assert "no-such-item" in server.client.post("/events", json=bad_events(item)[3][1]).json()["detail"]
    assert "teleport" in server.client.post("/events", json=bad_events(item)[5][1]).json()["detail"]
    # only the good ones were kept
    assert server.client.get("/healthz").json()["events"]["received"] - before == len(bad_events(item))
    assert recommended(server, {"user": "steady"})["history"] == [item] * len(bad_events(item))


def test_align_serve_refuses_bad_event_bounds_with_exit_2(items, capsys):  # noqa: F811
    from align.cli import main as cli

    for flags, message in ((["--events-per-user", "0"], "--events-per-user 0"),
                           (["--event-users", "0"], "--event-users 0"), (["--event-types", " , "], "--event-types")):
        assert cli(["serve", "--index", items, *flags]) == 2, flags
        assert message in capsys.readouterr().err, flags


# ---------------------------------------------------------------- align rec-update


@pytest.fixture(scope="module")
def windows(shop):  # noqa: F811
    """The shop's log cut in three windows of time (at its median and 80th percentile times): W1's
    events, and three more of a user the log has never seen, in their own file; a head trained on
    W0 only."""
    from align.rec.config import load_rec_config
    from align.rec.train import train_head

    root = shop["root"]
    ids = read_catalogue_ids(shop["manifests"])
    log, _ = read_interactions(str(root / "shop" / "interactions.csv"), ids)
    w0, w1 = np.quantile(log.times, [0.5, 0.8])
    new = log.subset((log.times >= w0) & (log.times < w1))
    walk_in = np.full(3, len(log.user_ids))
    write_interactions(Interactions(
        users=np.r_[new.users, walk_in], items=np.r_[new.items, new.items[:3]],
        times=np.r_[new.times, new.times[:3] + 1], weights=np.r_[new.weights, new.weights[:3]],
        events=np.r_[new.events, new.events[:3]],
        user_ids=log.user_ids + ["walk-in"], item_ids=ids), str(root / "w1.csv"))
    head_w0 = root / "head_w0"
    train_head(load_rec_config(None, rec_overrides(shop, head_w0, f"data.cutoff={w0}", "train.epochs=2")))
    return {"log": log, "ids": ids, "w0": w0, "w1": w1, "events": str(root / "w1.csv"), "head": str(head_w0)}


@pytest.fixture(scope="module")
def updated(windows, tmp_path_factory):
    from align.cli import main as cli

    out = tmp_path_factory.mktemp("update") / "head"
    assert cli(["rec-update", "--checkpoint", windows["head"], "--events", windows["events"], "--out", str(out),
                "--epochs", "3"]) == 0
    return out


def brute_force_histories(old, new, length):
    """Per new event (in file order), the user's items before it in either log (a row in both
    counts once), newest ``length``."""
    rows = {(log.user_ids[u], int(i), float(t))
            for log in (old, new) for u, i, t in zip(log.users, log.items, log.times)}
    by_user = {}
    for user, item, when in rows:
        by_user.setdefault(user, []).append((when, item))
    out = []
    for user, when in zip(new.users, new.times):
        earlier = sorted(entry for entry in by_user[new.user_ids[user]] if entry[0] < when)
        out.append([item for _, item in earlier][-length:])
    return out


def test_rec_update_starts_from_the_checkpoints_loss(windows, updated):
    """loss_before, from the update's own data path, equals the saved head's full-softmax loss on
    the new events computed here in float64 from Recommender.load and brute-force histories."""
    from align.rec.recommend import Recommender

    summary = json.loads((updated / "summary.json").read_text())
    saved = Recommender.load(windows["head"])
    old, _ = read_interactions(saved.config.data.interactions, windows["ids"])
    new, _ = read_interactions(windows["events"], windows["ids"])
    histories = brute_force_histories(old, new, saved.config.head.history)
    to_row = np.asarray(saved.rows_of(windows["ids"], "catalogue"))
    users = saved.history_vectors([to_row[h].tolist() for h in histories]).double()  # (E, dim)
    logits = users @ saved.item_vectors.double().T / saved.config.train.temperature  # (E, N)
    expected = torch.nn.functional.cross_entropy(logits, torch.from_numpy(to_row[new.items])).item()
    # float32 unit vectors of dim 32 at scale 1/0.05: each logit within 20 * 34 eps of float64, the
    # log-sum-exp and mean over a few hundred rows add little more: 1e-4 is ample and far below a
    # re-initialised head's distance (the loss of a random head is about log(200) = 5.3)
    assert summary["loss_before"] == pytest.approx(expected, abs=1e-4)
    assert summary["new_events"] == len(new) and summary["optimizer_restored"] > 0
    assert summary["loss_after"] < summary["loss_before"]


def ndcg_next_window(folder, windows):
    """NDCG@10 on W2 of the head in ``folder``, each user reading their W0 + W1 items (the
    definition: DCG of the hits over the ideal DCG of min(|R|, 10) hits)."""
    from align.rec.recommend import Recommender

    log, rec = windows["log"], Recommender.load(str(folder))
    known, later = log.times < windows["w1"], log.times >= windows["w1"]
    scores = []
    for user in np.unique(log.users[later]):
        seen = log.items[known & (log.users == user)]
        order = np.argsort(log.times[known & (log.users == user)], kind="stable")
        relevant = set(log.items[later & (log.users == user)].tolist()) - set(seen.tolist())
        if not relevant:
            continue
        top = library_top(rec, [windows["ids"][i] for i in seen[order]], 10)
        dcg = sum(1 / math.log2(rank + 2) for rank, item in enumerate(top) if windows["ids"].index(item) in relevant)
        scores.append(dcg / sum(1 / math.log2(rank + 2) for rank in range(min(len(relevant), 10))))
    return float(np.mean(scores))


def test_rec_update_ranks_the_next_window_better_than_no_update(windows, updated):
    assert ndcg_next_window(updated, windows) > ndcg_next_window(windows["head"], windows)


def test_the_updated_folder_names_every_event_it_has_seen(windows, updated):
    from align.rec.recommend import Recommender, user_history

    rec = Recommender.load(str(updated))
    assert rec.config.data.interactions == str(updated / "interactions.csv")
    merged, _ = read_interactions(rec.config.data.interactions, windows["ids"])
    # W1 is in the old log already: kept once; the walk-in's three events are new rows
    assert len(merged) == len(windows["log"]) + 3
    assert len(user_history(rec, "walk-in")) == 3
    assert rec.config.data.cutoff > windows["log"].times[windows["log"].times < windows["w1"]].max()
    counts = json.loads((updated / "items.json").read_text())["train_counts"]
    assert sum(counts) == int((merged.times < rec.config.data.cutoff).sum())


def test_rec_update_replaces_its_folder_at_once_or_not_at_all(windows, tmp_path, monkeypatch):
    import shutil

    import align.rec.update as update

    target = tmp_path / "head"
    shutil.copytree(windows["head"], target)
    before = {name: (target / name).read_bytes() for name in os.listdir(target)}

    def broken(*_):
        raise OSError("disk full")

    with monkeypatch.context() as patched:  # a failure while the new folder is written
        patched.setattr(update, "reference_users", broken)
        with pytest.raises(OSError, match="disk full"):
            update.update_head(str(target), windows["events"], steps=1)
    assert {name: (target / name).read_bytes() for name in os.listdir(target)} == before
    assert os.listdir(tmp_path) == ["head"]  # no half-written folder left beside it
    summary = update.update_head(str(target), windows["events"], steps=2)  # in place
    assert summary["steps"] == 2 and os.listdir(tmp_path) == ["head"]
    assert (target / "head.safetensors").read_bytes() != before["head.safetensors"]
    assert json.loads((target / "summary.json").read_text())["loss_before"] == summary["loss_before"]


def test_a_shop_with_its_own_column_names_updates_again_and_again(windows, shop, tmp_path):  # noqa: F811
    """The merged log an update writes keeps the shop's column names, so the next update reads it
    and the shop's next events with the one ``data.columns`` (it was written with the default names
    and the config's columns reset: the second update could read one file or the other)."""
    from align.cli import main as cli
    from align.rec.config import load_rec_config
    from align.rec.train import train_head

    names = InteractionColumns(user="customer", item="product", time="ts", event="action", weight=None)
    log, w0, w1 = windows["log"], windows["w0"], windows["w1"]
    parts = {"w0": log.times < w0, "w1": (log.times >= w0) & (log.times < w1), "w2": log.times >= w1}
    for name, rows in parts.items():
        write_interactions(log.subset(rows), str(tmp_path / f"{name}.csv"), names)
    assert (tmp_path / "w1.csv").read_text().splitlines()[0] == "customer,product,ts,action"
    columns = [f"data.columns.{role}={getattr(names, role)}" for role in ("user", "item", "time", "event")]
    train_head(load_rec_config(None, rec_overrides(shop, tmp_path / "head", f"data.interactions={tmp_path / 'w0.csv'}",
                                                   *columns, "data.columns.weight=null", "train.epochs=1")))
    for old, events, new in (("head", "w1", "head-1"), ("head-1", "w2", "head-2")):
        assert cli(["rec-update", "--checkpoint", str(tmp_path / old), "--events", str(tmp_path / f"{events}.csv"),
                    "--out", str(tmp_path / new), "--steps", "1"]) == 0, (old, events)
    merged = tmp_path / "head-2" / "interactions.csv"
    assert merged.read_text().splitlines()[0] == "customer,product,ts,action"
    read, bad = read_interactions(str(merged), windows["ids"], names)
    assert len(read) == len(log) and not bad.n_bad


def test_a_head_trained_on_every_row_is_updated_and_not_evaluated(windows, shop, tmp_path, capsys):  # noqa: F811
    """data.split=none: every row of the log trains (a temporal split holds its newest part out, and
    an update reads that part as history only, so no head saw it as a target), rec-eval refuses
    the head, and rec-update goes on from it."""
    from align.cli import main as cli
    from align.errors import ConfigError
    from align.rec.config import load_rec_config
    from align.rec.recommend import Recommender
    from align.rec.train import train_head

    log = windows["log"]
    summary = train_head(load_rec_config(None, rec_overrides(shop, tmp_path / "all", "data.split=none",
                                                             "train.epochs=1")))
    assert summary["examples"] == len(log)
    assert json.loads((tmp_path / "all" / "items.json").read_text())["cutoff"] > log.times.max()
    assert cli(["rec-eval", "--checkpoint", str(tmp_path / "all")]) == 1
    assert "data.split=none" in capsys.readouterr().err
    assert cli(["rec-update", "--checkpoint", str(tmp_path / "all"), "--events", windows["events"],
                "--out", str(tmp_path / "all-2"), "--steps", "1"]) == 0
    updated = Recommender.load(str(tmp_path / "all-2"))  # its saved config loads and validates
    assert updated.config.data.split == "none" and updated.config.data.cutoff is None
    events, _ = read_interactions(windows["events"], windows["ids"])
    assert json.loads((tmp_path / "all-2" / "summary.json").read_text())["new_events"] == len(events)
    with pytest.raises(ConfigError, match="data.cutoff"):
        load_rec_config(None, rec_overrides(shop, tmp_path / "x", "data.split=none", "data.cutoff=5"))


def test_rec_eval_with_events_reads_the_head_s_own_cut_off(windows, shop, tmp_path, capsys):  # noqa: F811
    """``rec-eval --events``: the head's log and a newer one merged and cut at the head's cut-off.
    Given the head's own held-out rows, it reproduces the plain evaluation exactly; a served head
    (data.split=none) and its update, which hold nothing out, are evaluated on the next window."""
    from align.cli import main as cli
    from align.rec.config import load_rec_config
    from align.rec.train import train_head

    log, w0, w1 = windows["log"], windows["w0"], windows["w1"]
    parts = {"w0": log.times < w0, "w1": (log.times >= w0) & (log.times < w1), "w2": log.times >= w1,
             "held_out": log.times >= w0}
    for name, rows in parts.items():
        write_interactions(log.subset(rows), str(tmp_path / f"{name}.csv"))

    def rec_eval(folder, *extra):
        output = tmp_path / f"eval-{len(os.listdir(tmp_path))}.json"
        code = cli(["rec-eval", "--checkpoint", str(folder), "--peers", "most_pop", "--no-plots",
                    "--output", str(output), *extra])
        return code, (json.loads(output.read_text()) if code == 0 else capsys.readouterr().err)

    # the temporal head of W0 given its own held-out rows again: the same log, the same figures
    code, plain = rec_eval(windows["head"])
    assert code == 0
    code, again = rec_eval(windows["head"], "--events", str(tmp_path / "held_out.csv"))
    assert code == 0 and again["counts"] == plain["counts"] and again["cutoff"] == plain["cutoff"] == w0
    assert again["events"] == str(tmp_path / "held_out.csv")
    for segment, figures in plain["segments"].items():
        for method, values in figures.items():
            assert again["segments"][segment][method] == pytest.approx(values, rel=1e-12, nan_ok=True), (segment, method)

    # a served head trained on every row of W0, then updated with W1: each evaluated on what came next
    train_head(load_rec_config(None, rec_overrides(shop, tmp_path / "served", f"data.interactions={tmp_path / 'w0.csv'}",
                                                   "data.split=none", "train.epochs=1")))
    code, served = rec_eval(tmp_path / "served", "--events", str(tmp_path / "w1.csv"))
    assert code == 0
    assert served["counts"]["train"] == parts["w0"].sum() and served["counts"]["test"] == parts["w1"].sum()
    assert served["segments"]["all"]["ours"]["recall@10"] > 0
    assert cli(["rec-update", "--checkpoint", str(tmp_path / "served"), "--events", str(tmp_path / "w1.csv"),
                "--out", str(tmp_path / "served-1"), "--steps", "1"]) == 0
    code, updated = rec_eval(tmp_path / "served-1", "--events", str(tmp_path / "w2.csv"))
    assert code == 0
    assert updated["counts"]["train"] == (log.times < w1).sum() and updated["counts"]["test"] == parts["w2"].sum()

    # nothing after the cut-off, no cut-off at all, no file: refused, naming what to change
    code, err = rec_eval(tmp_path / "served-1", "--events", str(tmp_path / "w1.csv"))
    assert code == 1 and "w1.csv: no event at or after the head's cut-off" in err
    train_head(load_rec_config(None, rec_overrides(shop, tmp_path / "loo", "data.split=leave_last_out",
                                                   "train.epochs=1")))
    code, err = rec_eval(tmp_path / "loo", "--events", str(tmp_path / "w2.csv"))
    assert code == 2 and "data.split=leave_last_out" in err
    code, err = rec_eval(tmp_path / "served", "--events", str(tmp_path / "nowhere.csv"))
    assert code == 2 and "--events" in err


def test_an_update_s_own_rate_and_batch_are_not_saved_for_the_next(windows, tmp_path):  # noqa: F811
    """rec-update trains at a third of the head's rate, and a small update in one batch of its
    events; the folder it writes keeps the head's settings, so the next update starts from them
    (it saved its own: each update then ran at a third of the one before, and kept a small batch)."""
    from pathlib import Path

    import yaml

    from align.cli import main as cli

    log, w0, w1 = windows["log"], windows["w0"], windows["w1"]
    few = log.subset(np.flatnonzero((log.times >= w0) & (log.times < w1))[:12])
    write_interactions(few, str(tmp_path / "few.csv"))

    def settings(folder):
        train = yaml.safe_load((folder / "rec_config.yaml").read_text())["train"]
        return {key: train[key] for key in ("lr", "epochs", "batch_size")}

    head = windows["head"]
    before = settings(Path(head))
    assert cli(["rec-update", "--checkpoint", head, "--events", str(tmp_path / "few.csv"),
                "--out", str(tmp_path / "first"), "--steps", "1"]) == 0
    summary = json.loads((tmp_path / "first" / "summary.json").read_text())
    assert settings(tmp_path / "first") == before and before["batch_size"] > len(few)
    assert cli(["rec-update", "--checkpoint", str(tmp_path / "first"), "--events", windows["events"],
                "--out", str(tmp_path / "second"), "--steps", "1"]) == 0
    assert settings(tmp_path / "second") == before
    assert summary["new_events"] == len(few)


def test_realign_rows_keeps_known_ids_and_starts_new_ones_at_zero():
    from align.rec.update import realign_rows

    table = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    assert realign_rows(table, ["a", "b"], ["b", "new", "a"]).tolist() == [[2.0, 2.0], [0.0, 0.0], [1.0, 1.0]]
