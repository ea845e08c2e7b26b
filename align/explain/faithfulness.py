"""Are the explanations true? Two checks a benchmark reports (``benchmarks/rec_online.py``).

``faithfulness``: among users with at least ``min_history`` history entries, the share for whom
removing the entry the explanation ranks first lowers the score of the user's top recommended
item more than removing a random other entry (one of another item, so that the two removals
differ). The removals are real re-scorings whatever method ranked the entries; with
``gradient_x_input`` the ranking is a first-order guess and the check can fail.

``taste_match`` (shop simulator only): the share of users whose top attribute word (the
explanation's user words, attribute columns only) is the attribute value they like most in the
simulation (the largest weight of their taste vector), beside the share a random pairing of the
same predictions and truths would reach (``chance`` = sum over values of the predicted share
times the true share). The tastes are not written by ``align prep shop-sim``: ``simulated_tastes``
draws them again from the same seed, replaying the simulator's draws in their order, and checks
the replay by the event times it also redraws (every time in interactions.csv must come back).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from align.errors import RunError
from align.explain.history import LOO_MAX, Method, history_contributions, removal_scores
from align.explain.words import WordProbe, user_preference

Recommender = Any  # an align.rec.recommend.Recommender: not imported, as align recommend / align search import this package

Histories = Mapping[str, Sequence[str]]  # user id -> item ids, oldest first


def faithfulness(recommender: "Recommender", histories: Histories, min_history: int = 3, method: Method = "auto",
                 loo_max: int = LOO_MAX, seed: int = 0, max_users: Optional[int] = None) -> float:
    """The share of users for whom removing the top-ranked history entry lowers their top
    recommendation's score more than removing a random entry of another item (module docstring).

    Args:
        recommender: a loaded head (``Recommender.load``).
        histories: user id -> item ids (of ``recommender.item_ids``), oldest first.
        min_history: users with fewer entries the head reads are left out.
        method: how the explanation ranks the entries ("auto", "leave_one_out", "gradient_x_input").
        loo_max: "auto" uses leave-one-out up to this many entries read.
        seed: draws the random other entry (and the users, with ``max_users``).
        max_users: check at most this many users (a seeded sample); None: all.
    Returns:
        The share in [0, 1]; NaN when no user qualifies.
    """
    rng = np.random.default_rng(seed)
    window = recommender.config.head.history
    users = [u for u in sorted(histories) if min(len(histories[u]), window) >= min_history]
    if max_users is not None and len(users) > max_users:
        users = [users[i] for i in np.sort(rng.choice(len(users), max_users, replace=False))]
    wins = checked = 0
    for user in users:
        history = recommender.rows_of(list(histories[user]), f"user {user}'s history")
        picked, _ = recommender.recommend([history], 1)
        if picked[0, 0] < 0:
            continue
        item = int(picked[0, 0])
        explained = history_contributions(recommender, history, [item], method, loo_max)
        top = int(explained.ranking(0)[0])
        others = [p for p in range(len(explained.positions))
                  if history[explained.positions[p]] != history[explained.positions[top]]]
        if not others:
            continue
        other = int(rng.choice(others))
        scores = removal_scores(recommender, history, [item],
                                [int(explained.positions[top]), int(explained.positions[other])])[:, 0]
        wins += bool(scores[0] - scores[1] > scores[0] - scores[2])
        checked += 1
    return wins / checked if checked else float("nan")


@dataclass
class SimulatedTastes:
    """The simulated users' tastes: one weight per attribute value (the simulator's theta_u at
    time 0, before drift).

    Attributes:
        user_ids: the log's user ids, in the simulator's order.
        features: (attribute, value) of each taste column, in the simulator's order.
        weights: (U, F) float64.
    """

    user_ids: List[str]
    features: List[Tuple[str, str]]
    weights: np.ndarray

    def strongest(self) -> dict:
        """User id -> the (attribute, value) they like most."""
        best = self.weights.argmax(1)
        return {user: self.features[int(b)] for user, b in zip(self.user_ids, best)}


def simulated_tastes(shop: str) -> SimulatedTastes:
    """The tastes of the users of the shop ``align prep shop-sim`` wrote into the folder ``shop``
    (its items.json and interactions.csv), drawn again from its seed (module docstring); a replay
    whose event times differ from the log's is a ``RunError`` (the simulator changed since)."""
    from align.rec.interactions import read_catalogue_columns, read_catalogue_ids
    from align.rec.simulate import ShopSimConfig, _catalogue, _events, _sessions

    meta_path, log_path = os.path.join(shop, "items.json"), os.path.join(shop, "interactions.csv")
    with open(meta_path, encoding="utf-8") as handle:
        meta = json.load(handle)
    config = ShopSimConfig(**meta["config"])
    attributes = list(meta.get("attributes") or [])
    item_ids, values = read_catalogue_columns(meta["catalogue"], attributes)
    position = {item: n for n, item in enumerate(item_ids)}
    new = np.zeros(len(item_ids), dtype=bool)
    for manifest in meta.get("new") or []:
        new[[position[item] for item in read_catalogue_ids([manifest])]] = True
    # simulate_shop's draws, in its order, up to the tastes (align/rec/simulate.py)
    rng = np.random.default_rng(config.seed)
    _catalogue(rng, values, len(item_ids), new, config, math.ceil(config.horizon_days))
    session_user, session_time, events_in_session = _sessions(rng, config)
    _, event_time, _, _, _ = _events(rng, session_time, events_in_session, config)
    vocabularies = [sorted({v.strip() for v in values[a] if v.strip()}) for a in attributes]
    features = [(a, v) for a, vocabulary in zip(attributes, vocabularies) for v in vocabulary]
    pickiness = rng.lognormal(0.0, config.pickiness_sigma, size=config.n_users)
    weights = pickiness[:, None] * rng.standard_normal((config.n_users, len(features)))
    from align.data.tables import as_numbers, read_columns

    logged = np.sort(as_numbers(read_columns(log_path, ["timestamp"])["timestamp"]))
    if not np.array_equal(logged, np.sort(event_time)):
        raise RunError(f"{log_path}: the simulator, run again from {meta_path}, does not give these event times; "
                       f"the tastes cannot be recovered (simulate the shop again with this version)")
    width = len(str(config.n_users - 1))
    return SimulatedTastes([f"user{u:0{width}d}" for u in range(config.n_users)], features, weights)


def taste_match(recommender: "Recommender", histories: Histories, shop: Union[str, SimulatedTastes],
                probe: WordProbe, min_history: int = 3) -> Tuple[float, float]:
    """(match, chance): the share of simulated users whose top attribute word is their strongest
    taste, and the share a random pairing would give (module docstring).

    Args:
        recommender: a head trained on the simulated shop's log.
        histories: user id -> item ids, oldest first (users the simulator does not know are skipped).
        shop: the ``align prep shop-sim`` folder, or its ``simulated_tastes``.
        probe: the recommender's word probe (``align.explain.recommender_probe``).
        min_history: users with fewer history entries are left out.
    """
    tastes = simulated_tastes(shop) if isinstance(shop, str) else shop
    truth = tastes.strongest()
    attributes = sorted({a for a, _ in tastes.features})
    users = [u for u in sorted(histories) if u in truth and len(histories[u]) >= min_history]
    if not users:
        return float("nan"), float("nan")
    rows = [recommender.rows_of(list(histories[u]), f"user {u}'s history") for u in users]
    scores = user_preference(recommender, probe, rows)  # (U, V)
    predicted = []
    for row in scores:
        best = probe.top(row, 1, attributes)
        predicted.append((probe.terms.fields[best[0]], probe.terms.words[best[0]]) if best else ("", ""))
    actual = [(a, v.lower()) for a, v in (truth[u] for u in users)]
    match = float(np.mean([p == t for p, t in zip(predicted, actual)]))
    keys = sorted(set(predicted) | set(actual))
    share_predicted = np.array([sum(p == k for p in predicted) for k in keys]) / len(users)
    share_actual = np.array([sum(t == k for t in actual) for k in keys]) / len(users)
    return match, float(share_predicted @ share_actual)
