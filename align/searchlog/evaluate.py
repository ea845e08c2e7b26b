"""``align search-eval``: judge a trained model zero-shot on a search log's evaluation splits with
graded metrics (nDCG, ERR, RBP, MRR, Recall; align/searchlog/metrics.py)::

    align search-eval --checkpoint runs/demo --catalogue data/demo/train.csv data/demo/test.csv \\
        --log-dir data/demo/search [--splits eval_in_domain,eval_novel_queries] [--dims 16,32,64] \\
        [--judged-by log|truth] [--max-grade 3] [--k 10] [--depth 100] [--device cpu] \
        [--output runs/demo/search_eval.json]

``--log-dir`` is a folder as ``align prep search-log simulate`` writes it (align/searchlog/simulate.py):
one CSV per split and ``stats.json``, which says per split which products it ranks
(``candidates``: "seen" = the catalogue less ``held_out_items``, "held_out" = those items).

Judgements (``--judged-by``): ``log`` (default) scores against the split's log file, a pair's grade
its deepest event; ``truth`` against ``<split>.truth.csv``, the simulator's complete
judgements of the same queries (every candidate that fits a query, graded by match level 1..3;
align/searchlog/simulate.py). A log judges only the products its pages showed, a few of the many
that fit a broad query, so its figures credit a model for ranking the shown ones first; the
complete judgements credit it for ranking the fitting ones first, which is what a shop wants.

For every split: each distinct query (text, photo = ``image``, voice = ``audio``) is encoded by its
modality's tower exactly as ``align search`` encodes an upload (``QueryEncoder``); every catalogue
item is embedded and fused exactly as ``align embed`` does (``embed_manifests``, same batch size);
the split's candidates are ranked for each query by cosine (``rank_by_similarity``, ``--depth``
deep) and scored against the split's graded judgements (``read_search_log``: a pair's grade is its
deepest event, view 1 / cart 2 / buy 3). Reported per split for all its queries and per query
modality, at the full dimension and, with ``--dims``, at each prefix of both sides renormalised to
unit length (Matryoshka, Kusupati et al. 2022, https://arxiv.org/abs/2205.13147).

Vectors are encoded per split and modality, queries in order of first appearance in the split
file, ``--batch-size`` per forward, so the figures can be recomputed bit for bit from the same
vectors.

Output: JSON ``{"splits": {split: {"all" | modality: {"full" | "<dim>": graded_report}}}, ...}``
(NaN written as null), a table on stdout, and ``search_eval_ndcg.png`` beside the JSON (nDCG@k
against the dimension, a line per split) when matplotlib is installed.
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from align.errors import MODALITIES, ConfigError, RunError, check_json_output, write_json_atomic
from align.loading import read_json
from align.model import prefix
from align.searchlog.log import EventGrades, SearchLog, read_search_log
from align.searchlog.metrics import GradedRelevance, graded_report, rank_by_similarity
from align.searchlog.simulate import CANDIDATES, TRUTH_SUFFIX

EVAL_SPLITS = tuple(CANDIDATES)  # the simulator's evaluation splits, in its order
JUDGED_BY = ("log", "truth")
STATS_FILE = "stats.json"
PLOT_FILE = "search_eval_ndcg.png"
FULL = "full"
ALL = "all"


@dataclass
class SplitData:
    """One split read against the catalogue: its judgements and the catalogue rows it ranks.

    Attributes:
        name, path: the split and its CSV.
        log: the judgements (item codes are catalogue rows).
        candidates: (C,) int64 catalogue rows of the products this split ranks, ascending.
    """

    name: str
    path: str
    log: SearchLog
    candidates: np.ndarray


def _parse_dims(text: Optional[str]) -> List[int]:
    if not text:
        return []
    try:
        dims = [int(piece) for piece in text.split(",") if piece.strip()]
    except ValueError:
        raise ConfigError(f"--dims {text!r}: give comma-separated whole numbers, e.g. --dims 16,32,64") from None
    if any(d < 1 for d in dims) or len(set(dims)) != len(dims):
        raise ConfigError(f"--dims {text!r}: each dimension must be >= 1 and given once")
    return sorted(dims)


def _parse_splits(text: Optional[str]) -> List[str]:
    splits = [s.strip() for s in (text or ",".join(EVAL_SPLITS)).split(",") if s.strip()]
    unknown = [s for s in splits if s not in CANDIDATES]
    if unknown or not splits:
        raise ConfigError(f"--splits {text!r}: {unknown or 'none given'}; choose from {', '.join(EVAL_SPLITS)}")
    return splits


def candidate_rows(stats: Dict[str, Any], split: str, item_ids: Sequence[str], stats_path: str) -> np.ndarray:
    """(C,) int64 catalogue rows of ``split``'s candidates by ``stats.json``: the held-out items, or
    the rest ("seen"). A held-out id outside the catalogue is a ``ConfigError`` naming the file."""
    try:
        side = stats["splits"][split]["candidates"]
        held_out = [str(i) for i in stats["held_out_items"]]
    except (KeyError, TypeError):
        raise ConfigError(f"{stats_path}: no splits.{split}.candidates or held_out_items; is it a "
                          f"`align prep search-log simulate` stats.json?") from None
    if side not in ("seen", "held_out"):
        raise ConfigError(f"{stats_path}: splits.{split}.candidates is {side!r}; expected 'seen' or 'held_out'")
    row_of = {item: row for row, item in enumerate(item_ids)}
    missing = [i for i in held_out if i not in row_of]
    if missing:
        raise ConfigError(f"{stats_path}: held-out item {missing[0]!r} ({len(missing)} in all) is not in the "
                          f"catalogue; give --catalogue the manifests the log was simulated over")
    is_held = np.zeros(len(item_ids), dtype=bool)
    is_held[[row_of[i] for i in held_out]] = True
    return np.flatnonzero(is_held if side == "held_out" else ~is_held).astype(np.int64)


def read_judgements(path: str, item_ids: Sequence[str], events: EventGrades, catalogue: str,
                    media_root: Optional[str] = None, max_bad_fraction: float = 0.01) -> SearchLog:
    """A judged log read against the catalogue: a row naming an item outside it is a
    ``ConfigError`` naming the file and ``catalogue`` (the flag or key that gave it); more than
    ``max_bad_fraction`` other broken rows a ``RunError`` with the counts and examples."""
    log, report = read_search_log(path, item_ids, events, media_root=media_root, max_bad_fraction=1.0)
    if report.counts.get("unknown_item"):
        example = (report.examples.get("unknown_item") or [""])[0]
        raise ConfigError(f"{path}: {report.counts['unknown_item']} rows name items not in {catalogue} "
                          f"(e.g. {example}); give the manifests the log was made over")
    report.check(max_bad_fraction)
    return log


def read_split(log_dir: str, split: str, stats: Dict[str, Any], item_ids: Sequence[str],
               judged_by: str = "log") -> SplitData:
    """The split's judgements against the catalogue (``judged_by``: its log file, or the complete
    judgements in ``<split>.truth.csv``); an unknown item, or a judged item outside the split's
    candidates, is a ``ConfigError`` naming the file and row."""
    if judged_by not in JUDGED_BY:
        raise ConfigError(f"--judged-by {judged_by!r}: choose from {', '.join(JUDGED_BY)}")
    name = f"{split}.csv" if judged_by == "log" else f"{split}{TRUTH_SUFFIX}"
    path = os.path.join(log_dir, name)
    if not os.path.isfile(path):
        raise ConfigError(f"--log-dir {log_dir}: no {name} (write the folder with `align prep search-log "
                          f"simulate`, or leave the split out of --splits)")
    log = read_judgements(path, item_ids, EventGrades(), "--catalogue")
    candidates = candidate_rows(stats, split, item_ids, os.path.join(log_dir, STATS_FILE))
    outside = np.setdiff1d(log.items, candidates)
    if outside.size:
        raise ConfigError(f"{path}: judges item {item_ids[int(outside[0])]!r}, which is not among the split's "
                          f"{stats['splits'][split]['candidates']} candidates in {STATS_FILE}")
    return SplitData(split, path, log, candidates)


def encode_queries(encoder: Any, split: SplitData, batch_size: int) -> torch.Tensor:
    """(Q, D) float32 unit rows, one per query of ``split`` in log order; each modality's queries
    in order, ``batch_size`` per forward. A modality without a tower is a ``ConfigError``."""
    queries = split.log.queries
    vectors = torch.zeros(len(queries), encoder.dim)  # (Q, D)
    for modality in MODALITIES:
        rows = [n for n, q in enumerate(queries) if q.modality == modality]
        if not rows:
            continue
        if modality not in encoder.modalities:
            raise ConfigError(f"{split.path}: {len(rows)} {modality} queries, but the model ({encoder.checkpoint}) "
                              f"has no {modality} tower; judge them with a model that has one, or leave this "
                              f"split out (search-eval --splits, data.search_log.val)")
        values = [queries[n].text if modality == "text" else queries[n].path for n in rows]
        for start in range(0, len(rows), batch_size):
            chunk = values[start:start + batch_size]
            vectors[rows[start:start + batch_size]] = encoder.encode(modality, chunk)
    return vectors


def relevance_of(split: SplitData) -> GradedRelevance:
    """The split's judgements with items renumbered as positions in ``split.candidates``."""
    position = np.full(int(split.candidates.max(initial=-1)) + 2, -1, dtype=np.int64)
    position[split.candidates] = np.arange(len(split.candidates))
    return GradedRelevance.from_triples(split.log.query_codes, position[split.log.items], split.log.grades,
                                        len(split.log.queries))


def score_split(queries: torch.Tensor, items: torch.Tensor, relevance: GradedRelevance, modalities: Sequence[str],
                dims: Sequence[Optional[int]], max_grade: float, k: int, depth: int) -> Dict[str, Dict[str, Dict]]:
    """{"all" | modality: {"full" | "<dim>": graded_report}} for queries (Q, D) against candidate
    items (C, D); ``modalities`` (Q,) names each query's modality."""
    groups = {ALL: np.arange(len(modalities))}
    names = np.asarray(modalities, dtype=object)
    groups.update({m: np.flatnonzero(names == m) for m in MODALITIES if (names == m).any()})
    out: Dict[str, Dict[str, Dict]] = {group: {} for group in groups}
    for dim in dims:
        lists = rank_by_similarity(prefix(queries, dim), prefix(items, dim), depth)  # (Q, depth)
        for group, rows in groups.items():
            picked = relevance if group == ALL else relevance.select(rows)
            out[group][FULL if dim is None else str(dim)] = graded_report(
                lists[torch.as_tensor(rows, dtype=torch.long)], picked, max_grade=max_grade, k=k)
    return out


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value


def format_table(results: Dict[str, Dict[str, Dict[str, Dict]]], k: int) -> str:
    """One line per split, group and dimension: queries, nDCG@k, ERR@k, MRR, Recall@k."""
    rows = [["split", "modality", "dim", "n", f"ndcg@{k}", f"err@{k}", "mrr", f"recall@{k}"]]
    for split, groups in results.items():
        for group, by_dim in groups.items():
            for dim, report in by_dim.items():
                rows.append([split, group, dim, str(report["n_queries"]),
                             *(f"{report[m]:.4f}" for m in (f"ndcg@{k}", f"err@{k}", "mrr", f"recall@{k}"))])
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def plot_ndcg_by_dim(results: Dict[str, Dict[str, Dict[str, Dict]]], k: int, dims: Sequence[int], full_dim: int,
                     path: str) -> Optional[str]:
    """nDCG@k (all queries) against the dimension, one line per split; None without matplotlib."""
    from align.eval.plots import matplotlib_pyplot, save_figure

    plt = matplotlib_pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4))
    xs = [*dims, full_dim] if full_dim not in dims else list(dims)
    for split, groups in results.items():
        by_dim = groups[ALL]
        ys = [by_dim[str(d)][f"ndcg@{k}"] for d in dims if d != full_dim] + [by_dim[FULL][f"ndcg@{k}"]]
        ax.plot(xs, ys, marker="o", markersize=3, label=split)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("embedding dimension (prefix, renormalised)")
    ax.set_ylabel(f"nDCG@{k} (graded, all queries)")
    ax.set_ylim(0, 1.02)
    ax.set_title("Search-log evaluation by dimension")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align search-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint, its model/ folder or a run folder")
    parser.add_argument("--catalogue", required=True, nargs="+", help="the catalogue manifest(s) the log names")
    parser.add_argument("--log-dir", required=True, help="split CSVs + stats.json (align prep search-log simulate)")
    parser.add_argument("--splits", help=f"comma-separated (default: {','.join(EVAL_SPLITS)})")
    parser.add_argument("--dims", help="also evaluate these prefix dimensions, e.g. 16,32,64 (Matryoshka)")
    parser.add_argument("--judged-by", default="log", choices=JUDGED_BY,
                        help="score against the split's log (log), or the simulator's complete judgements (truth)")
    parser.add_argument("--max-grade", type=float, default=3.0, help="top of the grading scale (3: buy)")
    parser.add_argument("--k", type=int, default=10, help="cut-off of nDCG, ERR and Recall (10)")
    parser.add_argument("--depth", type=int, default=100, help="ranked list length for MRR and RBP (100)")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per forward (64)")
    parser.add_argument("--id-column", default="id", help="item id column of the catalogue (id)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--fields-from", help="embed the catalogue with this run config's model.fields (e.g. to "
                        "judge an untuned model with the multi-field products a fine-tune uses)")
    parser.add_argument("--output", help="JSON path (default: <checkpoint>/search_eval.json)")
    return parser


def _check_arguments(args: argparse.Namespace) -> None:
    if not os.path.isdir(args.checkpoint):
        raise ConfigError(f"--checkpoint {args.checkpoint}: no such folder")
    if not os.path.isdir(args.log_dir):
        raise ConfigError(f"--log-dir {args.log_dir}: no such folder")
    if not os.path.isfile(os.path.join(args.log_dir, STATS_FILE)):
        raise ConfigError(f"--log-dir {args.log_dir}: no {STATS_FILE} (an unfinished simulation writes it last; "
                          f"run `align prep search-log simulate` again)")
    if not (math.isfinite(args.max_grade) and args.max_grade > 0):
        raise ConfigError(f"--max-grade {args.max_grade}: must be a number > 0 (the top grade, 3 for buy)")
    if args.k < 1 or args.depth < args.k:
        raise ConfigError(f"--k {args.k} / --depth {args.depth}: need 1 <= k <= depth")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: must be >= 1")
    check_json_output(args.output, "search_eval.json")


def judge(checkpoint: str, catalogue: Sequence[str], log_dir: str, splits: Sequence[str], dims: Sequence[int],
          batch_size: int = 256, device: Optional[str] = None, max_grade: float = 3.0, k: int = 10, depth: int = 100,
          id_column: str = "id", fields: Optional[Dict[str, Any]] = None,
          judged_by: Sequence[str] = ("log",)) -> Tuple[Dict[str, Any], int, Dict[str, int]]:
    """(results, full dim, candidates per split) of a checkpoint on a search log's splits (module
    doc). results: {split: {"all" | modality: {"full" | "<dim>": graded_report}}} for one entry of
    ``judged_by``; with several, {judged_by: that} (the model and the vectors are shared).
    ``fields``: product fields to embed the catalogue with instead of the checkpoint's own
    (``model.fields``; None = the checkpoint's)."""
    from align.index.embed import embed_manifests
    from align.index.search import QueryEncoder
    from align.rec.interactions import read_catalogue_ids

    stats = read_json(os.path.join(log_dir, STATS_FILE))
    item_ids = read_catalogue_ids(catalogue, id_column)
    judged = {how: [read_split(log_dir, split, stats, item_ids, how) for split in splits]
              for how in judged_by}  # all checked first
    data = judged[judged_by[0]]
    for d in (d for splits_data in judged.values() for d in splits_data):  # before the model is loaded
        top = float(d.log.grades.max()) if len(d.log.grades) else 0.0
        if top > max_grade:
            raise ConfigError(f"--max-grade {max_grade:g}: {d.path} grades up to {top:g}; give the top of its "
                              f"grading scale (--max-grade {top:g})")

    encoder = QueryEncoder(checkpoint, device)
    full_dim = encoder.dim
    if dims and dims[-1] > full_dim:
        raise ConfigError(f"--dims {list(dims)}: the model embeds into {full_dim}; give dimensions <= {full_dim}")
    query_vectors = {d.name: encode_queries(encoder, d, batch_size) for d in data}
    for how, other in judged.items():  # both judge the same queries, so one encoding serves all
        for d, o in zip(data, other):
            if o.log.queries != d.log.queries:
                raise ConfigError(f"{o.path}: its queries are not those of {d.path} in the same order; "
                                  f"simulate the folder again")
    # The queries' model embeds the catalogue too: loaded once, and the vectors are those of a fresh load.
    items = embed_manifests(checkpoint, catalogue, batch_size, encoder.device, progress=False, fields=fields,
                            model=encoder.model)
    del encoder  # the model is not needed for scoring
    if items.ids != item_ids:
        raise RunError(f"the checkpoint's data.columns read other item ids from {list(catalogue)} than "
                       f"--id-column {id_column!r}; give the id column the checkpoint was trained with")

    steps: List[Optional[int]] = [d for d in dims if d != full_dim] + [None]
    results: Dict[str, Any] = {}
    for how, splits_data in judged.items():
        results[how] = {}
        for d in splits_data:
            candidates = items.vectors["fused"][torch.as_tensor(d.candidates)]  # (C, D)
            results[how][d.name] = score_split(query_vectors[d.name], candidates, relevance_of(d),
                                               [q.modality for q in d.log.queries], steps, max_grade, k, depth)
    if len(judged) == 1:
        results = results[judged_by[0]]
    return results, full_dim, {d.name: int(len(d.candidates)) for d in data}


def validate_on_log(model: Any, config: Any, device: torch.device, depth: int = 100) -> Dict[str, Dict[str, float]]:
    """The trainer's validation on ``data.search_log.val``, a held-out log with the training log's
    columns: every catalogue product is embedded and fused as ``align embed`` embeds it
    (``embed_catalogue``: by ``model.fields``), each distinct query encoded as ``align search``
    encodes an upload (``QueryEncoder`` around ``model``), all products ranked by cosine and the
    lists scored against the log's grades (its deepest event per pair, ``data.search_log.events``)
    at k = ``SEARCH_VAL_K``.

    Returns {"search": graded_report of every query, "search-<modality>": of that modality's}, the
    entries ``train.best_metric`` may name. ``model`` in eval mode on ``device`` (the caller's).
    A log row naming an item outside the catalogue is a ``ConfigError``, too many broken rows a
    ``RunError``, each naming the file (the run checks the path before it starts).
    """
    from align.config import SEARCH_VAL_K
    from align.index.embed import embed_catalogue
    from align.index.search import QueryEncoder

    search = config.data.search_log
    items = embed_catalogue(model, config, search.catalogue, config.eval.batch_size, device, {})
    events = EventGrades(search.events) if search.events else EventGrades()
    log = read_judgements(search.val, items.ids, events, "data.search_log.catalogue", search.media_root,
                          search.max_bad_fraction)
    split = SplitData("val", search.val, log, np.arange(len(items.ids), dtype=np.int64))
    encoder = QueryEncoder(config.train.output_dir, device, model=model)  # named by the run in errors
    queries = encode_queries(encoder, split, config.eval.batch_size)
    # the grading scale's top: the events' top grade, or higher where a relevance column says so
    top = max([*events.grades.values(), *log.grades.tolist()])
    scored = score_split(queries, items.vectors["fused"], relevance_of(split), [q.modality for q in log.queries],
                         [None], top, SEARCH_VAL_K, min(depth, len(items.ids)))
    return {("search" if group == ALL else f"search-{group}"): by_dim[FULL] for group, by_dim in scored.items()}


def fields_from(path: Optional[str]) -> Optional[Dict[str, Any]]:
    """``--fields-from CONFIG``: that run config's ``model.fields`` (None without the flag)."""
    if not path:
        return None
    from align.config import load_config

    fields = dict(load_config(path).model.fields)
    if not fields:
        raise ConfigError(f"--fields-from {path}: the config has no model.fields")
    return fields


def main(argv: Optional[List[str]] = None) -> int:
    """``align search-eval``; a ``ConfigError`` (exit 2) or ``RunError`` (exit 1) is left to align/cli.py."""
    args = _parser().parse_args(argv)
    _check_arguments(args)
    splits, dims = _parse_splits(args.splits), _parse_dims(args.dims)
    results, full_dim, candidates = judge(args.checkpoint, args.catalogue, args.log_dir, splits, dims, args.batch_size,
                              args.device, args.max_grade, args.k, args.depth, args.id_column,
                              fields_from(args.fields_from), (args.judged_by,))
    output = args.output or os.path.join(args.checkpoint, "search_eval.json")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    write_json_atomic({"checkpoint": os.path.abspath(args.checkpoint), "log_dir": os.path.abspath(args.log_dir),
                       "judged_by": args.judged_by, "k": args.k, "depth": args.depth, "max_grade": args.max_grade, "dim": full_dim,
                       "dims": dims, "candidates": candidates, "splits": _json_safe(results)}, output)
    print(format_table(results, args.k))
    plot = plot_ndcg_by_dim(results, args.k, dims, full_dim, os.path.join(os.path.dirname(os.path.abspath(output)),
                                                                         PLOT_FILE))
    print(f"-> {output}" + (f", {plot}" if plot else " (no plot: matplotlib is not installed)"))
    return 0
