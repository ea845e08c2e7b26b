"""Fine-tuning on a search log: plain InfoNCE on (query, best product) pairs against ours
(relevance-weighted ``graded_infonce``, multi-field products, Matryoshka), from the demo model.

On the simulated search log over the demo catalogue (``align prep search-log simulate``: four
splits holding queries and products out), it

1. judges the untuned demo checkpoint (``base``),
2. fine-tunes (a) ``plain``: ``infonce`` on one (query, best product) row per query, and
   (b) ``ours``: ``graded_infonce`` with the query's graded products as positives (one row per
   query, its product drawn by grade each epoch: ``pairs: per_query``; ``--ours-pairs graded``
   makes a row of every graded pair), plus ``loss.matryoshka`` and ``loss.field_alignment``
   (configs/finetune_search_log.yaml) -- both from the demo checkpoint, with
   the same multi-field products (``model.fields`` of configs/finetune_search_log.yaml, so the
   fields alone cannot make the difference), the same steps, batch, learning rate and seed,
3. judges all three with ``align search-eval``'s code on every split (nDCG@10 with gains 2^g - 1,
   ERR@10, R@10), and ours at each Matryoshka width beside plain truncated the same way, twice:
   against the simulator's complete judgements (``<split>.truth.csv``: every candidate that fits
   the query, graded by match level; the targets are read here) and against the log's own events
   (a few shown-and-viewed products per query, so mostly the luck of the simulated page).

With ``--val-fraction F`` the log is simulated with a held-out ``val.csv`` (that share of the
training queries; no evaluation split moves), both fine-tunes validate on it every
``--eval-every`` steps (``data.search_log.val``, ``train.best_metric: search/ndcg@10``), and each
is judged twice: its last step and its best validated model (``<run>/best``;
``--val-judged-by truth`` validates on the simulator's complete judgements of the val queries,
``val.truth.csv``, instead of their logged events); the JSON then
adds ``best_ndcg10`` ({model: {split: ..}}) and ``best_step`` ({model: step}). ``--ours-override
KEY=VALUE`` changes ours' config only (e.g. ``loss.field_weights=learned``), ``--override`` both
fine-tunes' and the base's products (e.g. a sound field in ``model.fields``).

The last line is the JSON ``{"base_ndcg10": {split: ..}, "plain_ndcg10": {split: ..},
"ours_ndcg10": {split: ..}, "ours_ndcg10_by_dim": {dim: ..}, "plain_ndcg10_by_dim": {dim: ..},
..., "log_judged": {the same keys, judged by the log}}`` (by-dim figures over all four splits'
queries: the mean of the split means).

    make demo                                      # the demo checkpoint and catalogue
    python benchmarks/search_log_finetune.py       # a few minutes on 2 cores
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "finetune_search_log.yaml")
SPLITS = ["eval_in_domain", "eval_novel_queries", "eval_novel_products", "eval_both_novel"]
DIMS = [16, 32, 64]
JUDGED_BY = ("truth", "log")  # the simulator's complete judgements (the targets), and the log's own


SIMULATED = "benchmark_simulation.json"  # the settings the folder's log was simulated with


def simulate(data: str, out: str, seed: int, val_fraction: float = 0.0) -> None:
    """The simulated log in ``out``, made again unless the one there has this seed and val fraction
    (a log of another seed, or with other val queries held out, was reused)."""
    wanted = ("stats.json", f"{SPLITS[-1]}.truth.csv") + (("val.csv",) if val_fraction else ())
    settings = {"seed": seed, "val_fraction": val_fraction, "data": os.path.abspath(data)}
    record = os.path.join(out, SIMULATED)
    if all(os.path.isfile(os.path.join(out, name)) for name in wanted + (SIMULATED,)):
        with open(record, encoding="utf-8") as handle:
            if json.load(handle) == settings:
                return
    manifests = [os.path.join(data, "train.csv"), os.path.join(data, "test.csv")]
    subprocess.run([sys.executable, "-m", "align.cli", "prep", "search-log", "simulate", "--catalogue", *manifests,
                    "--new", manifests[1], "--out", out, "--seed", str(seed), "--val-fraction", str(val_fraction)],
                   check=True, cwd=REPO)
    with open(record, "w", encoding="utf-8") as handle:  # last: a simulation cut short is made again
        json.dump(settings, handle)


def fine_tune(name: str, overrides: List[str], args: argparse.Namespace, work: str) -> str:
    from align.config import load_config
    from align.train.recipe import train

    out = os.path.join(work, name)
    if args.val_fraction:  # validate on the held-out val.csv; <out>/best keeps the best model
        held_out = "val.csv" if args.val_judged_by == "log" else "val.truth.csv"
        overrides = overrides + [f"data.search_log.val={os.path.join(work, 'search', held_out)}",
                                 f"train.eval_every={args.eval_every}", "train.best_metric=search/ndcg@10"]
    common = [f"model.init_from={args.checkpoint}", f"data.search_log.log={os.path.join(work, 'search', 'train.csv')}",
              f"data.search_log.catalogue=[{os.path.join(args.data, 'train.csv')},{os.path.join(args.data, 'test.csv')}]",
              "data.val=", f"train.output_dir={out}",
              f"train.max_steps={args.steps}", f"data.batch_size={args.batch_size}", "train.progress=false",
              "train.wandb=disabled", "eval.plots=false", f"train.seed={args.seed}"]
    config = load_config(CONFIG, common + args.override + overrides)
    started = time.time()
    train(config)
    print(f"{name}: {args.steps} steps of {args.batch_size} in {time.time() - started:.0f} s", flush=True)
    return out


def judge(checkpoint: str, args: argparse.Namespace, work: str, fields: Any = None) -> Dict[str, Any]:
    """{"truth" | "log": {split: ...}}: one embedding of the model, scored both ways."""
    from align.searchlog.evaluate import judge as judge_splits

    manifests = [os.path.join(args.data, "train.csv"), os.path.join(args.data, "test.csv")]
    results, _, _ = judge_splits(checkpoint, manifests, os.path.join(work, "search"), SPLITS, DIMS,
                                 batch_size=256, device="cpu", fields=fields, judged_by=JUDGED_BY)
    return results


def figure(results: Dict[str, Any], split: str, metric: str, dim: str = "full") -> float:
    return float(results[split]["all"][dim][metric])


def by_query_modality(results: Dict[str, Any]) -> Dict[str, float]:
    """nDCG@10 per query modality (text, image = photo, audio = voice): the mean over the splits
    that hold queries of it."""
    figures: Dict[str, List[float]] = {}
    for split in SPLITS:
        for modality, report in results[split].items():
            if modality != "all" and report["full"]["ndcg@10"] is not None:
                figures.setdefault(modality, []).append(float(report["full"]["ndcg@10"]))
    return {m: round(sum(v) / len(v), 4) for m, v in sorted(figures.items())}


def by_dim(results: Dict[str, Any], full: int) -> Dict[str, float]:
    """nDCG@10 per width: the mean over the four splits."""
    return {str(d): sum(figure(results, s, "ndcg@10", str(d) if d != full else "full") for s in SPLITS) / len(SPLITS)
            for d in DIMS + [full]}


def summarise(base: Dict[str, Any], plain: Dict[str, Any], ours: Dict[str, Any], full: int, how: str) -> Dict[str, Any]:
    """Print the tables of one way of judging and return its figures (the JSON's keys)."""
    print(f"\njudged by {how}:\n{'split':22s} {'model':6s} {'nDCG@10':>8s} {'ERR@10':>8s} {'R@10':>8s}")
    for split in SPLITS:
        for name, results in (("base", base), ("plain", plain), ("ours", ours)):
            print(f"{split:22s} {name:6s} " + " ".join(f"{figure(results, split, m):8.4f}"
                                                      for m in ("ndcg@10", "err@10", "recall@10")))
    by_query = {name: by_query_modality(results) for name, results in (("base", base), ("plain", plain), ("ours", ours))}
    print(f"\n{'query':6s} {'base':>8s} {'plain':>8s} {'ours':>8s}   (nDCG@10 by query modality, mean of the splits)")
    for modality in by_query["ours"]:
        print(f"{modality:6s} " + " ".join(f"{by_query[n].get(modality, float('nan')):8.4f}" for n in by_query))
    ours_dims, plain_dims = by_dim(ours, full), by_dim(plain, full)
    print(f"\n{'dim':>5s} {'ours':>8s} {'plain':>8s}   (nDCG@10, mean of the four splits)")
    for dim in ours_dims:
        print(f"{dim:>5s} {ours_dims[dim]:8.4f} {plain_dims[dim]:8.4f}")
    models = (("base", base), ("plain", plain), ("ours", ours))
    ndcg = {name: {s: round(figure(r, s, "ndcg@10"), 4) for s in SPLITS} for name, r in models}
    quarter = str(full // 4)
    out: Dict[str, Any] = {f"{name}_ndcg10": ndcg[name] for name, _ in models}
    out.update({
        "ours_ndcg10_by_dim": {k: round(v, 4) for k, v in ours_dims.items()},
        "plain_ndcg10_by_dim": {k: round(v, 4) for k, v in plain_dims.items()},
        "ours_over_plain": {s: round(ndcg["ours"][s] / max(ndcg["plain"][s], 1e-12), 3) for s in SPLITS},
        "ours_quarter_keeps": round(ours_dims[quarter] / max(ours_dims[str(full)], 1e-12), 3),
        "ndcg10_by_query_modality": by_query,
    })
    for metric, key in (("err@10", "err10"), ("recall@10", "r10")):
        out.update({f"{name}_{key}": {s: round(figure(r, s, metric), 4) for s in SPLITS} for name, r in models})
    return out


def judge_best(runs: Dict[str, str], last: Dict[str, Any], args: argparse.Namespace) -> Dict[str, Any]:
    """Each run's best validated model (``<run>/best``) judged on the complete judgements, printed
    beside its last step's figures."""
    best, steps = {}, {}
    print(f"\n{'model':6s} {'kept':>10s} " + " ".join(f"{s:>20s}" for s in SPLITS) + "   (nDCG@10, truth)")
    for name, run in runs.items():
        with open(os.path.join(run, "best", "best.json"), encoding="utf-8") as handle:
            steps[name] = json.load(handle)["step"]
        results = judge(os.path.join(run, "best"), args, args.work)["truth"]
        best[name] = {s: round(figure(results, s, "ndcg@10"), 4) for s in SPLITS}
        for label, figures in ((f"step {args.steps}", {s: figure(last[name]["truth"], s, "ndcg@10") for s in SPLITS}),
                               (f"best {steps[name]}", best[name])):
            print(f"{name:6s} {label:>10s} " + " ".join(f"{figures[s]:20.4f}" for s in SPLITS))
    return {"best_ndcg10": best, "best_step": steps}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=os.path.join(REPO, "runs", "demo"), help="the demo checkpoint")
    parser.add_argument("--data", default=os.path.join(REPO, "data", "demo"), help="the demo catalogue")
    parser.add_argument("--work", default=os.path.join(REPO, "runs", "bench_search_log"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ours-pairs", default="per_query", choices=["graded", "per_query"],
                        help="ours: a row per graded pair, or one per query with a product drawn by grade")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for both fine-tunes and the base's products, e.g. "
                             "'model.fields.sound={modality: audio, weight: 0.5}' (repeatable)")
    parser.add_argument("--ours-override", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for ours only, e.g. loss.field_weights=learned (repeatable)")
    parser.add_argument("--val-fraction", type=float, default=0.0,
                        help="hold this share of the training queries out as val.csv and judge each "
                             "fine-tune's best validated model too (0: off, the default)")
    parser.add_argument("--eval-every", type=int, default=25, help="validation interval with --val-fraction")
    parser.add_argument("--val-judged-by", default="log", choices=["log", "truth"],
                        help="validate on val.csv's own events (what a shop has) or on the simulator's "
                             "complete judgements of the same queries (val.truth.csv)")
    args = parser.parse_args()
    if not os.path.isdir(args.checkpoint) or not os.path.isfile(os.path.join(args.data, "train.csv")):
        print(f"needs the demo checkpoint {args.checkpoint} and catalogue {args.data}: run `make demo` first")
        return 1
    from align.config import load_config

    started = time.time()
    os.makedirs(args.work, exist_ok=True)
    simulate(args.data, os.path.join(args.work, "search"), args.seed, args.val_fraction)
    fields = dict(load_config(CONFIG, args.override).model.fields)
    full = load_config(CONFIG, args.override).model.embed_dim
    base = judge(args.checkpoint, args, args.work, fields)  # the untuned model, with the same products
    plain_dir = fine_tune("plain", ["data.search_log.pairs=best", "loss.name=infonce",
                                    "loss.params={same_group: ignore}", "loss.matryoshka.dims=[]",
                                    "loss.field_alignment=0"], args, args.work)
    ours_dir = fine_tune("ours", [f"data.search_log.pairs={args.ours_pairs}", *args.ours_override], args, args.work)
    plain, ours = judge(plain_dir, args, args.work), judge(ours_dir, args, args.work)

    summary: Dict[str, Any] = {}
    for how in JUDGED_BY:
        figures = summarise(base[how], plain[how], ours[how], full, how)
        summary.update(figures if how == JUDGED_BY[0] else {f"{how}_judged": figures})
    if args.val_fraction:
        summary.update(judge_best({"plain": plain_dir, "ours": ours_dir}, {"plain": plain, "ours": ours}, args))
    summary.update({"judged_by": JUDGED_BY[0], "seed": args.seed, "val_fraction": args.val_fraction,
                    "steps": args.steps, "batch_size": args.batch_size,
                    "overrides": args.override, "ours_overrides": args.ours_override,
                    "seconds": round(time.time() - started, 1)})
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
