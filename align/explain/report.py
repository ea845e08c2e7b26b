"""Explanations put together per result, as JSON-ready dicts and as text.

``RecommendationExplainer`` (``align recommend --explain``, ``POST /recommend`` with ``"explain":
true``) and ``SearchExplainer`` (``align search --explain``, ``POST /search``) are built once over
a loaded head or index (building embeds the vocabulary: one text-tower forward per 64 words) and
then explain any number of requests. A recommendation's explanation::

    {"user_words": [{"word", "field", "score"}],              # what the user wants (words.py)
     "results": [{"id", "score",
                  "history": {"method": "leave_one_out" | "gradient_x_input",
                              "contributions": [{"id", "position", "contribution"}],  # largest first
                              "unread": n},                   # older entries outside the head's window
                  "modalities": {"method": "shapley", "shares": {modality: share}, "base", "score"},
                  "words": [{"word", "field", "score", "item", "user"}]}]}

A search's has ``query_words`` instead of ``user_words``, no ``history``, and ``"method":
"linear"`` modality shares with ``rest`` (the part of the fused vector outside the item's modality
vectors: float32 rounding for ``align embed``'s folders) instead of ``base``; both say how each
part was computed (history.py, modalities.py, words.py).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

import torch

from align.errors import RunError
from align.explain.history import LOO_MAX, Method, history_contributions
from align.explain.modalities import linear_shares, shapley_shares
from align.explain.words import Terms, WordProbe, catalogue_terms, metadata_terms, user_preference
from align.index.search import QueryEncoder
from align.index.vectors import FUSED, ItemEmbeddings, load_item_embeddings, truncate_embeddings

Recommender = Any  # an align.rec.recommend.Recommender: not imported, as align recommend imports this package

TOP_WORDS = 5  # words listed per result and for the query or user

METHOD_TEXT = {  # how each part was computed, said once above the results
    "leave_one_out": "leave-one-out, the score minus the score without that entry",
    "gradient_x_input": "gradient x input, a first-order share of the score",
    "shapley": "Shapley shares; with base (ID, popularity) they sum to the score",
    "linear": "an exact split of the fused cosine; they sum to it (with rest, where shown: the part of the "
              "fused vector outside the item's modality vectors)",
}


def checkpoint_of(recommender: "Recommender") -> str:
    """The checkpoint that made the recommender's item vectors (its text tower embeds the words):
    ``QueryEncoder(checkpoint_of(recommender))``."""
    return load_item_embeddings(recommender.items_folder).metadata.get("checkpoint", "")


def _columns(checkpoint: str):
    """The manifest columns the checkpoint was trained with (which columns are text and media)."""
    from align.loading import model_folder, read_saved_config

    return read_saved_config(model_folder(checkpoint)).data.columns


def recommender_probe(recommender: "Recommender", encoder: QueryEncoder,
                      manifests: Optional[Sequence[str]] = None) -> WordProbe:
    """The word probe of a recommender: the words of ``manifests`` (default its catalogue,
    ``data.catalogue``) embedded with ``encoder`` (the text tower of ``checkpoint_of(recommender)``),
    measured on its items."""
    terms = catalogue_terms(manifests or recommender.config.data.catalogue, _columns(encoder.checkpoint))
    return WordProbe.build(terms, lambda words: encoder.encode("text", words), recommender.content,
                           recommender.present)


def _word_list(probe: WordProbe, values: torch.Tensor, n: int) -> List[Dict[str, Any]]:
    return [{"word": probe.terms.words[w], "field": probe.terms.fields[w], "score": float(values[w])}
            for w in probe.top(values, n)]


def _match_words(probe: WordProbe, item: torch.Tensor, wanted: torch.Tensor, n: int, side: str) -> List[Dict]:
    """The words of one match, ranked by the item's z-score times the query's or user's preference,
    both positive: a word the item lacks and the query shuns does not describe the match (fewer
    than ``n`` when fewer qualify)."""
    match = item.clamp(min=0) * wanted.clamp(min=0)
    return [{"word": probe.terms.words[w], "field": probe.terms.fields[w], "score": float(match[w]),
             "item": float(item[w]), side: float(wanted[w])} for w in probe.top(match, n) if match[w] > 0]


class RecommendationExplainer:
    """Explains a head's recommendations (module docstring).

    Args:
        recommender: the loaded head.
        probe: its word probe (``recommender_probe``).
        method: how history entries are credited ("auto", "leave_one_out", "gradient_x_input").
        loo_max: "auto" uses leave-one-out up to this many entries read.
        top_words: words per result and for the user.
    """

    def __init__(self, recommender: "Recommender", probe: WordProbe, method: Method = "auto",
                 loo_max: int = LOO_MAX, top_words: int = TOP_WORDS) -> None:
        self.recommender, self.probe = recommender, probe
        self.method, self.loo_max, self.top_words = method, loo_max, top_words
        self.embeddings = load_item_embeddings(recommender.items_folder)

    @torch.no_grad()
    def explain(self, history: Sequence[str], results: Sequence[str], scores: Optional[Sequence[float]] = None
                ) -> Dict[str, Any]:
        """The explanation of ``results`` (item ids) recommended for ``history`` (item ids, oldest first)."""
        rec = self.recommender
        history_rows = rec.rows_of(list(history), "history")
        rows = rec.rows_of(list(results), "results")
        user = rec.history_vectors([history_rows])[0]  # (dim,)
        wanted = user_preference(rec, self.probe, [history_rows])[0]  # (V,)
        item_words = self.probe.item_scores(rec.content[rows])  # (k, V)
        credit = history_contributions(rec, history_rows, rows, self.method, self.loo_max)
        names, shares, base, totals = shapley_shares(rec, self.embeddings, user, rows)
        explained = []
        for n, item in enumerate(results):
            order = credit.ranking(n)
            explained.append({
                "id": item, "score": float(credit.scores[n] if scores is None else scores[n]),
                "history": {"method": credit.method, "unread": credit.unread, "contributions": [
                    {"id": history[int(credit.positions[p])], "position": int(credit.positions[p]),
                     "contribution": float(credit.values[p, n])} for p in order]},
                "modalities": {"method": "shapley", "shares": dict(zip(names, shares[n].tolist())),
                               "base": float(base[n]), "score": float(totals[n])},
                "words": _match_words(self.probe, item_words[n], wanted, self.top_words, "user"),
            })
        return {"user_words": _word_list(self.probe, wanted, self.top_words), "results": explained}


class SearchExplainer:
    """Explains search results over an index (module docstring).

    Args:
        embeddings: the ``align embed`` folder the index was built from (``index.info["embeddings"]``),
            cut to the index's width (``search_explainer``).
        modality: the vectors the index holds ("fused", or one modality).
        probe: the word probe, measured on ``embeddings``.
        top_words: words per result and for the query.
    """

    def __init__(self, embeddings: ItemEmbeddings, modality: str, probe: WordProbe, top_words: int = TOP_WORDS) -> None:
        self.embeddings, self.modality, self.probe, self.top_words = embeddings, modality, probe, top_words
        self.row_of = embeddings.row_of()
        self.names = list(embeddings.modalities) if modality == FUSED else [modality]

    @torch.no_grad()
    def explain(self, query: Any, results: Sequence[str]) -> Dict[str, Any]:
        """The explanation of ``results`` (item ids) found for the query vector ``query`` (D,),
        a tensor or an array."""
        emb = self.embeddings
        rows = torch.tensor([self.row_of[i] for i in results], dtype=torch.long)
        query = torch.as_tensor(query).reshape(-1).float()  # (D,); a server's row comes as numpy
        shares, rest, scores = linear_shares(query, emb.vectors[self.modality][rows],
                                             {m: emb.vectors[m][rows] for m in self.names},
                                             {m: emb.masks[m][rows] for m in self.names})
        content = emb.vectors[self.modality]
        wanted = self.probe.preference((content[self.probe.sample] @ query)[None])[0]  # (V,)
        item_words = self.probe.item_scores(content[rows])  # (k, V)
        explained = [{"id": item,
                      "modalities": {"method": "linear", "shares": dict(zip(self.names, shares[n].tolist())),
                                     "rest": float(rest[n]), "score": float(scores[n])},
                      "words": _match_words(self.probe, item_words[n], wanted, self.top_words, "query")}
                     for n, item in enumerate(results)]
        return {"query_words": _word_list(self.probe, wanted, self.top_words), "results": explained}


def search_terms(index: Any, checkpoint: str, manifests: Optional[Sequence[str]] = None,
                 recommender: Optional["Recommender"] = None) -> Terms:
    """The vocabulary for explaining searches: the words of ``manifests`` when given, else of the
    recommender's catalogue, else the index's metadata values, else the manifests the model was
    trained on (its ``data.train`` and ``data.val``)."""
    columns = _columns(checkpoint)
    if manifests:
        return catalogue_terms(manifests, columns)
    if recommender is not None and recommender.config.data.catalogue:
        return catalogue_terms(recommender.config.data.catalogue, columns)
    metadata = {item: index.metadata_of(item) for item in index.ids} if getattr(index, "fields", None) else {}
    if any(metadata.values()):
        return metadata_terms(metadata)
    from align.data.manifest import is_manifest
    from align.loading import model_folder, read_saved_config

    data = read_saved_config(model_folder(checkpoint)).data
    trained = [path for path in (data.train, data.val) if path and is_manifest(path) and os.path.isfile(path)]
    if not trained:
        raise RunError(f"no catalogue words to explain with: the index keeps no metadata and the model's training "
                       f"data ({data.train}) is not a manifest here; give the catalogue manifests (--vocabulary)")
    return catalogue_terms(trained, columns)


def search_explainer(index: Any, encoder: QueryEncoder, manifests: Optional[Sequence[str]] = None,
                     recommender: Optional["Recommender"] = None) -> SearchExplainer:
    """A ``SearchExplainer`` for ``index`` (``open_index``'s) with the words embedded by ``encoder``
    (a ``QueryEncoder``); the vocabulary as ``search_terms`` finds it."""
    folder = index.info.get("embeddings")
    if not folder or not os.path.isdir(folder):
        raise RunError(f"the index does not record the `align embed` folder it was built from ({folder!r}); "
                       f"explanations read its modality vectors: build the index again with `align index`")
    embeddings = load_item_embeddings(folder)
    width = embeddings.vectors[FUSED].shape[-1]
    dim = int(index.info.get("dim") or width)
    if width < dim:
        raise RunError(f"{folder}: its vectors have dim {width}, the index's {dim}: the folder was written again "
                       f"after the index was built; build the index again with `align index`")
    if width > dim:  # `align index --dim`: the index holds every vector cut and renormalised, so cut them alike
        embeddings = truncate_embeddings(embeddings, dim)
    modality = index.info.get("modality") or FUSED
    terms = search_terms(index, encoder.checkpoint, manifests, recommender)
    probe = WordProbe.build(terms, lambda words: encoder.encode("text", words), embeddings.vectors[modality],
                            embeddings.masks[modality])
    return SearchExplainer(embeddings, modality, probe)


class Explainers:
    """A search explainer and a recommendation explainer built on first use and kept (a server
    explains many requests; building one embeds the vocabulary). Not thread-safe by itself: call
    it from one thread (``align serve`` runs it on its forwards' single thread, so the text tower
    never runs twice at once).

    Args:
        encoder: the server's ``QueryEncoder`` (embeds the words).
        index: the searched index (``open_index``'s).
        recommender: the head, or None.
    """

    def __init__(self, encoder: QueryEncoder, index: Any, recommender: Optional["Recommender"] = None) -> None:
        self.encoder, self.index, self.recommender = encoder, index, recommender
        self._search: Optional[SearchExplainer] = None
        self._recommend: Optional[RecommendationExplainer] = None

    def search(self, query: Any, results: Sequence[str]) -> Dict[str, Any]:
        """``SearchExplainer.explain`` over the index."""
        if self._search is None:
            self._search = search_explainer(self.index, self.encoder, recommender=self.recommender)
        return self._search.explain(query, results)

    def recommend(self, history: Sequence[str], results: Sequence[str], scores: Sequence[float]) -> Dict[str, Any]:
        """``RecommendationExplainer.explain`` with the head."""
        if self.recommender is None:
            raise RunError("there is no recommender to explain")
        if self._recommend is None:
            self._recommend = RecommendationExplainer(self.recommender,
                                                      recommender_probe(self.recommender, self.encoder))
        return self._recommend.explain(history, results, scores)


def attach_explanation(answer: Dict[str, Any], results: List[Dict[str, Any]], why: Dict[str, Any]) -> None:
    """Put ``why`` (an ``explain`` answer) into a command's or a server's ``answer``: each of
    ``results`` (dicts with the same ids, in the same order) gets its ``explanation``, and the
    answer the query's or user's words."""
    for entry, reason in zip(results, why["results"]):
        entry["explanation"] = {key: value for key, value in reason.items() if key not in ("id", "score")}
    answer.update({key: value for key, value in why.items() if key != "results"})


# ------------------------------------------------------------------------------------------------
# text
# ------------------------------------------------------------------------------------------------
def _words_text(words: Sequence[Dict[str, Any]]) -> str:
    return ", ".join(f"{w['word']} ({w['field']}) {w['score']:+.2f}" for w in words) or "-"


def _shares_text(modalities: Dict[str, Any]) -> str:
    parts = [f"{m} {v:+.4f}" for m, v in modalities["shares"].items()]
    if "base" in modalities:
        parts.append(f"base {modalities['base']:+.4f}")
    if abs(modalities.get("rest", 0.0)) >= 0.00005:  # shown where it shows at 4 decimals
        parts.append(f"rest {modalities['rest']:+.4f}")
    return "  ".join(parts) + f"  = {modalities['score']:.4f}"


def format_explanation(explanation: Dict[str, Any], history_shown: int = 3) -> str:
    """Plain text of a recommendation's or a search's explanation: what each part means, then
    one block per result."""
    results = explanation["results"]
    side = "user" if "user_words" in explanation else "query"
    lines = [f"the {side}'s words: {_words_text(explanation[side + '_words'])}"]
    if results:
        if "history" in results[0]:
            lines.append(f"history: {METHOD_TEXT[results[0]['history']['method']]} (#position, oldest #0)")
        lines.append(f"modalities: {METHOD_TEXT[results[0]['modalities']['method']]}")
        lines.append(f"words: how much the item shows the word (z-score over the catalogue) x how much the {side} "
                     f"wants it")
    for rank, result in enumerate(results, 1):
        lines.append(f"{rank:4d}  {result['id']}")
        history = result.get("history")
        if history is not None:
            shown = history["contributions"][:history_shown]
            text = ", ".join(f"{c['id']} (#{c['position']}) {c['contribution']:+.4f}" for c in shown) or "none"
            more = len(history["contributions"]) - len(shown)
            text += f", {more} more" if more > 0 else ""
            text += f"; {history['unread']} older entries not read" if history["unread"] else ""
            lines.append(f"      history     {text}")
        lines.append(f"      modalities  {_shares_text(result['modalities'])}")
        lines.append(f"      words       {_words_text(result['words'])}")
    return "\n".join(lines)
