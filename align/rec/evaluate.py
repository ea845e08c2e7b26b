"""``align rec-eval``: the head and its peers on one split, per segment, with the MMR trade-off.

Protocol (say it beside any figure):
  * split: global temporal (train before the cut-off, test after) or leave-last-out, from the
    head's config; with ``--events NEWER_LOG``, the head's log and the newer one merged and cut
    at the head's own cut-off (rows before it train; from it on, the head's held-out rows if any
    and the new events test);
  * a user's relevant items are the distinct items of their test interactions that they did not
    already touch in training; their training items are never recommended;
  * segments:
      all         every test user, every item a candidate;
      warm        relevant = test items that had training interactions, candidates = those items;
      cold_items  relevant = test items without training interactions, candidates = those items
                  (ranking the new arrivals for each user: a peer that cannot score them gets 0);
      cold_users  users with at most ``data.cold_user_max`` training interactions, every item;
  * ranking metrics from ``metrics.py`` (NDCG@K with the ideal DCG over min(|R_u|, K)); coverage,
    tail share, Gini, ILD and novelty on the top-K lists, ILD on the aligned item vectors.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from align.errors import ConfigError, RunError, check_json_output, write_json_atomic
from align.eval.plots import save_figure
from align.loading import read_json
from align.rec.baselines import PEERS, UNSCORABLE, FitData, build_peer
from align.rec.config import RecConfig
from align.rec.data import RecData, last_items, load_rec_data, seen_items
from align.rec.metrics import beyond_accuracy, ranking_metrics
from align.rec.recommend import Recommender
from align.rec.rerank import rerank

log = logging.getLogger("align.rec")
SEGMENTS = ("all", "warm", "cold_items", "cold_users")


class HeadMethod:
    """Our head as an evaluated method: user vectors from the training history, item vectors
    over the catalogue (cold items from content alone)."""

    name = "ours"

    def __init__(self, recommender: Recommender, data: RecData) -> None:
        rows = recommender.rows_of(data.item_ids, "the catalogue")  # catalogue code -> recommender row
        self.item_vectors = recommender.item_vectors[rows]  # (N, dim)
        self.recommender = recommender
        # the recommender's rows are its embeddings folder's; evaluation speaks catalogue codes
        self.to_recommender = np.asarray(rows)
        self.histories = last_items(data.split.train, recommender.config.head.history)  # catalogue codes
        self.lengths = np.bincount(data.split.train.users, minlength=len(data.split.train.user_ids))  # (U,)
        self.hub = recommender.hub[rows]  # (N,)
        # items without the head's vectors, which ``Recommender.recommend`` never returns
        self.absent = ~recommender.present.numpy()[rows]  # (N,)

    def scores(self, users: np.ndarray) -> np.ndarray:
        """(u, N) what ``Recommender.recommend`` ranks by: cosine minus the user's hub penalty."""
        hist = self.histories[users]
        hist = np.where(hist >= 0, self.to_recommender[np.clip(hist, 0, None)], -1)
        scores = self.recommender.user_vectors(hist) @ self.item_vectors.T  # (u, N)
        if self.recommender.config.rerank.hub_penalty > 0:
            # in place, a rank-one update: no second (u, N) matrix for the penalty
            scores.addr_(self.recommender.hub_weights(self.lengths[users]), self.hub, alpha=-1.0)
        scores = scores.numpy()
        scores[:, self.absent] = UNSCORABLE
        return scores


def top_lists(method, segments: Dict[str, Dict[str, Any]], seen: List[np.ndarray], k: int,
              chunk: int) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Per segment, (scores (U, k), rows (U, k)) of each of its users' best candidates, training
    items left out; -1 where the method had nothing it could score. A user is scored once,
    whatever the number of segments they are in (each segment's users are sorted and among "all")."""
    users = segments["all"]["users"]
    place = {name: np.searchsorted(users, segment["users"]) for name, segment in segments.items()}
    out = {name: (np.full((len(segment["users"]), k), -np.inf, dtype=np.float32),
                  np.full((len(segment["users"]), k), -1, dtype=np.int64)) for name, segment in segments.items()}
    for start in range(0, len(users), chunk):
        block = users[start:start + chunk]
        scores = np.asarray(method.scores(block), dtype=np.float32)  # (u, N)
        for row, user in enumerate(block):
            scores[row, seen[user]] = UNSCORABLE
        for name, segment in segments.items():
            inside = (place[name] >= start) & (place[name] < start + len(block))  # its users in this block
            if not inside.any():
                continue
            mine = scores[place[name][inside] - start]  # (u_s, N), a copy
            mine[:, ~segment["candidates"]] = UNSCORABLE
            values, rows = torch.from_numpy(mine).topk(min(k, mine.shape[1]), dim=1)
            rows = torch.where(torch.isinf(values), -1, rows)
            out[name][0][inside, :values.shape[1]] = values.numpy()
            out[name][1][inside, :rows.shape[1]] = rows.numpy()
    return out


def segment_users(data: RecData, seen: List[np.ndarray]) -> Dict[str, Dict[str, Any]]:
    """Per segment: its users, their relevant items and the candidate mask."""
    test = data.split.test
    n_items = len(data.item_ids)
    cold_items = data.split.cold_items
    relevant_all: Dict[int, np.ndarray] = {}
    order = np.lexsort((test.items, test.users))
    users, items = test.users[order], test.items[order]
    for user in np.unique(users):
        mine = np.unique(items[np.searchsorted(users, user):np.searchsorted(users, user, side="right")])
        relevant_all[int(user)] = np.setdiff1d(mine, seen[user])
    everyone = np.array(sorted(u for u, r in relevant_all.items() if len(r)), dtype=np.int64)
    segments = {}
    for name in SEGMENTS:
        candidates = np.ones(n_items, dtype=bool)
        if name == "warm":
            candidates = ~cold_items
        elif name == "cold_items":
            candidates = cold_items.copy()
        chosen = everyone if name != "cold_users" else everyone[data.split.cold_users[everyone]]
        relevant = [relevant_all[int(u)][candidates[relevant_all[int(u)]]] for u in chosen]
        keep = np.array([len(r) > 0 for r in relevant], dtype=bool)
        segments[name] = {"users": chosen[keep], "relevant": [r for r, k in zip(relevant, keep) if k],
                          "candidates": candidates}
    return segments


def evaluate_methods(methods: Sequence[Any], data: RecData, config: RecConfig, head: Optional[HeadMethod] = None,
                     ) -> Dict[str, Any]:
    """Every method on every segment; with ``head`` also the MMR sweep of the head on ``all``."""
    ks = sorted(config.eval.ks)
    k_max, pool = max(ks), max(config.rerank.pool, max(ks))
    seen = seen_items(data.split.train)
    segments = segment_users(data, seen)
    content = torch.nn.functional.normalize(data.content.float(), dim=1)
    counts = data.train_counts
    log_counts = torch.log1p(torch.from_numpy(counts).double()).float()
    results: Dict[str, Dict[str, Dict[str, float]]] = {s: {} for s in SEGMENTS}
    curves: Dict[str, List[float]] = {}
    sweep: List[Dict[str, float]] = []
    for method in methods:
        tops = top_lists(method, segments, seen, pool, config.eval.batch_size)
        for name, segment in segments.items():
            if not len(segment["users"]):
                continue
            scores, rows = tops[name]
            if method is head:
                lists = rerank(torch.from_numpy(scores), torch.from_numpy(rows), content, k_max,
                               config.rerank.mmr_lambda, config.rerank.popularity_penalty, log_counts).numpy()
            else:
                lists = rows[:, :k_max]
            results[name][method.name] = figures(lists, segment["relevant"], ks, counts, content.numpy())
            if name == "all":
                curve = ranking_metrics(lists, segment["relevant"], list(range(1, k_max + 1)))
                curves[method.name] = [curve[f"recall@{k}"] for k in range(1, k_max + 1)]
                if method is head:
                    for lam in config.eval.mmr_sweep:
                        picked = rerank(torch.from_numpy(scores), torch.from_numpy(rows), content, k_max, lam,
                                        config.rerank.popularity_penalty, log_counts).numpy()
                        point = figures(picked, segment["relevant"], ks, counts, content.numpy())
                        sweep.append({"mmr_lambda": lam, **{k: point[k] for k in point
                                                             if k.startswith(("ndcg@", "ild@", "recall@"))}})
    counts_out = {name: int(len(s["users"])) for name, s in segments.items()}
    return {"segments": results, "users": counts_out, "recall_curves": curves, "mmr_sweep": sweep, "ks": ks}


def shown_k(ks: Sequence[int]) -> int:
    """The cut-off the table and the plots show: 10 where it was measured, else the largest."""
    return 10 if 10 in ks else max(ks)


def figures(lists: np.ndarray, relevant: List[np.ndarray], ks: Sequence[int], counts: np.ndarray,
            content: np.ndarray) -> Dict[str, float]:
    """Ranking metrics at every K and beyond-accuracy ones at every K, one flat dict."""
    out = dict(ranking_metrics(lists, relevant, ks))
    for k in ks:
        out.update(beyond_accuracy(lists, len(counts), k, counts, content))
    return out


def format_report(report: Dict[str, Any], k: Optional[int] = None) -> str:
    """A table per segment: NDCG, Recall, HitRate at k, coverage and ILD at k, per method (k:
    ``shown_k`` of the report's cut-offs by default)."""
    k = shown_k(report["ks"]) if k is None else k
    lines = []
    for segment, methods in report["segments"].items():
        if not methods:
            continue
        lines.append(f"{segment} ({report['users'][segment]} users)")
        lines.append(f"  {'method':<16}{'NDCG@' + str(k):>10}{'Recall@' + str(k):>11}{'Hit@' + str(k):>9}"
                     f"{'MRR':>8}{'Cov@' + str(k):>9}{'ILD@' + str(k):>9}{'Tail@' + str(k):>9}")
        for name, m in methods.items():
            lines.append(f"  {name:<16}{m[f'ndcg@{k}']:>10.4f}{m[f'recall@{k}']:>11.4f}{m[f'hit@{k}']:>9.4f}"
                         f"{m['mrr']:>8.4f}{m[f'coverage@{k}']:>9.4f}{m[f'ild@{k}']:>9.4f}{m[f'tail@{k}']:>9.4f}")
    return "\n".join(lines)


def plot_report(report: Dict[str, Any], folder: str, k: Optional[int] = None) -> List[str]:
    """``rec_mmr.png`` (NDCG@k against ILD@k over the MMR sweep; k as in ``format_report``) and
    ``rec_recall.png`` (Recall@K curves per method). Returns the paths written."""
    import matplotlib

    k = shown_k(report["ks"]) if k is None else k
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    written = []
    if report["mmr_sweep"]:
        fig, ax = plt.subplots(figsize=(5, 4))
        xs = [p[f"ild@{k}"] for p in report["mmr_sweep"]]
        ys = [p[f"ndcg@{k}"] for p in report["mmr_sweep"]]
        ax.plot(xs, ys, "o-")
        for p, x, y in zip(report["mmr_sweep"], xs, ys):
            ax.annotate(f"λ={p['mmr_lambda']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(f"ILD@{k}")
        ax.set_ylabel(f"NDCG@{k}")
        ax.set_title("MMR re-ranking: relevance against diversity")
        written.append(save_figure(fig, os.path.join(folder, "rec_mmr.png")))
    if report["recall_curves"]:
        fig, ax = plt.subplots(figsize=(5, 4))
        for name, curve in report["recall_curves"].items():
            ax.plot(range(1, len(curve) + 1), curve, label=name)
        ax.set_xlabel("K")
        ax.set_ylabel("Recall@K (all test users)")
        ax.legend(fontsize=7)
        written.append(save_figure(fig, os.path.join(folder, "rec_recall.png")))
    return written


def evaluate_head(checkpoint: str, peers: Optional[List[str]] = None, output: Optional[str] = None,
                  plots: bool = True, events: Optional[str] = None) -> Dict[str, Any]:
    """Load the head in ``checkpoint``, rebuild its split, evaluate it and the peers; write JSON
    (and the PNGs) next to it.

    With ``events`` (a log newer than the head, in its columns), the test rows are the events at
    or after the head's cut-off, and the head's log with the earlier ones is what the head and
    the peers know: how a served head (``data.split: none``) or an updated one does on what
    came next."""
    recommender = Recommender.load(checkpoint)
    config = recommender.config
    if events is None and config.data.split == "none":
        raise RunError(f"{checkpoint}: trained with data.split=none, on every row of its log: nothing is held out to "
                       "evaluate on; evaluate it on newer events (--events FILE) or evaluate a head trained with "
                       "data.split=temporal or leave_last_out")
    if events is None:
        data = load_rec_data(config)
    else:
        data = load_rec_data(config, events, read_json(os.path.join(checkpoint, "items.json")).get("cutoff"))
    head = HeadMethod(recommender, data)
    fit = FitData(train=data.split.train, content=torch.nn.functional.normalize(data.content, dim=1).numpy(),
                  seen=seen_items(data.split.train))
    methods: List[Any] = [head]
    fit_seconds = {}
    for name in (config.eval.peers if peers is None else peers):
        started = time.perf_counter()
        try:
            methods.append(build_peer(name).fit(fit))
        except ImportError as error:
            raise RunError(f"eval.peers: {name} needs a package that is not installed ({error}); "
                           "pip install 'align[peers]'") from None
        fit_seconds[name] = time.perf_counter() - started
    report = evaluate_methods(methods, data, config, head)
    report.update(split=config.data.split, cutoff=data.split.cutoff,
                  events=os.path.abspath(events) if events else None, checkpoint=os.path.abspath(checkpoint),
                  fit_seconds=fit_seconds, mmr_lambda=config.rerank.mmr_lambda,
                  popularity_penalty=config.rerank.popularity_penalty, hub_penalty=config.rerank.hub_penalty,
                  counts={"train": len(data.split.train), "test": len(data.split.test),
                          "items": len(data.item_ids), "cold_items": int(data.split.cold_items.sum()),
                          "cold_users": int(data.split.cold_users.sum()), "bad_rows": dict(data.bad.counts)})
    path = output or config.eval.output or os.path.join(checkpoint, "rec_eval.json")
    write_json_atomic(report, path)
    if plots:
        report["plots"] = plot_report(report, os.path.dirname(os.path.abspath(path)))
    return report


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align rec-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="folder written by `align rec-train`")
    parser.add_argument("--peers", help="comma-separated baselines (default: the config's eval.peers); "
                                        "e.g. most_pop,content_knn,cornac_bpr,implicit_als")
    parser.add_argument("--events", help="a log newer than the head, in its columns: evaluate on its events at or "
                                         "after the head's cut-off (a head trained with data.split=none, or updated)")
    parser.add_argument("--output", help="JSON path (default: <checkpoint>/rec_eval.json)")
    parser.add_argument("--no-plots", action="store_true")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    peers = [p.strip() for p in args.peers.split(",") if p.strip()] if args.peers is not None else None
    check_json_output(args.output, "rec_eval.json")
    unknown = [p for p in peers or () if p not in PEERS]
    if unknown:  # before the head and the log are read
        raise ConfigError(f"--peers: unknown recommender {unknown[0]!r}; known: {', '.join(PEERS)}")
    if args.events is not None and not os.path.isfile(args.events):
        raise ConfigError(f"--events: {args.events} is not a file")
    report = evaluate_head(args.checkpoint, peers, args.output, plots=not args.no_plots, events=args.events)
    print(format_report(report))
    print(f"-> {args.output or os.path.join(args.checkpoint, 'rec_eval.json')}")
    return 0
