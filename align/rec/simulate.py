"""A deterministic shop simulator: an interaction log over a real catalogue's items, with known
tastes, popularity, new items and cold users, so recommenders can be tested where the truth is
known (and at any scale).

Generative story (every knob is a field of ``ShopSimConfig``; one ``numpy`` Generator seeded by
``seed`` draws everything in a fixed order, so the same inputs give the same log):

Items
  * Popularity: a random permutation ranks the items; ``pop_i = rank_i ** -zipf_exponent``
    (Zipf: a few items are very popular, most are rarely seen).
  * Release day: a fraction ``late_release_fraction`` of the items is released after the
    cutoff (``cutoff_fraction`` of the ``horizon_days``), on a whole day in the first half of the
    remaining time, so they have interactions only after it: the cold-start items of a temporal
    split. ``new_items`` (e.g. the demo's test.csv, attribute combinations training never saw)
    are always late; random other items are added until the fraction is reached. Of the
    remaining items, ``staggered_release_fraction`` are released on a random whole day before
    the cutoff, the others on day 0. Nothing is ever chosen before its release.
  * Attributes (e.g. kind, colour, pattern, size): one-hot over each attribute's values; an
    empty value adds nothing. Items with the same values form an attribute *combination*.
Users (``n_users``)
  * Taste: a weight per attribute value, ``theta_u = s_u * z_u`` with ``z_u ~ N(0, I)`` and a
    per-user scale ``s_u ~ LogNormal(0, pickiness_sigma)``: a large scale is a picky user.
  * Drift: taste moves as a Brownian motion over the horizon, ``theta_u(t) = theta_u +
    drift * W_u(t / horizon)`` (so ``drift`` is the typical total move per value).
  * Activity: sessions ~ ``max(1, Poisson(a_u))`` with ``a_u = sessions_per_user *
    LogNormal(-activity_sigma**2 / 2, activity_sigma)`` (mean ``sessions_per_user``, heavy
    tail), at times uniform over the horizon.
  * Cold users: a fraction ``cold_user_fraction`` has one session of 1 or 2 events, so 1-2
    interactions in all; every other user gets at least 3 (topped up in the first session).
Sessions
  * A session has ``1 + Poisson(events_per_session - 1)`` events, ``seconds_between_events``
    apart on average (exponential gaps).
  * Each event picks an item among those released by the session's day with probability
    ``∝ exp(theta_u(t) · x_i / taste_temperature) * pop_i ** popularity_weight``; drawn
    exactly as attribute combination first (taste + log released popularity mass), then item
    within it (released popularity), so the cost grows with sessions x combinations, not
    sessions x items.
  * With ``noise_click_prob`` an event is instead a uniformly random released item.
  * Event type: the last event of a session is a purchase with ``purchase_prob``; every other
    event is a click with ``click_prob``, else a view. Weights ``EVENT_WEIGHTS``: view 1,
    click 2, purchase 4. With ``repeat_prob`` a purchase re-buys one of the user's earlier
    purchases (uniformly chosen) instead, when there is one.

Output: an ``Interactions`` log sorted by time (user ids ``user000000``...; item codes in the
given catalogue order), the release time of every item in seconds, and the cutoff in seconds.
Times are seconds from 0 (the start of the horizon).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from align.errors import ConfigError
from align.knobs import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, PROBABILITY, check_knobs, knob
from align.rec.interactions import Interactions

DAY = 86400.0
EVENT_TYPES = ("view", "click", "purchase")
EVENT_WEIGHTS = {"view": 1.0, "click": 2.0, "purchase": 4.0}
DEFAULT_ATTRIBUTES = ("kind", "colour", "pattern", "size")
MIN_EVENTS_WARM_USER = 3  # a user that is not cold has at least this many interactions
_CHUNK_CELLS = 2_000_000  # sessions x combinations scored at once: ~16 MB of float64


@dataclass
class ShopSimConfig:
    """Every knob of the shop simulator (see the module docstring for the story they drive)."""

    n_users: int = knob(2000, "number of users")
    sessions_per_user: float = knob(6.0, "mean sessions of a user before the cold-user rule (heavy-tailed)")
    events_per_session: float = knob(3.0, "mean events per session (>= 1)")
    zipf_exponent: float = knob(1.0, "item popularity ~ rank ** -zipf_exponent")
    popularity_weight: float = knob(0.5, "exponent of popularity in the choice probability")
    taste_temperature: float = knob(0.5, "softmax temperature of taste . attributes (lower = more taste-driven)")
    drift: float = knob(0.1, "total random-walk move of a taste weight over the horizon")
    noise_click_prob: float = knob(0.05, "chance an event is a uniformly random released item")
    repeat_prob: float = knob(0.1, "chance a purchase re-buys an earlier purchase of the user")
    late_release_fraction: float = knob(0.1, "fraction of items released after the cutoff (new items first)")
    cold_user_fraction: float = knob(0.1, "fraction of users with only 1-2 interactions")
    horizon_days: float = knob(180.0, "length of the simulated period in days")
    cutoff_fraction: float = knob(0.8, "cutoff (train/test boundary) as a fraction of the horizon")
    seed: int = knob(0, "random seed: the same seed gives the same log")
    activity_sigma: float = knob(1.0, "log-normal spread of user activity (larger = heavier tail)")
    pickiness_sigma: float = knob(0.5, "log-normal spread of the users' taste scale (picky vs. open)")
    click_prob: float = knob(0.3, "chance a non-purchase event is a click rather than a view")
    purchase_prob: float = knob(0.3, "chance a session ends in a purchase")
    staggered_release_fraction: float = knob(0.2, "fraction of the other items released on a random day before the cutoff")
    seconds_between_events: float = knob(60.0, "mean gap between the events of a session, in seconds")

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the knob (and its command-line flag) for a value out of range."""
        probabilities = ("noise_click_prob", "repeat_prob", "late_release_fraction", "cold_user_fraction",
                         "click_prob", "purchase_prob", "staggered_release_fraction")
        rules = dict.fromkeys(probabilities, PROBABILITY)
        rules.update({
            "n_users": AT_LEAST_ONE,
            "seed": NON_NEGATIVE,
            "sessions_per_user": POSITIVE,
            "events_per_session": AT_LEAST_ONE,
            "zipf_exponent": NON_NEGATIVE,
            "popularity_weight": NON_NEGATIVE,
            "taste_temperature": POSITIVE,
            "drift": NON_NEGATIVE,
            "horizon_days": (lambda v: v >= 2, ">= 2"),
            "cutoff_fraction": (lambda v: 0 < v < 1, "in (0, 1)"),
            "activity_sigma": NON_NEGATIVE,
            "pickiness_sigma": NON_NEGATIVE,
            "seconds_between_events": NON_NEGATIVE,
        })
        check_knobs(self, rules, "shop simulator", "align prep shop-sim")
        if math.ceil(self.cutoff_fraction * self.horizon_days) >= self.horizon_days:
            raise ConfigError(f"shop simulator cutoff_fraction = {self.cutoff_fraction}: no whole day is left "
                              f"after the cutoff of a {self.horizon_days}-day horizon to release new items; "
                              f"lower it or lengthen horizon_days")


@dataclass
class _Catalogue:
    """The items as the sampler needs them."""

    combination: np.ndarray  # (n_items,) int64 attribute-combination code
    features: np.ndarray     # (C, F) float64 one-hot attribute values of each combination
    feature_names: List[Tuple[str, str]]  # (attribute, value) of each column of ``features``
    weight: np.ndarray       # (n_items,) float64 pop ** popularity_weight
    release_day: np.ndarray  # (n_items,) int64


@dataclass
class Tastes:
    """The simulated users' tastes: one weight per attribute value (theta_u at time 0, before
    drift), what a recommender's explanations can be checked against (align/rec/faithfulness.py).

    Attributes:
        user_ids: the log's user ids, in the simulator's order.
        features: (attribute, value) of each taste column.
        weights: (U, F) float64.
    """

    user_ids: List[str]
    features: List[Tuple[str, str]]
    weights: np.ndarray

    def strongest(self) -> dict:
        """User id -> the (attribute, value) they like most."""
        best = self.weights.argmax(1)
        return {user: self.features[int(b)] for user, b in zip(self.user_ids, best)}


TASTES_FILE = "tastes.safetensors"
TASTES_FORMAT = "align-shop-tastes/1"


def write_tastes(tastes: Tastes, path: str) -> None:
    """``tastes`` to a safetensors file, atomically: the weights as a tensor, the user ids and the
    (attribute, value) columns as JSON metadata."""
    import json

    from safetensors.numpy import save_file

    from align.errors import atomic_open

    metadata = {"format": TASTES_FORMAT, "user_ids": json.dumps(tastes.user_ids),
                "features": json.dumps([list(f) for f in tastes.features])}
    with atomic_open(path, "wb") as handle:
        save_file({"weights": np.ascontiguousarray(tastes.weights, dtype=np.float64)}, handle.name, metadata=metadata)


def read_tastes(path: str) -> Tastes:
    """The ``Tastes`` ``write_tastes`` wrote to ``path`` (read as tensors and JSON, never unpickled);
    a missing or foreign file is a ``RunError`` naming it."""
    import json

    from safetensors import safe_open

    from align.errors import RunError

    if not os.path.isfile(path):
        raise RunError(f"{path}: no such file; `align prep shop-sim` writes the users' tastes there "
                       f"(a folder simulated before it did: simulate the shop again)")
    try:
        with safe_open(path, framework="numpy") as handle:
            metadata, weights = handle.metadata() or {}, handle.get_tensor("weights")
        if metadata.get("format") != TASTES_FORMAT:
            raise ValueError(f"format {metadata.get('format')!r}, expected {TASTES_FORMAT!r}")
        user_ids = [str(u) for u in json.loads(metadata["user_ids"])]
        features = [(str(a), str(v)) for a, v in json.loads(metadata["features"])]
    except Exception as error:  # a truncated file, a foreign one, broken JSON
        raise RunError(f"{path}: not a tastes file of `align prep shop-sim` ({error})") from None
    if weights.shape != (len(user_ids), len(features)):
        raise RunError(f"{path}: weights {weights.shape} for {len(user_ids)} users and {len(features)} features")
    return Tastes(user_ids, features, weights)


class SimulatedShop(NamedTuple):
    """What ``simulate_shop`` returns: the log sorted by time, the release time of every item in
    seconds (n_items,), the cutoff in seconds, and the users' tastes."""

    log: Interactions
    release: np.ndarray
    cutoff: float
    tastes: Tastes


def simulate_shop(item_ids: Sequence[str], attributes: Dict[str, Sequence[str]], config: ShopSimConfig,
                  new_items: Optional[np.ndarray] = None) -> SimulatedShop:
    """Simulate a shop over the catalogue ``item_ids`` (see the module docstring).

    Args:
        item_ids: the catalogue's ids; item codes in the log index this list.
        attributes: attribute name -> the value of every item (same order as ``item_ids``);
            "" for an unknown value. May be empty (then only popularity drives choices).
        config: the knobs; checked first (``ConfigError`` naming the knob).
        new_items: the block of genuinely new items, always released after the cutoff: a
            boolean mask (n_items,) or integer indices. ``None``: late items are random.

    Returns:
        ``SimulatedShop``: (log, release, cutoff, tastes).
    """
    config.validate()
    n_items = len(item_ids)
    if n_items == 0:
        raise ValueError("simulate_shop: the catalogue is empty")
    for name, values in attributes.items():
        if len(values) != n_items:
            raise ValueError(f"simulate_shop: attribute {name!r} has {len(values)} values for {n_items} items")
    new_mask = np.zeros(n_items, dtype=bool)
    if new_items is not None:
        new_mask[np.asarray(new_items)] = True
    rng = np.random.default_rng(config.seed)
    n_days = math.ceil(config.horizon_days)
    cutoff = config.cutoff_fraction * config.horizon_days * DAY
    catalogue = _catalogue(rng, attributes, n_items, new_mask, config, n_days)

    session_user, session_time, events_in_session = _sessions(rng, config)
    event_session, event_time, event_type, noise, repeat = _events(rng, session_time, events_in_session, config)
    session_day = np.minimum((session_time // DAY).astype(np.int64), n_days - 1)  # (S,)
    event_day = session_day[event_session]  # choices see the catalogue of the session's day

    items = np.empty(len(event_session), dtype=np.int64)
    chosen = ~noise
    combination, taste = _choose_combinations(rng, catalogue, session_user, session_time, session_day,
                                       event_session, chosen, config, n_days)
    items[chosen] = _choose_within_combination(rng, catalogue, combination, event_day[chosen], n_days)
    items[noise] = _choose_uniform_released(rng, catalogue.release_day, event_day[noise])
    _apply_repeats(rng, items, session_user[event_session], event_type == EVENT_TYPES.index("purchase"), repeat)

    order = np.argsort(event_time, kind="stable")
    width = len(str(config.n_users - 1))
    user_ids = [f"user{u:0{width}d}" for u in range(config.n_users)]
    labels = np.asarray(EVENT_TYPES)
    weights = np.asarray([EVENT_WEIGHTS[t] for t in EVENT_TYPES], dtype=np.float32)
    log = Interactions(
        users=session_user[event_session][order], items=items[order], times=event_time[order],
        weights=weights[event_type[order]], events=labels[event_type[order]],
        user_ids=user_ids, item_ids=[str(i) for i in item_ids],
    )
    return SimulatedShop(log, catalogue.release_day.astype(np.float64) * DAY, float(cutoff),
                         Tastes(user_ids, catalogue.feature_names, taste))


# ------------------------------------------------------------------------------------------------
# items
# ------------------------------------------------------------------------------------------------
def _catalogue(rng: np.random.Generator, attributes: Dict[str, Sequence[str]], n_items: int,
               new_mask: np.ndarray, config: ShopSimConfig, n_days: int) -> _Catalogue:
    """Attribute combinations, popularity weights and release days of the items."""
    codes = np.zeros((n_items, len(attributes)), dtype=np.int64)  # (n_items, A), -1 = no value
    offsets, width, names = [], 0, []
    for column, (name, values) in enumerate(attributes.items()):
        text = np.asarray([str(v).strip() for v in values], dtype=object)
        present = text != ""
        vocabulary, inverse = np.unique(text[present].astype(str), return_inverse=True)
        codes[:, column] = -1
        codes[present, column] = inverse
        offsets.append(width)
        width += len(vocabulary)
        names += [(name, str(value)) for value in vocabulary]
    if attributes:
        unique, combination = np.unique(codes, axis=0, return_inverse=True)  # (C, A), (n_items,)
    else:  # no attributes: one combination, choices follow popularity alone
        unique, combination = np.zeros((1, 0), dtype=np.int64), np.zeros(n_items, dtype=np.int64)
    features = np.zeros((len(unique), width))  # (C, F)
    for column, offset in enumerate(offsets):
        has = unique[:, column] >= 0
        features[np.flatnonzero(has), offset + unique[has, column]] = 1.0

    rank = np.empty(n_items, dtype=np.float64)
    rank[rng.permutation(n_items)] = np.arange(1, n_items + 1)
    weight = rank ** (-config.zipf_exponent * config.popularity_weight)  # pop ** popularity_weight
    return _Catalogue(combination=combination.reshape(-1).astype(np.int64), features=features, feature_names=names,
                      weight=weight, release_day=_release_days(rng, new_mask, config, n_days))


def _release_days(rng: np.random.Generator, new_mask: np.ndarray, config: ShopSimConfig, n_days: int) -> np.ndarray:
    """(n_items,) int64 release day: new items and random others after the cutoff, some others
    staggered before it, the rest on day 0 (at least one item is always on day 0)."""
    n_items = len(new_mask)
    first_late = math.ceil(config.cutoff_fraction * config.horizon_days)  # day * DAY >= cutoff
    late_days = max(1, (n_days - first_late) // 2)
    late = new_mask.copy()
    extra = int(round(config.late_release_fraction * n_items)) - int(late.sum())
    others = np.flatnonzero(~late)
    if extra > 0:
        late[rng.permutation(others)[:extra]] = True
    if late.all():
        raise ConfigError(f"shop simulator: all {n_items} items would be released after the cutoff "
                          f"(--new / late_release_fraction); leave some items to be bought before it")
    release = np.zeros(n_items, dtype=np.int64)
    release[late] = first_late + rng.integers(0, late_days, size=int(late.sum()))
    early = rng.permutation(np.flatnonzero(~late))[1:]  # the first stays on day 0
    staggered = early[:int(round(config.staggered_release_fraction * len(early)))]
    if first_late > 1:  # day < cutoff day, so staggered items are bought before the cutoff too
        release[staggered] = rng.integers(1, first_late, size=len(staggered))
    return release


# ------------------------------------------------------------------------------------------------
# users, sessions, events
# ------------------------------------------------------------------------------------------------
def _sessions(rng: np.random.Generator, config: ShopSimConfig) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user (S,), time (S,) seconds, events (S,)) of every session, grouped by user, each user's
    sessions in time order."""
    n_users = config.n_users
    cold = np.zeros(n_users, dtype=bool)
    cold[rng.permutation(n_users)[:int(round(config.cold_user_fraction * n_users))]] = True
    sigma = config.activity_sigma
    activity = config.sessions_per_user * rng.lognormal(-sigma ** 2 / 2, sigma, size=n_users)
    sessions = np.maximum(1, rng.poisson(activity))
    sessions[cold] = 1
    user = np.repeat(np.arange(n_users), sessions)  # (S,)
    time = rng.uniform(0.0, config.horizon_days * DAY, size=len(user))
    time = time[np.lexsort((time, user))]  # user is already sorted: this sorts times within users
    events = 1 + rng.poisson(config.events_per_session - 1, size=len(user))
    first = np.concatenate([[0], np.cumsum(sessions)[:-1]])  # (n_users,) first session of each user
    events[first[cold]] = 1 + (rng.random(int(cold.sum())) < 0.5)
    deficit = np.maximum(0, MIN_EVENTS_WARM_USER - np.bincount(user, weights=events, minlength=n_users))
    deficit[cold] = 0
    events[first] += deficit.astype(np.int64)
    return user, time, events


def _events(rng: np.random.Generator, session_time: np.ndarray, events_in_session: np.ndarray,
            config: ShopSimConfig) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(session (E,), time (E,), type code (E,) into EVENT_TYPES, noise (E,) bool, repeat (E,) bool)."""
    session = np.repeat(np.arange(len(session_time)), events_in_session)  # (E,)
    start = np.concatenate([[0], np.cumsum(events_in_session)[:-1]])  # (S,) first event of each session
    position = np.arange(len(session)) - start[session]
    last = position == events_in_session[session] - 1
    gap = rng.exponential(config.seconds_between_events, size=len(session))
    gap[position == 0] = 0.0
    elapsed = np.cumsum(gap)
    time = session_time[session] + (elapsed - elapsed[start][session])  # seconds since the session began
    purchase = last & (rng.random(len(session)) < config.purchase_prob)
    click = ~purchase & (rng.random(len(session)) < config.click_prob)
    kind = np.where(purchase, 2, np.where(click, 1, 0)).astype(np.int64)
    noise = rng.random(len(session)) < config.noise_click_prob
    repeat = purchase & (rng.random(len(session)) < config.repeat_prob)
    return session, time, kind, noise, repeat


# ------------------------------------------------------------------------------------------------
# choosing items
# ------------------------------------------------------------------------------------------------
def _choose_combinations(rng: np.random.Generator, catalogue: _Catalogue, session_user: np.ndarray,
                         session_time: np.ndarray, session_day: np.ndarray, event_session: np.ndarray,
                         chosen: np.ndarray, config: ShopSimConfig, n_days: int) -> Tuple[np.ndarray, np.ndarray]:
    """(attribute combination of every ``chosen`` event, the users' tastes theta_u (U, F)): P(c | session) ∝ exp(theta_u(t) · x_c / T)
    * (popularity mass of c's items released by the session's day). Scored in chunks of whole
    users, so each user's taste walk is drawn in one piece."""
    n_combinations, n_features = catalogue.features.shape
    mass = np.zeros((n_days, n_combinations))  # (days, C) released popularity mass
    np.add.at(mass, (catalogue.release_day, catalogue.combination), catalogue.weight)
    with np.errstate(divide="ignore"):
        log_mass = np.log(np.cumsum(mass, axis=0))  # -inf where nothing is released yet

    pickiness = rng.lognormal(0.0, config.pickiness_sigma, size=config.n_users)
    taste = pickiness[:, None] * rng.standard_normal((config.n_users, n_features))  # (U, F)
    sessions_of_user = np.bincount(session_user, minlength=config.n_users)
    user_start = np.concatenate([[0], np.cumsum(sessions_of_user)])  # (U + 1,)
    chunk_of_user = user_start[:-1] // max(1, _CHUNK_CELLS // n_combinations)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(chunk_of_user)) + 1, [config.n_users]])
    event_start = np.searchsorted(event_session, np.arange(len(session_time) + 1))  # (S + 1,)

    out = np.empty(len(event_session), dtype=np.int64)
    for first_user, end_user in zip(bounds[:-1], bounds[1:]):
        a, b = user_start[first_user], user_start[end_user]  # sessions [a, b)
        user = session_user[a:b]
        # Brownian taste walk: increments N(0, dt / horizon), summed within each user.
        t = session_time[a:b] / (config.horizon_days * DAY)
        new_user = np.r_[True, user[1:] != user[:-1]]
        previous = np.where(new_user, 0.0, np.r_[0.0, t[:-1]])
        step = np.sqrt(np.maximum(t - previous, 0.0))[:, None] * rng.standard_normal((b - a, n_features))
        walk = np.cumsum(step, axis=0)  # (m, F)
        walk -= (walk - step)[np.flatnonzero(new_user)][np.cumsum(new_user) - 1]  # restart at each user
        logits = (taste[user] + config.drift * walk) @ catalogue.features.T / config.taste_temperature
        logits = logits + log_mass[session_day[a:b]]  # (m, C)
        probability = np.exp(logits - logits.max(axis=1, keepdims=True))
        cdf = np.cumsum(probability, axis=1)
        cdf /= cdf[:, -1:]
        # Inverse-CDF draw for every event of the chunk at once: row r's CDF is shifted to (r, r+1].
        events = np.arange(event_start[a], event_start[b])
        events = events[chosen[events]]
        row = event_session[events] - a
        u = np.minimum(rng.random(len(events)), 1.0 - 1e-9)
        shifted = (cdf + np.arange(b - a)[:, None]).ravel()
        position = np.searchsorted(shifted, row + u, side="right") - row * n_combinations
        out[events] = np.clip(position, 0, n_combinations - 1)
    return out[chosen], taste


def _choose_within_combination(rng: np.random.Generator, catalogue: _Catalogue, combination: np.ndarray,
                               day: np.ndarray, n_days: int) -> np.ndarray:
    """An item of each event's combination released by its day, P ∝ pop ** popularity_weight."""
    order = np.lexsort((catalogue.release_day, catalogue.combination))  # by combination, then release
    key = catalogue.combination[order] * (n_days + 1) + catalogue.release_day[order]  # sorted int64
    cumulative = np.concatenate([[0.0], np.cumsum(catalogue.weight[order])])
    start = np.searchsorted(key, combination * (n_days + 1), side="left")
    end = np.searchsorted(key, combination * (n_days + 1) + day, side="right")  # released by ``day``
    target = cumulative[start] + rng.random(len(day)) * (cumulative[end] - cumulative[start])
    position = np.clip(np.searchsorted(cumulative, target, side="right") - 1, start, end - 1)
    return order[position]


def _choose_uniform_released(rng: np.random.Generator, release_day: np.ndarray, day: np.ndarray) -> np.ndarray:
    """A uniformly random item among those released by each event's day (noise clicks)."""
    order = np.argsort(release_day, kind="stable")
    released = np.searchsorted(release_day[order], day, side="right")  # >= 1: some item is on day 0
    return order[np.minimum((rng.random(len(day)) * released).astype(np.int64), released - 1)]


def _apply_repeats(rng: np.random.Generator, items: np.ndarray, user: np.ndarray, purchase: np.ndarray,
                   repeat: np.ndarray) -> None:
    """Re-buys in place: a ``repeat`` purchase takes the item of a uniformly chosen earlier
    purchase of the same user (events are grouped by user, in time order within a user)."""
    rows = np.flatnonzero(purchase)  # (P,) purchases, grouped by user
    buyer = user[rows]
    first = np.searchsorted(buyer, buyer, side="left")  # (P,) the user's first purchase
    index = np.arange(len(rows))
    earlier = index - first  # purchases of the same user before this one
    draw = rng.random(len(rows))
    parent = index.copy()
    again = repeat[rows] & (earlier > 0)
    parent[again] = first[again] + (draw[again] * earlier[again]).astype(np.int64)
    # A re-buy of a re-buy is resolved by pointer jumping: parents always point to earlier rows.
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            break
        parent = grand
    items[rows] = items[rows][parent]
