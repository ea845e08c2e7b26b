"""Our trainer beside open_clip's own (``open_clip_train``) on the same image-caption CSV.

Same open_clip model (``--model``: a name or JSON config; by default the tiny ViT at 64 px of
configs/models/demo-vit.json; the shared embedding dimension follows it), same samples,
batch size, workers, optimiser (AdamW, lr, wd, betas, eps), warmup + cosine schedule, epochs and
precision. Throughput is each trainer's steady state: samples / sum of per-step wall times
(data wait included) after the first ``--skip-steps`` steps, from each trainer's own per-step log.
Held-out R@1 (text->image, identical captions are shared positives) is computed by the same
evaluator for both final models on the demo catalogue's test split, whose attribute combinations
never occur in training.

Each trainer runs ``--repeats`` times, alternating which goes first, and the figures are the
medians: on a shared machine one run of either can be 20% off its typical speed.

    python benchmarks/peer_openclip.py [--epochs 3] [--batch-size 128] [--repeats 3] [--seed 0]
        [--model configs/models/demo-vit.json] [--device cuda --precision bf16]

The last line is JSON: {"ours_sps", "openclip_sps", "ratio", "ours_r1", "openclip_r1"}.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_JSON = os.path.join(REPO, "configs", "models", "demo-vit.json")


def register_model(model: str) -> str:
    """The open_clip name of ``model``: a JSON config is registered under its file stem."""
    import open_clip

    if model.endswith(".json"):
        open_clip.add_model_config(model)
        return os.path.splitext(os.path.basename(model))[0]
    return model


def embed_dim_of(model: str) -> int:
    """The model's own embedding width (open_clip's ``embed_dim``)."""
    import open_clip

    return open_clip.get_model_config(register_model(model))["embed_dim"]


def write_pairs_csv(manifest: str, out: str) -> int:
    """Demo manifest -> open_clip's CSV (tab-separated, absolute image paths, title captions)."""
    base = os.path.dirname(os.path.abspath(manifest))
    rows = 0
    with open(manifest, newline="", encoding="utf-8") as src, open(out, "w", newline="", encoding="utf-8") as dst:
        writer = csv.writer(dst, delimiter="\t")
        writer.writerow(["filepath", "title"])
        for row in csv.DictReader(src):
            if row["image"] and row["title"]:
                writer.writerow([os.path.join(base, row["image"]), row["title"]])
                rows += 1
    return rows


def write_manifest(pairs_csv: str, out: str) -> None:
    """The same pairs as a manifest for our trainer (id, title, image)."""
    with open(pairs_csv, newline="", encoding="utf-8") as src, open(out, "w", newline="", encoding="utf-8") as dst:
        writer = csv.writer(dst)
        writer.writerow(["id", "title", "image"])
        for i, row in enumerate(csv.DictReader(src, delimiter="\t")):
            writer.writerow([f"pair-{i}", row["title"], row["filepath"]])


def steady_sps(per_step_sps, batch: int, skip: int) -> float:
    """Samples / total time over the steps after ``skip``, from per-step samples/s."""
    kept = per_step_sps[skip:] or per_step_sps
    return len(kept) * batch / sum(batch / s for s in kept)


def run_openclip(args, train_csv: str, work: str) -> dict:
    work = os.path.join(work, "openclip-runs", str(time.time_ns()))
    argv = [
        "--train-data", train_csv, "--dataset-type", "csv", "--csv-separator", "\t",
        "--csv-img-key", "filepath", "--csv-caption-key", "title", "--model", register_model(args.model),
        "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--workers", str(args.workers),
        "--lr", str(args.lr), "--wd", str(args.wd), "--warmup", str(args.warmup), "--beta1", "0.9",
        "--beta2", "0.98", "--eps", "1e-6", "--precision", "amp_bf16" if args.precision == "bf16" else "fp32",
        "--logs", work, "--name", "openclip", "--log-every-n-steps", "1", "--save-frequency", "1",
        "--zeroshot-frequency", "0", "--val-frequency", "0", "--report-to", "", "--seed", str(args.seed),
        "--device", args.device,
    ]
    code = ("import sys, open_clip; sys.argv[1].endswith('.json') and open_clip.add_model_config(sys.argv[1]); "
            "from open_clip_train.main import main; main(sys.argv[2:])")
    started = time.time()
    proc = subprocess.run([sys.executable, "-c", code, args.model, *argv], capture_output=True, text=True)
    wall = time.time() - started
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"open_clip_train failed:\n{log[-3000:]}")
    per_step = [float(x) for x in re.findall(r"Batch \(t\): [\d.]+, ([\d.]+)/s,", log)]
    checkpoint = os.path.join(work, "openclip", "checkpoints", f"epoch_{args.epochs}.pt")
    return {"sps": steady_sps(per_step, args.batch_size, args.skip_steps), "wall_s": wall, "steps": len(per_step),
            "checkpoint": checkpoint}


def run_ours(args, manifest: str, work: str, extra: Sequence[str] = ()) -> dict:
    """``align train`` on ``manifest`` (a CSV or a shard spec) with ``args``' settings, then ``extra``
    overrides; its steady samples/s (after ``args.skip_steps``), wall time, steps and checkpoint."""
    out = os.path.join(work, "ours", str(time.time_ns()))
    overrides = [
        f"model.embed_dim={embed_dim_of(args.model)}", "model.towers.image.type=open_clip_image",
        f"model.towers.image.model={args.model}", "model.towers.text.type=open_clip_text",
        f"model.towers.text.model={args.model}", f"train.seed={args.seed}",
        f"data.train={manifest}", "data.columns.text=[title]", f"data.batch_size={args.batch_size}",
        f"data.num_workers={args.workers}", f"optim.lr={args.lr}", f"optim.weight_decay={args.wd}",
        f"optim.warmup_steps={args.warmup}", "optim.grad_clip=0", f"train.epochs={args.epochs}",
        f"train.output_dir={out}", "train.log_every=1", "train.wandb=disabled", "train.progress=false",
        f"train.mixed_precision={'bf16' if args.precision == 'bf16' else 'no'}", "train.keep_checkpoints=1",
        *extra,
    ]
    code = "import sys; from align.cli import main; sys.exit(main(['train', *sys.argv[1:]]))"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", "0") if args.device == "cuda" else "")
    started = time.time()
    proc = subprocess.run([sys.executable, "-c", code, *overrides], capture_output=True, text=True, env=env)
    wall = time.time() - started
    if proc.returncode != 0:
        raise RuntimeError(f"align train failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as handle:
        summary = json.load(handle)
    per_step = [h["samples_per_s"] for h in summary["history"]]
    return {"sps": steady_sps(per_step, args.batch_size, args.skip_steps), "wall_s": wall, "steps": summary["steps"],
            "checkpoint": summary["checkpoint"]}


def heldout_r1(model_image, model_text, preprocess, tokenize, test_csv: str, device: str) -> float:
    """text->image R@1 on the held-out pairs, identical captions counting as shared positives."""
    import torch
    from PIL import Image

    from align.eval.retrieval import RetrievalEvaluator

    with open(test_csv, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    images, texts = [], []
    with torch.no_grad():
        for start in range(0, len(rows), 256):
            chunk = rows[start:start + 256]
            pixels = torch.stack([preprocess(Image.open(r["filepath"]).convert("RGB")) for r in chunk]).to(device)
            images.append(torch.nn.functional.normalize(model_image(pixels).float(), dim=-1).cpu())
            tokens = tokenize([r["title"] for r in chunk])
            texts.append(torch.nn.functional.normalize(model_text(tokens).float(), dim=-1).cpu())
    n = len(rows)
    masks = {"text": torch.ones(n, dtype=torch.bool), "image": torch.ones(n, dtype=torch.bool)}
    results = RetrievalEvaluator(ks=(1,))({"text": torch.cat(texts), "image": torch.cat(images)}, masks,
                                          [str(i) for i in range(n)], torch.full((n,), -1),
                                          [r["title"] for r in rows])
    return results["text->image"]["R@1"]


def evaluate_openclip(model_name: str, checkpoint: str, test_csv: str, device: str) -> float:
    import open_clip
    import torch

    name = register_model(model_name)
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    model.eval().to(device)
    tokenizer = open_clip.get_tokenizer(name)
    return heldout_r1(model.encode_image, lambda t: model.encode_text(t.to(device)), preprocess, tokenizer,
                      test_csv, device)


def evaluate_ours(checkpoint: str, test_csv: str, device: str) -> float:
    from align.loading import load_model

    model = load_model(checkpoint, device=device)
    tokenize = model.towers["text"].preprocessor(False)
    preprocess = model.towers["image"].preprocessor(False)
    return heldout_r1(lambda x: model.encode("image", x),
                      lambda t: model.encode("text", t.to(device)),
                      preprocess, lambda texts: __import__("torch").stack([tokenize(t) for t in texts]),
                      test_csv, device)


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(REPO, "data", "demo"), help="demo catalogue folder")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--wd", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--skip-steps", type=int, default=5, help="warm-up steps left out of samples/s")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each trainer; medians are reported")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--model", default=MODEL_JSON, help="open_clip model name or JSON config, for both trainers")
    parser.add_argument("--seed", type=int, default=0, help="seeds both trainers (initial weights, order, augmentation)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """Both trainers ``args.repeats`` times; the figures of the final JSON line."""
    if not os.path.exists(os.path.join(args.data, "train.csv")):
        from data_prep.demo import main as build_demo

        build_demo(["--out", args.data])
    work = tempfile.mkdtemp(prefix="peer-openclip-")
    train_csv, test_csv = os.path.join(work, "train.tsv"), os.path.join(work, "test.tsv")
    n_train = write_pairs_csv(os.path.join(args.data, "train.csv"), train_csv)
    write_pairs_csv(os.path.join(args.data, "test.csv"), test_csv)
    manifest = os.path.join(work, "train_manifest.csv")
    write_manifest(train_csv, manifest)
    print(f"{n_train} training pairs, {args.epochs} epochs, batch {args.batch_size}, {args.workers} workers, "
          f"{args.device} {args.precision}", flush=True)

    runs = {"ours": [], "open_clip": []}
    trainers = {"ours": lambda: run_ours(args, manifest, work), "open_clip": lambda: run_openclip(args, train_csv, work)}
    for repeat in range(args.repeats):
        for name in (("ours", "open_clip") if repeat % 2 == 0 else ("open_clip", "ours")):
            result = trainers[name]()
            runs[name].append(result)
            print(f"run {repeat + 1}/{args.repeats} {name + ':':<10} {result['sps']:.1f} samples/s "
                  f"({result['steps']} steps, {result['wall_s']:.0f} s wall)", flush=True)
    ours_sps = statistics.median(r["sps"] for r in runs["ours"])
    peer_sps = statistics.median(r["sps"] for r in runs["open_clip"])
    print(f"median samples/s: ours {ours_sps:.1f}, open_clip {peer_sps:.1f}")
    # Both trainers are seeded, so every repeat ends in the same model; the first is evaluated.
    ours_r1 = evaluate_ours(runs["ours"][0]["checkpoint"], test_csv, args.device)
    peer_r1 = evaluate_openclip(args.model, runs["open_clip"][0]["checkpoint"], test_csv, args.device)
    print(f"held-out text->image R@1: ours {ours_r1:.3f}, open_clip {peer_r1:.3f}")
    return {"ours_sps": round(ours_sps, 2), "openclip_sps": round(peer_sps, 2), "ratio": round(ours_sps / peer_sps, 3),
            "ours_r1": round(ours_r1, 4), "openclip_r1": round(peer_r1, 4)}


def main(argv=None) -> int:
    print(json.dumps(run(parse(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
