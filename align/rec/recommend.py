"""Recommend with a trained head: ``align recommend --checkpoint R --user U`` (or ``--history``).

The item side is rebuilt from the item embeddings folder each time it is loaded, so items added
to the catalogue after training (``align embed --append``) are scored from their content, with
no retraining: an item the head never saw has no ID vector and is content only, as cold items
were during training (ID dropout). Scores come from an exact inner-product index over the item
vectors (ranked after the hub penalty when it is on); a user's own history is never recommended
back; the pool is re-ranked by the config's popularity penalty and MMR. A head with learned
fusion (``head.fusion: learned``) reads every modality's vectors of the folder, in the order its
``items.json`` records, and fuses them with its weights, new items included. ``--explain`` says
why for each item (align/explain): each history item's contribution, each modality's share of
the score and the catalogue words of the match.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from align.config import load_dataclass
from align.errors import ConfigError, RunError
from align.explain.history import LOO_MAX, METHODS
from align.explain.report import (RecommendationExplainer, attach_explanation, checkpoint_of, format_explanation,
                                  recommender_probe)
from align.index.index import ExactIndex
from align.index.search import QueryEncoder
from align.index.vectors import load_item_embeddings
from align.loading import read_json, read_tensors
from align.rec.config import RecConfig, validate_rec
from align.rec.data import item_features, stack_modalities
from align.rec.head import REFERENCE_USERS_FILE, RecHead
from align.rec.rerank import hub_weights, hubness, rerank


@dataclass
class Recommender:
    """A trained head with its item side built over the current catalogue."""

    head: RecHead
    config: RecConfig
    item_ids: List[str]  # current catalogue (the embeddings folder's rows)
    content: torch.Tensor  # (N, Dc) aligned vectors, unit rows (zero without the modality)
    features: torch.Tensor  # (N, F) what the item tower reads (content, and popularity if configured)
    present: torch.Tensor  # (N,) bool: the item has a vector to score
    id_rows: torch.Tensor  # (N,) ID-table row, -1 for items the head had no ID for
    item_vectors: torch.Tensor  # (N, dim) head item vectors
    log_counts: torch.Tensor  # (N,) log(1 + training count), 0 for new items
    hub: torch.Tensor  # (N,) the hub penalty's r(i): mean cosine to the nearest reference users; 0 when off
    items_folder: str = ""  # the `align embed` folder the item side was built from (explanations read it)

    @classmethod
    def load(cls, folder: str, items: Optional[str] = None, device: Optional[torch.device] = None) -> "Recommender":
        """The head saved in ``folder`` over the item vectors in ``items`` (default: the folder it
        was trained on). Reads safetensors, YAML and JSON only."""
        config = validate_rec(load_dataclass(RecConfig, os.path.join(folder, "rec_config.yaml")))
        meta = read_json(os.path.join(folder, "items.json"))
        state, _ = read_tensors(os.path.join(folder, "head.safetensors"))
        embeddings = load_item_embeddings(items or meta["items"])
        modality = config.head.modality
        if modality not in embeddings.vectors:
            raise RunError(f"{items or meta['items']}: no {modality!r} vectors; the head was trained on them")
        content = embeddings.vectors[modality].float()
        if content.shape[1] != meta["content_dim"]:
            raise RunError(f"{items or meta['items']}: vectors of dimension {content.shape[1]}, the head was trained "
                           f"on {meta['content_dim']}; embed with the same checkpoint")
        counts = dict(zip(meta["ids"], meta["train_counts"]))
        current = np.array([counts.get(i, 0) for i in embeddings.ids], dtype=np.int64)  # new items: 0
        present = embeddings.masks[modality].bool()
        modalities, vectors, masks = learned_inputs(config, meta, embeddings, items or meta["items"], folder)
        if masks is not None:
            present = masks.any(1)  # the learned fusion scores an item with any modality
        features = item_features(content, current, meta["popularity_scale"], config.head.popularity_feature,
                                 vectors, masks)
        head = RecHead(features.shape[1], len(meta["ids"]), config.head, modalities)
        try:
            head.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise RunError(f"{folder}/head.safetensors does not match its rec_config.yaml: {error}") from None
        head.eval()
        known = {item: row for row, (item, count) in enumerate(zip(meta["ids"], meta["train_counts"])) if count > 0}
        id_rows = torch.tensor([known.get(i, -1) for i in embeddings.ids], dtype=torch.long)
        log_counts = torch.log1p(torch.from_numpy(current).double()).float()
        with torch.no_grad():
            vectors = torch.cat([head.encode_items(features[s:s + 8192], id_rows[s:s + 8192])
                                 for s in range(0, len(features), 8192)])
        hub = torch.zeros(len(vectors))
        if config.rerank.hub_penalty > 0:
            path = os.path.join(folder, REFERENCE_USERS_FILE)
            if not os.path.isfile(path):
                raise RunError(f"{path}: missing; rerank.hub_penalty needs the training users' vectors that "
                               f"`align rec-train` saves: train the head again, or set rerank.hub_penalty=0")
            users, _ = read_tensors(path)
            if "users" not in users or users["users"].shape[-1] != vectors.shape[1]:
                raise RunError(f"{path}: expected a 'users' matrix of width {vectors.shape[1]}")
            hub = hubness(vectors, users["users"], config.rerank.hub_k)  # new items get theirs too
        return cls(head=head, config=config, item_ids=list(embeddings.ids), content=content, features=features,
                   present=present, id_rows=id_rows, item_vectors=vectors,
                   log_counts=log_counts, hub=hub, items_folder=items or meta["items"])

    def fusion_weights(self) -> Dict[str, float]:
        """Learned fusion: modality -> weight (summing to 1); given: empty."""
        return self.head.fusion_weights()

    def hub_weights(self, history_lengths: np.ndarray) -> torch.Tensor:
        """(U,) each user's weight on the hub penalty (``rerank.hub_weights``)."""
        rerank = self.config.rerank
        return hub_weights(torch.from_numpy(np.asarray(history_lengths)), rerank.hub_penalty, rerank.hub_half_history)

    @torch.no_grad()
    def user_vectors(self, histories: np.ndarray) -> torch.Tensor:
        """(U, L) item rows left-padded with -1 -> (U, dim) unit user vectors."""
        length = self.config.head.history
        hist = torch.from_numpy(histories[:, -length:]).long()
        if hist.shape[1] < length:
            hist = torch.cat([torch.full((hist.shape[0], length - hist.shape[1]), -1), hist], 1)
        mask = hist >= 0
        safe = hist.clamp(min=0)
        return self.head.encode_users(self.features[safe], torch.where(mask, self.id_rows[safe], -1), mask)

    def history_vectors(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        """(U, dim) unit user vectors of histories of item rows (oldest first, any length: the
        newest ``head.history`` are read; an empty one is the head's "anyone")."""
        return self.user_vectors(pad_histories(histories, self.config.head.history))

    def recommend(self, histories: Sequence[Sequence[int]], k: int, exclude_history: bool = True,
                  allowed: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (rows (U, k) int64, -1 pad; scores (U, k)) for each history of item rows."""
        histories = [list(h) for h in histories]
        users = self.history_vectors(histories)
        mask = self.present.numpy() if allowed is None else (self.present.numpy() & allowed)
        # With the hub penalty, cos(u, i) - w_u * r(i) is the inner product of [u, -w_u] and [i, r(i)]:
        # one more column, and the exact search ranks by the penalised score.
        weights = self.hub_weights(np.array([len(h) for h in histories]))  # (U,)
        items, queries = self.item_vectors, users
        if self.config.rerank.hub_penalty > 0:
            items = torch.cat([self.item_vectors, self.hub[:, None]], dim=1)  # (N, dim + 1)
            queries = torch.cat([users, -weights[:, None]], dim=1)  # (U, dim + 1)
        index = ExactIndex(items.numpy(), self.item_ids, allowed=mask)
        pool = max(k, self.config.rerank.pool)
        scores, rows = index.search(queries.numpy(), pool, exclude=histories if exclude_history else None)
        users = users.numpy()
        scores_t = torch.from_numpy(scores).float().masked_fill(torch.from_numpy(rows) < 0, -torch.inf)
        unit_content = torch.nn.functional.normalize(self.content, dim=1)
        chosen = rerank(scores_t, torch.from_numpy(rows), unit_content, k, self.config.rerank.mmr_lambda,
                        self.config.rerank.popularity_penalty, self.log_counts).numpy()
        picked = torch.from_numpy(chosen)
        chosen_scores = torch.einsum("ud,ukd->uk", torch.from_numpy(users), self.item_vectors[picked.clamp(min=0)])
        chosen_scores = chosen_scores.masked_fill(picked < 0, float("nan")).numpy()  # the head's cosine
        return chosen, chosen_scores

    def rows_of(self, ids: Sequence[str], where: str) -> List[int]:
        """Catalogue rows of item ids; an unknown id is a ``RunError`` naming it and ``where``."""
        row_of: Dict[str, int] = {item: row for row, item in enumerate(self.item_ids)}
        unknown = [i for i in ids if i not in row_of]
        if unknown:
            raise RunError(f"{where}: unknown item id(s) {', '.join(unknown[:5])}; they are not in the item "
                           "embeddings (run `align embed --append` on them)")
        return [row_of[i] for i in ids]


def pad_histories(histories: Sequence[Sequence[int]], length: int) -> np.ndarray:
    """(U, length) int64: each history's newest ``length`` item rows, left-padded with -1 (what
    ``Recommender.user_vectors`` reads)."""
    padded = np.full((len(histories), length), -1, dtype=np.int64)
    for row, items in enumerate(histories):
        items = list(items)[-length:]
        if items:
            padded[row, -len(items):] = items
    return padded


def learned_inputs(config: RecConfig, meta: Dict, embeddings, where: str, folder: str
                   ) -> Tuple[Tuple[str, ...], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(modalities, vectors (N, M, D), masks (N, M)) a learned-fusion head reads from ``embeddings``,
    in the order the head was trained with; ((), None, None) for a given-fusion head. A folder
    whose modalities are not the head's is a ``RunError`` naming both."""
    if config.head.fusion != "learned":
        return (), None, None
    order = tuple(meta.get("modalities") or ())
    if len(order) < 2:
        raise RunError(f"{folder}/items.json: no 'modalities' list for its head.fusion=learned head; train it again")
    if set(embeddings.modalities) != set(order):
        raise RunError(f"{where}: modalities {', '.join(embeddings.modalities)}; the head in {folder} fuses "
                       f"{', '.join(order)}: embed with the checkpoint the head was trained on")
    vectors, masks = stack_modalities(embeddings, torch.arange(len(embeddings.ids)), order)
    return order, vectors, masks


def user_history(recommender: Recommender, user: str) -> List[str]:
    """The user's items in time order from the head's interaction log (validated as in training)."""
    from align.rec.interactions import read_catalogue_ids, read_interactions

    data = recommender.config.data
    interactions, _ = read_interactions(data.interactions, read_catalogue_ids(data.catalogue, data.id_column),
                                        data.columns, data.max_bad_fraction)
    if user not in interactions.user_ids:
        raise RunError(f"{data.interactions}: no user {user!r}; give --history item1,item2,... for a new user")
    code = interactions.user_ids.index(user)
    rows = np.flatnonzero(interactions.users == code)
    rows = rows[np.lexsort((rows, interactions.times[rows]))]
    return [interactions.item_ids[i] for i in interactions.items[rows]]


DEFAULT_SHOWN = "title"
SHOWN_HISTORY = 5  # the history's last items printed above the table


def catalogue_cells(recommender: Recommender, show: Optional[str]) -> Dict[str, Dict[str, str]]:
    """{column: {item id: cell}} of the head's catalogue for the table's ``--show`` columns. The
    default (``title``) is shown where the manifests have it (and can be read: a history needs no
    catalogue); a column asked for by name that a manifest lacks, or a manifest that cannot be
    read, is a ``RunError`` naming the file."""
    from align.data.tables import as_text, read_columns

    asked = show is not None
    columns = [c.strip() for c in (DEFAULT_SHOWN if show is None else show).split(",") if c.strip()]
    data = recommender.config.data
    cells: Dict[str, Dict[str, str]] = {c: {} for c in columns}
    for manifest in data.catalogue if columns else []:
        try:
            table = read_columns(manifest, [data.id_column, *columns] if asked else [data.id_column],
                                 optional=() if asked else columns, hint="--show names catalogue columns")
        except RunError:
            if asked:
                raise
            continue
        ids = as_text(table[data.id_column]).tolist()
        for column in columns:
            if column in table:
                cells[column].update(zip(ids, as_text(table[column]).tolist()))
    return {c: v for c, v in cells.items() if v}


def format_items(rows: Sequence[Sequence[str]], cells: Dict[str, Dict[str, str]], right: int = 0,
                 header: Sequence[str] = ()) -> List[str]:
    """Aligned lines of ``rows`` (their last entry an item id) with the ``cells`` of each item
    beside them, under ``header`` (names of the rows' entries; the columns' names follow); the
    first ``right`` entries are right-aligned (ranks)."""
    table = [[*header, *cells]] if header else []
    table += [[*row, *(cells[c].get(row[-1], "") for c in cells)] for row in rows]
    widths = [max(len(row[c]) for row in table) for c in range(len(table[0]))] if table else []
    return ["  ".join(cell.rjust(w) if c < right else cell.ljust(w) for c, (cell, w) in enumerate(zip(row, widths)))
            .rstrip() for row in table]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align recommend", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="folder written by `align rec-train`")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="a user id of the interaction log")
    who.add_argument("--history", help="comma-separated item ids, oldest first (a new user)")
    parser.add_argument("--items", help="item embeddings folder (default: the one the head was trained on)")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--json", action="store_true",
                        help='print {"results": [{"id", "score"}, ...], "history": [...]} instead of a table, '
                             "the answer of align serve's POST /recommend")
    parser.add_argument("--explain", action="store_true",
                        help="say why: each history item's contribution, each modality's share of the score and "
                             "the catalogue words of the match (align/explain)")
    parser.add_argument("--explain-method", default="auto", choices=METHODS,
                        help="how history items are credited (auto: leave-one-out up to --loo-max items read)")
    parser.add_argument("--loo-max", type=int, default=LOO_MAX,
                        help=f"auto: leave-one-out up to this many items ({LOO_MAX})")
    parser.add_argument("--vocabulary", nargs="+", metavar="MANIFEST",
                        help="catalogue manifests whose words explain (default: the head's data.catalogue)")
    parser.add_argument("--show", metavar="COLUMNS",
                        help=f"catalogue columns printed beside each item, comma-separated (default: "
                             f"{DEFAULT_SHOWN}, where the catalogue has it; '' for none); not in --json")
    return parser


def explain(recommender: Recommender, history: List[str], picked: List[Tuple[str, float]],
            args: argparse.Namespace) -> Dict:
    """``--explain``: the explanation of ``picked`` for ``history`` (align/explain/report.py); the
    model's text tower embeds the catalogue's words."""

    probe = recommender_probe(recommender, QueryEncoder(checkpoint_of(recommender)), args.vocabulary)
    explainer = RecommendationExplainer(recommender, probe, args.explain_method, args.loo_max)
    return explainer.explain(history, [i for i, _ in picked], [s for _, s in picked])


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.k < 1:
        raise ConfigError(f"-k {args.k}: ask for at least one item")
    if args.loo_max < 0:
        raise ConfigError(f"--loo-max {args.loo_max}: must be >= 0")
    recommender = Recommender.load(args.checkpoint, args.items)
    if args.user is not None:
        history = user_history(recommender, args.user)
    else:
        history = [i.strip() for i in args.history.split(",") if i.strip()]
    rows, scores = recommender.recommend([recommender.rows_of(history, "--history" if args.user is None else
                                                              f"user {args.user}")], args.k)
    picked = [(recommender.item_ids[r], float(s)) for r, s in zip(rows[0], scores[0]) if r >= 0]
    why = explain(recommender, history, picked, args) if args.explain else None
    if args.json:
        answer = {"results": [{"id": i, "score": s} for i, s in picked], "history": history}  # as POST /recommend
        if why is not None:
            attach_explanation(answer, answer["results"], why)
        print(json.dumps(answer))
    else:
        rerank = recommender.config.rerank
        cells = catalogue_cells(recommender, args.show)
        shown = history[-SHOWN_HISTORY:]
        print(f"history: {len(history)} item{'s' if len(history) != 1 else ''}"
              + (f", the last {len(shown)}:" if len(shown) < len(history) else ":"))
        for line in format_items([("  ", item) for item in shown], cells):
            print(line)
        print(f"\nranked after hub_penalty={rerank.hub_penalty:g}, popularity_penalty={rerank.popularity_penalty:g}, "
              f"mmr_lambda={rerank.mmr_lambda:g}:")
        rows = [(str(rank), f"{score:.4f}", item) for rank, (item, score) in enumerate(picked, 1)]
        for line in format_items(rows, cells, right=1, header=("rank", "cosine", "item")):
            print(line)
        if why is not None:
            print(f"\nwhy (from a history of {len(history)} items):")
            print(format_explanation(why))
    return 0
