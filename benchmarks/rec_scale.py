"""The recommender head at catalogue scale: 100k items, 100k users, about 1M interactions.

Synthetic: items carry four attributes of ten values (10k combinations), their "aligned" vectors
are the attributes one-hot plus noise, and the shop simulator draws the log. For each catalogue
size (10k and 100k items, the same users and log size) it writes the files a shop would have
(catalogue CSV, interaction CSV, ``align embed`` folder), trains the head for one epoch and
evaluates it for every test user on every segment, and reports training examples/s, evaluation
seconds and the process's peak resident memory. No users x items matrix is built: users are
scored a chunk at a time (``eval.batch_size``).

    python benchmarks/rec_scale.py            # about 10 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import sys
import tempfile
import time
from typing import Any, Dict, List

import numpy as np
import torch

ATTRIBUTES = {"kind": 10, "colour": 10, "pattern": 10, "size": 10}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def build_shop(n_items: int, n_users: int, sessions: float, folder: str, dim: int = 64) -> Dict[str, str]:
    from align.index.vectors import ItemEmbeddings, save_item_embeddings
    from align.rec.interactions import write_interactions
    from align.rec.simulate import ShopSimConfig, simulate_shop

    rng = np.random.default_rng(0)
    ids = [f"item{i:06d}" for i in range(n_items)]
    values = {name: [f"{name}{v}" for v in rng.integers(0, count, n_items)] for name, count in ATTRIBUTES.items()}
    os.makedirs(folder, exist_ok=True)
    catalogue = os.path.join(folder, "catalogue.csv")
    with open(catalogue, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", *ATTRIBUTES])
        writer.writerows(zip(ids, *values.values()))
    onehot = np.zeros((n_items, dim), dtype=np.float32)
    offset = 0
    for name, count in ATTRIBUTES.items():
        codes = np.array([int(v[len(name):]) for v in values[name]])
        onehot[np.arange(n_items), offset + codes] = 1.0
        offset += count
    onehot[:, offset:] = 0.1 * rng.standard_normal((n_items, dim - offset))
    vectors = torch.nn.functional.normalize(torch.from_numpy(onehot), dim=1)
    mask = torch.ones(n_items, dtype=torch.bool)
    save_item_embeddings(ItemEmbeddings(ids, {"text": vectors, "fused": vectors.clone()},
                                        {"text": mask, "fused": mask.clone()},
                                        {"format": "align-item-embeddings/1", "checkpoint": "synthetic",
                                         "dim": str(dim), "modalities": "text", "fusion": "mean"}),
                         os.path.join(folder, "items"))
    log, _, cutoff, _ = simulate_shop(ids, values, ShopSimConfig(n_users=n_users, sessions_per_user=sessions, seed=0))
    write_interactions(log, os.path.join(folder, "interactions.csv"))
    return {"catalogue": catalogue, "items": os.path.join(folder, "items"),
            "interactions": os.path.join(folder, "interactions.csv"), "cutoff": str(cutoff), "rows": str(len(log))}


def run(n_items: int, args: argparse.Namespace, work: str) -> Dict[str, Any]:
    from align.rec.config import load_rec_config
    from align.rec.data import load_rec_data
    from align.rec.evaluate import HeadMethod, evaluate_methods
    from align.rec.recommend import Recommender
    from align.rec.train import train_head

    started = time.perf_counter()
    files = build_shop(n_items, args.users, args.sessions, os.path.join(work, f"items{n_items}"))
    build_seconds = time.perf_counter() - started
    out = os.path.join(work, f"head{n_items}")
    config = load_rec_config(None, [
        f"data.interactions={files['interactions']}", f"data.catalogue=[{files['catalogue']}]",
        f"data.items={files['items']}", f"data.cutoff={files['cutoff']}", f"train.output_dir={out}",
        "train.epochs=1", f"train.batch_size={args.batch_size}", "train.wandb=disabled", "train.progress=false",
        "head.dim=64", "head.hidden=128", "train.log_every=100", "eval.mmr_sweep=[1.0]", "eval.ks=[10]",
        "rerank.pool=10", "rerank.hub_penalty=1.25"])  # the demo's hub penalty: r(i) over 20k reference users
    summary = train_head(config)
    started = time.perf_counter()
    recommender = Recommender.load(out)
    data = load_rec_data(config)
    load_seconds = time.perf_counter() - started
    started = time.perf_counter()
    report = evaluate_methods([HeadMethod(recommender, data)], data, config, head=None)
    eval_seconds = time.perf_counter() - started
    return {"items": n_items, "users": args.users, "interactions": int(files["rows"]),
            "build_seconds": build_seconds, "train_examples_per_s": summary["examples_per_s"],
            "train_seconds": summary["seconds"], "load_seconds": load_seconds, "eval_seconds": eval_seconds,
            "eval_users": report["users"], "ndcg10_all": report["segments"]["all"]["ours"]["ndcg@10"],
            "peak_rss_gb": peak_rss_gb()}


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--sessions", type=float, default=3.5, help="sessions per user (3.5: about 1M interactions)")
    parser.add_argument("--batch-size", type=int, default=1024)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rows = []
    with tempfile.TemporaryDirectory(prefix="rec_scale_") as work:
        for n_items in args.items:
            row = run(n_items, args, work)
            rows.append(row)
            print(f"{row['items']:>7} items, {row['users']} users, {row['interactions']} interactions: "
                  f"train {row['train_examples_per_s']:.0f} examples/s ({row['train_seconds']:.0f} s), "
                  f"evaluation of {row['eval_users']['all']} users {row['eval_seconds']:.1f} s, "
                  f"peak RSS {row['peak_rss_gb']:.2f} GB", flush=True)
    growth = {"eval_seconds": rows[-1]["eval_seconds"] / rows[0]["eval_seconds"],
              "train_examples_per_s": rows[-1]["train_examples_per_s"] / rows[0]["train_examples_per_s"]}
    print(f"from {rows[0]['items']} to {rows[-1]['items']} items: evaluation time x{growth['eval_seconds']:.2f}, "
          f"training speed x{growth['train_examples_per_s']:.2f}")
    print(json.dumps({"runs": rows, "growth": growth, "peak_rss_gb": max(r["peak_rss_gb"] for r in rows)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
