"""The catalogue words that best describe a match: zero-shot probes against the catalogue's own
vocabulary.

Vocabulary (``catalogue_terms``): the values of the manifests' attribute columns (a column other
than the id, text, media, group and negatives columns whose values are few and short: category,
kind, colour, size ...), then the most frequent words of the titles (in at least ``min_count``
titles, at most half of them: a word in every title says nothing), each word once, with the
column it came from (``field``; "title" for title words). ``metadata_terms`` takes the values an
``align index`` keeps as metadata instead. The words are embedded with the model's text tower.

Probes (``WordProbe``), over a fixed seeded sample of at most ``max_items`` catalogue items:

* an item's word score is the z-score of its cosine with the word among the sample's cosines
  with that word, z(i, w) = (<v_i, t_w> - mean_w) / std_w: how much more the item shows the word
  than the catalogue does (a word close to everything scores no item high);
* a query's or a user's word score is the correlation, over the sample, between its scores of
  the items (a search query's cosines; a user's head scores, minus what the head gives anyone)
  and the items' z(., w): how much the word's items are the ones it scores high;
* the words of a match (an item for a query or a user) are ranked by the product of the two,
  where both are positive: the item shows the word, and the query or user wants it.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from align.config import ColumnsConfig
from align.data.manifest import read_table_rows
from align.errors import RunError

Recommender = Any  # an align.rec.recommend.Recommender: not imported, as align recommend / align search import this package

MAX_VALUES = 64  # a column with more distinct values is not an attribute (ids, prices, free text)
TITLE_WORDS = 40  # most frequent title words kept
MIN_COUNT = 2  # a title word in fewer titles is not a catalogue word
MAX_ITEMS = 20000  # items in the probe's sample: its cost per query is this times the vocabulary
TITLE_FIELD = "title"
_WORD = re.compile(r"[^\W\d_]+(?:['-][^\W\d_]+)*")
STOPWORDS = frozenset("""a an and are as at be by for from has have in is it its of on or over the this to under
up with without your you our new set pack pcs piece pieces""".split())


@dataclass
class Terms:
    """Vocabulary words and the field (catalogue column, or "title") each came from."""

    words: List[str]
    fields: List[str]

    def __len__(self) -> int:
        return len(self.words)


def _cell(value: object) -> str:
    """A manifest cell as text ("" when empty; JSONL and Parquet cells may be numbers)."""
    return "" if value is None else str(value).strip()


def _attribute_values(values: Sequence[str], rows: int, max_values: int) -> Optional[List[str]]:
    """A column's values by frequency when it reads as an attribute (few, short values), else None."""
    counts = Counter(v for v in values if v)
    if not 2 <= len(counts) <= max_values or len(counts) > rows / 2:
        return None
    if any(len(v) > 40 or len(v.split()) > 4 for v in counts):
        return None
    return [v for v, _ in sorted(counts.items(), key=lambda pair: (-pair[1], pair[0]))]


def catalogue_terms(manifests: Sequence[str], columns: Optional[ColumnsConfig] = None, max_values: int = MAX_VALUES,
                    title_words: int = TITLE_WORDS, min_count: int = MIN_COUNT) -> Terms:
    """The vocabulary of the catalogue in ``manifests`` (module docstring); ``columns`` names the
    id, text and media columns (the checkpoint's ``data.columns``; default the usual names)."""
    columns = columns or ColumnsConfig()
    skipped = {columns.id, *columns.text, columns.image, columns.audio, columns.group, columns.negatives}
    cells: Dict[str, List[str]] = {}
    titles: List[str] = []
    title_column = next(iter(columns.text), None)
    for manifest in manifests:
        try:
            header, rows = read_table_rows(Path(manifest))
        except (OSError, ValueError) as error:
            raise RunError(f"{manifest}: cannot read the catalogue's words from it ({error})") from None
        for name in header:
            if name not in skipped:
                cells.setdefault(name, []).extend(_cell(row.get(name)) for _, row in rows)
        if title_column in header:
            titles.extend(_cell(row.get(title_column)) for _, row in rows)
    words: Dict[str, str] = {}  # lower-cased word -> field; the first field that has it keeps it
    for name, values in cells.items():
        for value in _attribute_values(values, len(values), max_values) or []:
            words.setdefault(value.lower(), name)
    frequency = Counter(word for title in titles for word in set(_WORD.findall(title.lower())))
    common = [w for w, n in sorted(frequency.items(), key=lambda pair: (-pair[1], pair[0]))
              if min_count <= n <= len(titles) / 2 and len(w) > 2 and w not in STOPWORDS and w not in words]
    for word in common[:title_words]:
        words[word] = TITLE_FIELD
    return Terms(list(words), list(words.values()))


def metadata_terms(metadata: Mapping[str, Mapping[str, str]], max_values: int = MAX_VALUES) -> Terms:
    """The vocabulary of an index's metadata (item id -> {field: value}): its attribute values."""
    cells: Dict[str, List[str]] = {}
    for values in metadata.values():
        for name, value in values.items():
            cells.setdefault(name, []).append(str(value).strip())
    words: Dict[str, str] = {}
    for name, values in cells.items():
        for value in _attribute_values(values, len(metadata), max_values) or []:
            words.setdefault(value.lower(), name)
    return Terms(list(words), list(words.values()))


EncodeText = Callable[[List[str]], torch.Tensor]  # words -> (V, D) unit rows from the text tower


@dataclass
class WordProbe:
    """Words embedded with the text tower, and their cosines' statistics over a catalogue sample.

    Attributes:
        terms: the words and their fields.
        vectors: (V, D) float32 unit word vectors.
        sample: (S,) catalogue rows the statistics are taken over.
        mean, std: (V,) float64 mean and standard deviation of the sample's cosines with each word.
        affinity: (S, V) float64 the sample items' word z-scores (``item_scores`` of the sample).
    """

    terms: Terms
    vectors: torch.Tensor
    sample: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    affinity: torch.Tensor

    @classmethod
    def build(cls, terms: Terms, encode_text: EncodeText, content: torch.Tensor, present: torch.Tensor,
              max_items: int = MAX_ITEMS, seed: int = 0, batch: int = 64) -> "WordProbe":
        """Embed ``terms`` with ``encode_text`` and measure them on the catalogue ``content`` (N, D)
        (rows with ``present`` True; a seeded sample of at most ``max_items`` of them)."""
        if not len(terms):
            raise RunError("the catalogue has no attribute column and no repeated title word to explain with")
        vectors = torch.cat([encode_text(terms.words[s:s + batch]) for s in range(0, len(terms), batch)]).float()
        rows = torch.nonzero(present.bool()).flatten()
        if len(rows) > max_items:
            chosen = np.sort(np.random.default_rng(seed).choice(len(rows), max_items, replace=False))
            rows = rows[torch.from_numpy(chosen)]
        cosines = F.normalize(content[rows].double(), dim=-1) @ vectors.double().T  # (S, V)
        mean, std = cosines.mean(0), cosines.std(0, unbiased=False).clamp_min(1e-12)
        return cls(terms, vectors, rows, mean, std, (cosines - mean) / std)

    def item_scores(self, content: torch.Tensor) -> torch.Tensor:
        """(k, V) float64 word z-scores of items with aligned vectors ``content`` (k, D)."""
        return (F.normalize(content.double(), dim=-1) @ self.vectors.double().T - self.mean) / self.std

    def preference(self, scores: torch.Tensor) -> torch.Tensor:
        """(Q, V) float64 correlation over the sample between each row of ``scores`` (Q, S), a
        query's or a user's scores of the sample's items, and each word's item z-scores."""
        scores = scores.double()
        centred = scores - scores.mean(1, keepdim=True)
        spread = centred.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-12)
        return (centred / spread) @ self.affinity / len(self.sample)

    def top(self, values: torch.Tensor, n: int, fields: Optional[Sequence[str]] = None) -> List[int]:
        """Indices of the ``n`` best words by ``values`` (V,), best first; only words of ``fields``
        when given."""
        order = torch.argsort(values.double(), descending=True, stable=True).tolist()
        if fields is not None:
            allowed = set(fields)
            order = [w for w in order if self.terms.fields[w] in allowed]
        return order[:n]


@torch.no_grad()
def user_preference(recommender: "Recommender", probe: WordProbe, histories: Sequence[Sequence[int]]) -> torch.Tensor:
    """(U, V) float64 word scores of users with ``histories`` (item rows, oldest first): the
    ``preference`` of their head scores of the probe's sample, minus the scores the head gives a
    user with no history (what everyone is shown is no one's taste)."""
    users = recommender.history_vectors([[]] + [list(h) for h in histories])  # (1 + U, dim)
    scores = users @ recommender.item_vectors[probe.sample].T  # (1 + U, S)
    return probe.preference(scores[1:] - scores[:1])
