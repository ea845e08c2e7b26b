"""The recommender head beside cornac, implicit and our own baselines, on the same simulated shop.

Needs the demo model's item vectors (``make demo`` writes ``runs/demo/items``; or give
``--items``). For each shop setting (the simulator's defaults, and a steeper popularity tail
with more cold items) it simulates the interaction log over the demo catalogue, trains the head
with ``configs/rec/demo.yaml``, fits every peer on the same temporal split and evaluates all of
them in one run (``align.rec.evaluate``). Prints, per setting, NDCG@10 and Recall@10 on warm
items, cold items and cold users, ItemCoverage@10 and ILD@10 on all users, then the MMR
trade-off at ``--mmr-lambda``. The last line is the JSON of the default setting (the steep
one nested under "steep").

    python benchmarks/rec_peers.py                 # about 5 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any, Dict, List

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = ["most_pop", "content_knn", "cornac_mostpop", "cornac_itemknn", "cornac_bpr", "cornac_ease", "cornac_vbpr",
         "implicit_bpr", "implicit_als"]
# A steeper popularity tail and twice the share of new (cold) items.
SETTINGS = {"default": {}, "steep": {"zipf_exponent": 1.4, "late_release_fraction": 0.2}}


def run_setting(name: str, knobs: Dict[str, Any], args: argparse.Namespace, work: str) -> Dict[str, Any]:
    from align.rec.config import load_rec_config
    from align.rec.evaluate import evaluate_head
    from align.rec.interactions import read_catalogue_columns, read_catalogue_ids, write_interactions
    from align.rec.simulate import ShopSimConfig, simulate_shop
    from align.rec.train import train_head

    manifests = [os.path.join(args.data, "train.csv"), os.path.join(args.data, "test.csv")]
    ids, values = read_catalogue_columns(manifests, ("kind", "colour", "pattern", "size"))
    new = set(read_catalogue_ids(manifests[1:]))  # held-out attribute combinations arrive late: cold items
    sim = ShopSimConfig(**{"n_users": args.users, "seed": args.seed, **knobs})
    log, _, cutoff, _ = simulate_shop(ids, values, sim, new_items=np.array([i in new for i in ids]))
    folder = os.path.join(work, name)
    write_interactions(log, os.path.join(folder, "interactions.csv"))
    overrides = [f"data.interactions={os.path.join(folder, 'interactions.csv')}",
                 f"data.catalogue=[{','.join(manifests)}]", f"data.items={args.items}", f"data.cutoff={cutoff}",
                 f"train.output_dir={os.path.join(folder, 'head')}", "train.wandb=disabled",
                 f"train.progress={'true' if args.progress else 'false'}", f"eval.mmr_sweep=[1.0,{args.mmr_lambda}]",
                 *args.override]
    config = load_rec_config(os.path.join(REPO, "configs", "rec", "demo.yaml"), overrides)
    started = time.perf_counter()
    summary = train_head(config)
    train_seconds = time.perf_counter() - started
    report = evaluate_head(os.path.join(folder, "head"), PEERS, os.path.join(folder, "rec_eval.json"), plots=False)
    report["train_seconds"] = train_seconds
    report["train_examples_per_s"] = summary["examples_per_s"]
    return report


def table(name: str, report: Dict[str, Any]) -> str:
    seg = report["segments"]
    lines = [f"setting {name}: {report['counts']['train']} train / {report['counts']['test']} test interactions, "
             f"{report['counts']['cold_items']} cold items, users: " +
             ", ".join(f"{k} {v}" for k, v in report["users"].items()),
             f"  {'method':<16}{'warm NDCG':>10}{'warm R@10':>10}{'cold NDCG':>10}{'cold R@10':>10}"
             f"{'cu NDCG':>9}{'cu R@10':>9}{'Cov@10':>8}{'ILD@10':>8}{'fit s':>7}"]
    for method in seg["all"]:
        def get(segment: str, key: str) -> float:
            return seg.get(segment, {}).get(method, {}).get(key, float("nan"))

        fit = report["fit_seconds"].get(method, report["train_seconds"])
        lines.append(f"  {method:<16}{get('warm', 'ndcg@10'):>10.4f}{get('warm', 'recall@10'):>10.4f}"
                     f"{get('cold_items', 'ndcg@10'):>10.4f}{get('cold_items', 'recall@10'):>10.4f}"
                     f"{get('cold_users', 'ndcg@10'):>9.4f}{get('cold_users', 'recall@10'):>9.4f}"
                     f"{get('all', 'coverage@10'):>8.4f}{get('all', 'ild@10'):>8.4f}{fit:>7.1f}")
    return "\n".join(lines)


def figures(report: Dict[str, Any], mmr_lambda: float) -> Dict[str, Any]:
    seg = report["segments"]
    peers = [m for m in seg["warm"] if m != "ours"]
    best_warm = max(peers, key=lambda m: seg["warm"][m]["ndcg@10"])
    best_cold_user = max(peers, key=lambda m: seg["cold_users"][m]["ndcg@10"])
    sweep = {p["mmr_lambda"]: p for p in report["mmr_sweep"]}
    plain, diverse = sweep[1.0], sweep[mmr_lambda]
    return {
        "ours_warm_ndcg10": seg["warm"]["ours"]["ndcg@10"],
        "best_peer_warm_ndcg10": seg["warm"][best_warm]["ndcg@10"],
        "best_peer_warm": best_warm,
        "ours_cold_ndcg10": seg["cold_items"]["ours"]["ndcg@10"],
        "content_knn_cold_ndcg10": seg["cold_items"]["content_knn"]["ndcg@10"],
        "ours_coverage10": seg["all"]["ours"]["coverage@10"],
        "best_peer_warm_coverage10": seg["all"][best_warm]["coverage@10"],
        "ours_cold_user_ndcg10": seg["cold_users"]["ours"]["ndcg@10"],
        "best_peer_cold_user_ndcg10": seg["cold_users"][best_cold_user]["ndcg@10"],
        "best_peer_cold_user": best_cold_user,
        "mmr_lambda": mmr_lambda,
        "mmr_ild_gain": diverse["ild@10"] / plain["ild@10"] - 1,
        "mmr_ndcg_loss": 1 - diverse["ndcg@10"] / plain["ndcg@10"],
    }


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", default=os.path.join(REPO, "runs", "demo", "items"),
                        help="item embeddings of the demo catalogue (align embed)")
    parser.add_argument("--data", default=os.path.join(REPO, "data", "demo"), help="demo catalogue folder")
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mmr-lambda", type=float, default=0.95, help="the MMR setting the README recommends")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--override", nargs="*", default=[], help="dotted overrides of configs/rec/demo.yaml")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.items, "embeddings.safetensors")):
        sys.exit(f"{args.items}: no item embeddings; run `make demo` first (or give --items)")
    results = {}
    with tempfile.TemporaryDirectory(prefix="rec_peers_") as work:
        for name, knobs in SETTINGS.items():
            report = run_setting(name, knobs, args, work)
            print(table(name, report), flush=True)
            results[name] = figures(report, args.mmr_lambda)
            print(f"  MMR λ={args.mmr_lambda}: ILD@10 {results[name]['mmr_ild_gain']:+.1%}, "
                  f"NDCG@10 {-results[name]['mmr_ndcg_loss']:+.1%}", flush=True)
    print(json.dumps({**results["default"], "steep": results["steep"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
