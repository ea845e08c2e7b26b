"""Are the recommender's explanations (align/explain/) true? Two checks a benchmark reports
(``benchmarks/rec_online.py``).

``faithfulness``: among users with at least ``min_history`` history entries, the share for whom
removing the entry the explanation ranks first lowers the score of the user's top recommended
item more than removing a random other entry (one of another item, so that the two removals
differ). The removals are real re-scorings whatever method ranked the entries; with
``gradient_x_input`` the ranking is a first-order guess and the check can fail.

``taste_match`` (shop simulator only): the share of users whose top attribute word (the
explanation's user words, attribute columns only) is the attribute value they like most in the
simulation (the largest weight of their taste vector), beside the share a random pairing of the
same predictions and truths would reach (``chance`` = sum over values of the predicted share
times the true share). The tastes are those ``align prep shop-sim`` drew and wrote beside the log
(``tastes.safetensors``, read by ``simulated_tastes``).
"""
from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from align.explain.history import LOO_MAX, Method, history_contributions, removal_scores
from align.explain.words import WordProbe, user_preference
from align.rec.recommend import Recommender
from align.rec.simulate import TASTES_FILE, Tastes, read_tastes


Histories = Mapping[str, Sequence[str]]  # user id -> item ids, oldest first


def faithfulness(recommender: Recommender, histories: Histories, min_history: int = 3, method: Method = "auto",
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


def simulated_tastes(shop: str) -> Tastes:
    """The tastes of the users of the shop ``align prep shop-sim`` wrote into the folder ``shop``
    (its tastes.safetensors); a ``RunError`` naming the file where it is missing or broken."""
    return read_tastes(os.path.join(shop, TASTES_FILE))


def taste_match(recommender: Recommender, histories: Histories, shop: Union[str, Tastes],
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
