"""A deterministic search-log simulator over a real catalogue: what customers typed (or
photographed, or said), which products they then viewed, carted and bought, with some queries
and some products held out entirely, so fine-tuning on a search log can be judged where the
truth is known.

Generative story (every knob is a field of ``SearchSimConfig``; one ``numpy`` Generator seeded
by ``seed`` draws everything in a fixed order, so the same inputs give the same log):

Products
  * Each item has attribute values (``attributes``, said in that order, the last one the noun:
    for the demo catalogue ``size colour pattern kind``, as in "large red striped star").
    Items with the same values form a *combination* (near-duplicates).
  * Held-out products: whole combinations, drawn at random until ``held_out_product_fraction``
    of the items is covered (plus the combinations of ``new_items``, e.g. the demo's test.csv).
    They never appear in any training row, as judged item or as query.
Text queries (``1 - photo_query_fraction - voice_query_fraction`` of ``n_queries`` sessions)
  * Intent: an anchor item drawn uniformly; with ``full_mention_prob`` every attribute is
    mentioned, otherwise a uniform number 1 .. A-1 of them, the noun among them with
    ``noun_mention_prob`` (a partial mention: "red star", "striped").
  * Words: each mentioned value is said in its canonical form ("striped" for ``stripes``) or,
    with ``synonym_prob``, a synonym (``SURFACES``: "crimson", "stripy"); the last synonym of a
    value with three or more forms is *reserved*: only held-out queries use it. Without the
    noun the phrase ends in a generic noun ("red striped item").
  * Template: a paraphrase (``TEMPLATES``: "buy {}", "{} for sale", "looking for a {}" ...);
    ``held_out_template_fraction`` of them (never the bare "{}") are held out: queries made
    with them are *novel queries*.
  * Typos: with ``typo_prob`` one word of four letters or more gets one edit (a dropped,
    doubled or swapped letter, or a neighbouring key on a QWERTY keyboard).
Photo and voice queries (``photo_query_fraction`` / ``voice_query_fraction``, when the
catalogue has images / audio): an anchor item's image (or audio) is the query; its intent is all
its attributes, so its near-duplicates are the relevant items; the anchor itself is never among
its own results. A photo or voice query whose anchor is a held-out product is a novel query.
Relevance and behaviour
  * Match level of an item to the intent over the mentioned attributes: 3 when all match; 2
    when one mismatches, it is not the noun, and at least two match; 1 when the noun is
    mentioned and matches, or the noun is not mentioned and something matches ("same kind
    only" is 1); 0 otherwise.
  * The search page shows ``page_size`` items, drawn without replacement with weights
    ``EXPOSURE_WEIGHT[level]`` (a rough search engine). A shown item is viewed with
    ``VIEW_PROB[level]``, a viewed one carted with ``CART_PROB[level]``, a carted one bought
    with ``BUY_PROB[level]``: the log has a row per event (view, cart, buy), so the grade of a
    pair is its deepest event (view 1, cart 2, buy 3 by ``EventGrades``). Unviewed items are not
    in the log, as in a real one; a session nobody clicked leaves no row.
  * Times: sessions at uniform times over ``horizon_days`` from 2024-01-01 UTC, events a few
    seconds apart; written as ISO-8601.
Splits (each distinct query is one unit: all its sessions go to one side)
  * Query side: novel (held-out template, or a photo/voice anchor that is a held-out product;
    any other session whose text equals a novel string becomes novel too), else *known*; a
    known query goes to the in-domain evaluation with ``in_domain_fraction`` (a fresh query of
    the training distribution: its string never occurs in training), else to training.
  * Each judged pair then goes by its product side:

        query \\ product      seen product          held-out product
        training             train                 eval_novel_products
        in-domain            eval_in_domain        eval_novel_products
        novel                eval_novel_queries    eval_both_novel

  * ``val_fraction`` of the training queries (0 by default) go to ``val`` instead (their pairs
    with held-out products still go to ``eval_novel_products``): a held-out log for
    ``data.search_log.val``, drawn from a generator of its own (seeded by ``seed`` and
    ``VAL_STREAM``), so that every other draw, and so every other split, stays as it was.
  * Candidates to rank: the seen products for ``eval_in_domain``, ``eval_novel_queries`` and ``val``,
    the held-out products for ``eval_novel_products`` and ``eval_both_novel``. ``stats.json``
    lists the held-out items.
Complete judgements (``SimulatedLog.judgements``, written as ``<split>.truth.csv``)
  * A log judges only what a page showed and somebody viewed: a few of the tens or hundreds of
    products that fit a query (a "red star" fits every red star, of any size and pattern).
    Scored against the log alone, a model that puts an equally fitting but unshown product first
    is marked wrong, so the log's figures are mostly the luck of the page. The simulator knows
    the truth, so for each evaluation split it also lists, for every query of that split's log
    file, every candidate on the split's side that fits it, its match level (1..3) as its grade:
    complete judgements (``align search-eval --judged-by truth``). A photo query's own item is
    among them (it fits its own intent); a logged item that does not fit is listed with grade 0.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from align.errors import ConfigError
from align.knobs import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, PROBABILITY, check_knobs, knob

DEFAULT_ATTRIBUTES = ("size", "colour", "pattern", "kind")  # in the order they are said; the noun last
SPLITS = ("train", "eval_in_domain", "eval_novel_queries", "eval_novel_products", "eval_both_novel")
VAL_SPLIT = "val"  # written only with val_fraction > 0
VAL_STREAM = 0x7A1  # the val draw's own generator: [seed, VAL_STREAM]
CANDIDATES = {"eval_in_domain": "seen", "eval_novel_queries": "seen",
              "eval_novel_products": "held_out", "eval_both_novel": "held_out"}
LOG_COLUMNS = ("query", "query_image", "query_audio", "item_id", "event", "timestamp", "split", "intent")
TRUTH_SUFFIX = ".truth.csv"  # <split>.truth.csv: a split's complete judgements, beside its log file
JUDGEMENT_COLUMNS = ("query", "query_image", "query_audio", "item_id", "relevance")
EVENTS = ("view", "cart", "buy")  # graded 1, 2, 3 by the default EventGrades

# Surface forms of a value: the canonical one first, then synonyms; the last of three or more is
# reserved for held-out queries. A value missing here is said as it is written.
SURFACES: Dict[str, List[str]] = {
    "circle": ["circle", "disc", "round"], "square": ["square", "block", "box"],
    "triangle": ["triangle", "trigon", "pyramid"], "star": ["star", "starburst", "asterisk"],
    "ring": ["ring", "donut", "hoop"], "cross": ["cross", "plus sign", "crucifix"],
    "red": ["red", "crimson", "scarlet"], "orange": ["orange", "tangerine", "amber"],
    "yellow": ["yellow", "lemon", "golden"], "green": ["green", "emerald", "lime"],
    "blue": ["blue", "navy", "azure"], "purple": ["purple", "violet", "lilac"],
    "solid": ["solid", "plain", "unpatterned"], "stripes": ["striped", "stripy", "lined"],
    "dots": ["dotted", "polka dot", "spotted"], "checks": ["checked", "checkered", "plaid"],
    "small": ["small", "tiny", "little"], "medium": ["medium", "mid-size", "regular"],
    "large": ["large", "big", "huge"],
}
GENERIC_NOUNS = ("item", "thing", "product")
TEMPLATES = ("{}", "buy {}", "{} for sale", "cheap {}", "looking for a {}", "i want a {}", "best {}",
             "{} online", "where to get a {}", "show me a {}", "{} deals", "need a {} asap")
EXPOSURE_WEIGHT = (1.0, 3.0, 9.0, 27.0)  # by match level 0..3
VIEW_PROB = (0.1, 0.35, 0.6, 0.85)
CART_PROB = (0.02, 0.1, 0.3, 0.55)  # given viewed
BUY_PROB = (0.1, 0.2, 0.4, 0.6)  # given carted
START = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
_KEYBOARD = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]


@dataclass
class SearchSimConfig:
    """Every knob of the search-log simulator (see the module docstring for the story)."""

    n_queries: int = knob(3000, "number of search sessions")
    seed: int = knob(0, "random seed: the same seed gives the same log")
    full_mention_prob: float = knob(0.35, "chance a text query mentions every attribute")
    noun_mention_prob: float = knob(0.85, "chance a partial text query mentions the noun (last attribute)")
    synonym_prob: float = knob(0.3, "chance a mentioned value is said with a synonym")
    typo_prob: float = knob(0.08, "chance a text query has one typo")
    photo_query_fraction: float = knob(0.1, "fraction of sessions searching with an item's image")
    voice_query_fraction: float = knob(0.05, "fraction of sessions searching with an item's audio")
    held_out_product_fraction: float = knob(0.15, "fraction of items (whole combinations) held out of training")
    held_out_template_fraction: float = knob(0.25, "fraction of the paraphrase templates held out of training")
    in_domain_fraction: float = knob(0.15, "fraction of known queries kept for the in-domain evaluation")
    val_fraction: float = knob(0.0, "fraction of the training queries kept as val.csv, a held-out log for "
                                    "data.search_log.val (no other split moves)")
    page_size: int = knob(10, "items shown per search")
    horizon_days: float = knob(30.0, "length of the simulated period in days")

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the knob (and its flag) for a value out of range."""
        rules = dict.fromkeys(("full_mention_prob", "noun_mention_prob", "synonym_prob", "typo_prob",
                               "photo_query_fraction", "voice_query_fraction", "held_out_product_fraction",
                               "held_out_template_fraction", "in_domain_fraction", "val_fraction"), PROBABILITY)
        rules.update({"n_queries": AT_LEAST_ONE, "seed": NON_NEGATIVE, "page_size": AT_LEAST_ONE,
                      "horizon_days": POSITIVE})
        check_knobs(self, rules, "search-log simulator", "align prep search-log simulate")
        if self.photo_query_fraction + self.voice_query_fraction > 1.0:
            raise ConfigError(f"search-log simulator photo_query_fraction + voice_query_fraction = "
                              f"{self.photo_query_fraction + self.voice_query_fraction} is more than 1")


@dataclass
class SimCatalogue:
    """The catalogue as the simulator needs it.

    Attributes:
        item_ids: the ids, in catalogue order.
        attributes: attribute name -> value of every item ("" when unknown), in the order the
            attributes are said, the noun last.
        images, audio: a media path per item as the log should write it ("" when none).
    """

    item_ids: List[str]
    attributes: Dict[str, List[str]]
    images: List[str]
    audio: List[str]


@dataclass
class SimulatedLog:
    """The simulated log: ``rows`` (one dict per event, keys ``LOG_COLUMNS``, in time order),
    what was held out, and ``judgements``: per evaluation split, the complete judgements of its
    queries (one dict per (query, fitting candidate), keys ``JUDGEMENT_COLUMNS``; module doc)."""

    rows: List[Dict[str, str]]
    held_out_items: List[str]
    held_out_templates: List[str]
    reserved_words: List[str]
    judgements: Dict[str, List[Dict[str, str]]] = field(default_factory=dict)


@dataclass
class _Session:
    """One search before its results: the query, its intent, and which side it is on."""

    text: str = ""
    image: str = ""
    audio: str = ""
    intent: Dict[int, int] = field(default_factory=dict)  # attribute index -> value code
    anchor: int = -1  # the item whose image/audio is the query (excluded from its results)
    novel: bool = False

    @property
    def key(self) -> str:
        return query_key(self.text, self.image, self.audio)


def query_key(text: str, image: str, audio: str) -> str:
    """One string per distinct query: its text, or its photo's or voice clip's path."""
    return text if text else f"image:{image}" if image else f"audio:{audio}"


def simulate_search_log(catalogue: SimCatalogue, config: SearchSimConfig,
                        new_items: Sequence[int] = ()) -> SimulatedLog:
    """Simulate a search log over ``catalogue`` (see the module docstring); ``new_items``
    (indices) are held out as products (with their whole combinations) besides the random ones."""
    config.validate()
    n_items = len(catalogue.item_ids)
    names = list(catalogue.attributes)
    if n_items < 2 or not names:
        raise ConfigError(f"search-log simulator: needs at least 2 items and one attribute "
                          f"(got {n_items} items, attributes {names})")
    rng = np.random.default_rng(config.seed)
    vocab = [sorted(set(v) - {""}) for v in catalogue.attributes.values()]
    codes = np.asarray([[vocab[a].index(v) if v else -1 for v in catalogue.attributes[name]]
                        for a, name in enumerate(names)], dtype=np.int64).T  # (n_items, A)
    held_out = _held_out_items(rng, codes, config.held_out_product_fraction, new_items)
    if held_out.all() or not held_out.any():
        raise ConfigError(f"search-log simulator: {int(held_out.sum())} of {n_items} items would be held out; "
                          f"adjust held_out_product_fraction (or --new) so both sides have items")
    n_held = max(1, int(round(config.held_out_template_fraction * (len(TEMPLATES) - 1))))
    held_templates = sorted(1 + rng.permutation(len(TEMPLATES) - 1)[:n_held])

    sessions = _sessions(rng, catalogue, codes, vocab, names, held_out, set(held_templates), config)
    novel_keys = {s.key for s in sessions if s.novel}
    for session in sessions:  # a known wording that happens to equal a novel one is novel too
        session.novel = session.novel or session.key in novel_keys
    known = list(dict.fromkeys(s.key for s in sessions if not s.novel))
    in_domain = dict(zip(known, rng.random(len(known)) < config.in_domain_fraction))
    training = [key for key in known if not in_domain[key]]
    val_draw = np.random.default_rng([config.seed, VAL_STREAM]).random(len(training))
    val = {key for key, u in zip(training, val_draw) if u < config.val_fraction}

    seconds = np.sort(rng.uniform(0.0, config.horizon_days * 86400.0, size=len(sessions)))
    rows: List[Dict[str, str]] = []
    for session, start in zip(sessions, seconds):
        side = ("novel" if session.novel else "in_domain" if in_domain[session.key]
                else VAL_SPLIT if session.key in val else "train")
        rows += _session_rows(rng, session, side, start, codes, held_out, catalogue, names, vocab, config)
    said = [SURFACES.get(value, [value]) for values in vocab for value in values]
    reserved = sorted({forms[-1] for forms in said if len(forms) >= 3})
    intents = {}
    for session in sessions:  # a query's wording fixes its intent; the first session's is kept
        intents.setdefault(session.key, session.intent)
    return SimulatedLog(rows=rows, held_out_items=[catalogue.item_ids[i] for i in np.flatnonzero(held_out)],
                        held_out_templates=[TEMPLATES[t] for t in held_templates], reserved_words=reserved,
                        judgements=complete_judgements(rows, intents, codes, held_out, catalogue.item_ids,
                                                       with_val=config.val_fraction > 0))


def complete_judgements(rows: Sequence[Dict[str, str]], intents: Dict[str, Dict[int, int]], codes: np.ndarray,
                        held_out: np.ndarray, item_ids: Sequence[str],
                        with_val: bool = False) -> Dict[str, List[Dict[str, str]]]:
    """Per evaluation split (and ``val`` with ``with_val``), every candidate of its side that fits
    each of its queries (match level >= 1, the level as ``relevance``), queries in order of first
    appearance in the log;
    an item the log has for a query but that does not fit it is listed with relevance 0, so
    every query of the log is judged (one with nothing fitting is left out of the metrics'
    means, as metrics.py says). ``intents`` maps a ``query_key`` to its intent."""
    row_of = {item: n for n, item in enumerate(item_ids)}
    out: Dict[str, List[Dict[str, str]]] = {}
    for split, side in {**CANDIDATES, **({VAL_SPLIT: "seen"} if with_val else {})}.items():
        on_side = held_out if side == "held_out" else ~held_out
        logged: Dict[Tuple[str, str, str], np.ndarray] = {}
        for row in rows:
            if row["split"] == split:
                query = (row["query"], row["query_image"], row["query_audio"])
                logged.setdefault(query, np.zeros(len(item_ids), dtype=bool))[row_of[row["item_id"]]] = True
        judged = []
        for (text, image, audio), shown in logged.items():
            level = match_levels(codes, intents[query_key(text, image, audio)])
            for item in np.flatnonzero(((level > 0) | shown) & on_side):
                judged.append({"query": text, "query_image": image, "query_audio": audio,
                               "item_id": item_ids[item], "relevance": str(int(level[item]))})
        out[split] = judged
    return out


def _held_out_items(rng: np.random.Generator, codes: np.ndarray, fraction: float,
                    new_items: Sequence[int]) -> np.ndarray:
    """(n_items,) bool: whole combinations, those of ``new_items`` first, then random ones until
    ``fraction`` of the items is covered."""
    _, combination = np.unique(codes, axis=0, return_inverse=True)
    combination = combination.reshape(-1)
    held = np.isin(combination, combination[np.asarray(new_items, dtype=np.int64)])
    target = int(round(fraction * len(codes)))
    for c in rng.permutation(combination.max() + 1):
        if held.sum() >= target:
            break
        held |= combination == c
    return held


def _sessions(rng: np.random.Generator, catalogue: SimCatalogue, codes: np.ndarray, vocab: List[List[str]],
              names: List[str], held_out: np.ndarray, held_templates: set, config: SearchSimConfig) -> List[_Session]:
    """Every session's query (text, photo or voice), drawn in session order."""
    with_image = np.flatnonzero([bool(p) for p in catalogue.images])
    with_audio = np.flatnonzero([bool(p) for p in catalogue.audio])
    kinds = rng.random(config.n_queries)
    sessions = []
    for draw in kinds:
        photo = draw < config.photo_query_fraction and len(with_image)
        voice = not photo and draw >= 1.0 - config.voice_query_fraction and len(with_audio)
        if photo or voice:
            anchor = int(rng.choice(with_image if photo else with_audio))
            media = (catalogue.images if photo else catalogue.audio)[anchor]
            intent = {a: int(v) for a, v in enumerate(codes[anchor]) if v >= 0}
            sessions.append(_Session(image=media if photo else "", audio="" if photo else media, intent=intent,
                                     anchor=anchor, novel=bool(held_out[anchor])))
            continue
        anchor = int(rng.integers(len(codes)))
        template = int(rng.integers(len(TEMPLATES)))
        novel = template in held_templates
        intent = _intent(rng, codes[anchor], config)
        words = [_surface(rng, vocab[a][intent[a]], novel, config.synonym_prob) for a in sorted(intent)]
        if len(names) - 1 not in intent:
            words.append(GENERIC_NOUNS[int(rng.integers(len(GENERIC_NOUNS)))])
        text = TEMPLATES[template].format(" ".join(words))
        if rng.random() < config.typo_prob:
            text = _typo(rng, text)
        sessions.append(_Session(text=text, intent=intent, novel=novel))
    return sessions


def _intent(rng: np.random.Generator, values: np.ndarray, config: SearchSimConfig) -> Dict[int, int]:
    """{attribute index: value code} of the mentioned attributes of an anchor (unknown ones skipped)."""
    known = [a for a, v in enumerate(values) if v >= 0]
    noun = len(values) - 1
    if len(known) <= 1 or rng.random() < config.full_mention_prob:
        return {a: int(values[a]) for a in known}
    count = int(rng.integers(1, len(known)))  # 1 .. A-1 of them
    others = [a for a in known if a != noun]
    chosen = list(rng.permutation(others)[:count])
    if noun in known and rng.random() < config.noun_mention_prob:
        chosen = [noun] + chosen[:count - 1]
    return {int(a): int(values[a]) for a in chosen}


def _surface(rng: np.random.Generator, value: str, novel: bool, synonym_prob: float) -> str:
    """How a value is said: canonical, or a synonym; the reserved last synonym only when ``novel``."""
    forms = SURFACES.get(value, [value])
    usable = forms if novel or len(forms) < 3 else forms[:-1]
    if len(usable) == 1 or rng.random() >= synonym_prob:
        return usable[0]
    return usable[1 + int(rng.integers(len(usable) - 1))]


def _typo(rng: np.random.Generator, text: str) -> str:
    """One edit in a random word of 4+ letters: drop, double, swap with the next, or a neighbouring key."""
    words = text.split(" ")
    long = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
    if not long:
        return text
    i = long[int(rng.integers(len(long)))]
    word, at, kind = words[i], int(rng.integers(1, len(words[i]) - 1)), int(rng.integers(4))
    if kind == 0:
        word = word[:at] + word[at + 1:]
    elif kind == 1:
        word = word[:at] + word[at] + word[at:]
    elif kind == 2:
        word = word[:at] + word[at + 1] + word[at] + word[at + 2:]
    else:
        row = next((r for r in _KEYBOARD if word[at] in r), None)
        if row is not None:
            j = row.index(word[at])
            near = [row[k] for k in (j - 1, j + 1) if 0 <= k < len(row)]
            word = word[:at] + near[int(rng.integers(len(near)))] + word[at + 1:]
    words[i] = word
    return " ".join(words)


def match_levels(codes: np.ndarray, intent: Dict[int, int]) -> np.ndarray:
    """(n_items,) int64 match level 0..3 of every item to an intent (see the module docstring)."""
    noun = codes.shape[1] - 1
    mentioned = np.asarray(sorted(intent), dtype=np.int64)
    wanted = np.asarray([intent[a] for a in mentioned], dtype=np.int64)
    equal = codes[:, mentioned] == wanted  # (n_items, M)
    matched, mismatched = equal.sum(axis=1), (~equal).sum(axis=1)
    noun_known = noun in intent
    noun_ok = codes[:, noun] == intent[noun] if noun_known else np.ones(len(codes), dtype=bool)
    level = np.zeros(len(codes), dtype=np.int64)
    # Boolean masks only: ``~`` of a Python bool is an int, and an int array would index items.
    level[noun_ok & (matched > 0) if not noun_known else noun_ok] = 1
    level[(mismatched == 1) & noun_ok & (matched >= 2)] = 2
    level[mismatched == 0] = 3
    return level


def _session_rows(rng: np.random.Generator, session: _Session, side: str, start: float, codes: np.ndarray,
                  held_out: np.ndarray, catalogue: SimCatalogue, names: List[str], vocab: List[List[str]],
                  config: SearchSimConfig) -> List[Dict[str, str]]:
    """The events of one session: page shown, then views, carts and buys, one row each."""
    level = match_levels(codes, session.intent)
    weight = np.asarray(EXPOSURE_WEIGHT)[level]
    if session.anchor >= 0:
        weight[session.anchor] = 0.0  # the photographed item itself is never its own result
    keys = np.where(weight > 0, np.log(np.maximum(weight, 1e-300)) + rng.gumbel(size=len(weight)), -np.inf)
    page = np.argsort(-keys, kind="stable")[:min(config.page_size, int((weight > 0).sum()))]  # Gumbel top-k
    draws = rng.random((len(page), 3))
    viewed = draws[:, 0] < np.asarray(VIEW_PROB)[level[page]]
    carted = viewed & (draws[:, 1] < np.asarray(CART_PROB)[level[page]])
    bought = carted & (draws[:, 2] < np.asarray(BUY_PROB)[level[page]])
    intent = ";".join(f"{names[a]}={vocab[a][v]}" for a, v in sorted(session.intent.items()))
    rows, second = [], start
    for item, depth in zip(page, viewed.astype(int) + carted + bought):
        split = _split(side, bool(held_out[item]))
        for event in EVENTS[:depth]:
            second += 1.0 + float(rng.exponential(20.0))
            stamp = (START + datetime.timedelta(seconds=int(second))).strftime("%Y-%m-%dT%H:%M:%SZ")
            rows.append({"query": session.text, "query_image": session.image, "query_audio": session.audio,
                         "item_id": catalogue.item_ids[item], "event": event, "timestamp": stamp,
                         "split": split, "intent": intent})
    return rows


def _split(side: str, held_out_product: bool) -> str:
    """The split of a pair from its query side and product side (the table in the docstring)."""
    if side == "novel":
        return "eval_both_novel" if held_out_product else "eval_novel_queries"
    if held_out_product:
        return "eval_novel_products"
    return {"train": "train", VAL_SPLIT: VAL_SPLIT}.get(side, "eval_in_domain")


def written_splits(config: SearchSimConfig) -> Tuple[str, ...]:
    """The splits a simulation with ``config`` writes: ``SPLITS``, and ``val`` with ``val_fraction``."""
    return SPLITS + ((VAL_SPLIT,) if config.val_fraction > 0 else ())


def split_stats(rows: Sequence[Dict[str, str]], splits: Sequence[str] = SPLITS,
                grades: Optional[Dict[str, int]] = None) -> Dict[str, Dict]:
    """Per split of ``splits``: rows, distinct queries (by modality), judged pairs and their grade
    histogram (a pair's grade is its deepest event)."""
    grades = grades or {e: i + 1 for i, e in enumerate(EVENTS)}
    out: Dict[str, Dict] = {}
    for split in splits:
        pairs: Dict[Tuple[str, str, str, str], int] = {}
        n_rows = 0
        for row in rows:
            if row["split"] != split:
                continue
            n_rows += 1
            key = (row["query"], row["query_image"], row["query_audio"], row["item_id"])
            pairs[key] = max(pairs.get(key, 0), grades[row["event"]])
        queries = {k[:3] for k in pairs}
        out[split] = {
            "rows": n_rows, "pairs": len(pairs), "queries": len(queries),
            "queries_by_modality": {"text": sum(bool(q[0]) for q in queries), "image": sum(bool(q[1]) for q in queries),
                                    "audio": sum(bool(q[2]) for q in queries)},
            "grades": {str(g): sum(v == g for v in pairs.values()) for g in sorted(set(grades.values()))},
            "candidates": CANDIDATES.get(split, "seen"),
        }
    return out
