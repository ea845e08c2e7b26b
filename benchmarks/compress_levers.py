"""Smaller and faster: what each lever costs. On the demo (the runs/demo checkpoint, the demo test
split), text -> image retrieval served by the exported ONNX towers and a FAISS index, with each
compression lever alone and all together:

    float32 baseline       float32 ONNX graphs, full width, exact index (FAISS Flat)
    int8 ONNX              `align export --quantize int8` (onnxruntime dynamic quantisation)
    Matryoshka dim/4       `align export --dim D/4` + `align index --dim D/4`: the first quarter of
                           the coordinates, renormalised (queries and items alike)
    FAISS IVF-PQ           `align index --kind ivfpq` (D/4 bytes an item, nprobe tuned to 0.95
                           recall@10 against exact search, as align/index/build.py does)
    int8 + dim/4 + PQ      all three

Columns: model size (the three towers' graphs on disk: text, image, audio), index size (the
index.faiss file) and the bytes an item's vector takes in it (4 x dim for Flat, the code size for
PQ; the file adds fixed costs: PQ codebooks, IVF centroids, which dominate at the demo's 400
items and vanish per item at a real catalogue's size), query encode latency (the text graph at
batch 1, median, every variant timed in turn), search latency (one query, k = 10, through
``CatalogueIndex.search`` as `align search` calls it, median over the test queries), and
text -> image R@10 and R@1 on the test split: every test text against every test image, a hit
being the same item, group or identical text, as `align eval` counts it (``recall_from_top``
over the index's top 10).

The levers compose: the int8 graphs are quantised from the float32 ones, the dim/4 graphs
are the same towers cut (align/export/matryoshka.py). The demo checkpoint was trained with plain
InfoNCE, so its prefixes were never asked to stand alone: the dim/4 row is what the cut costs a
model not trained for it. ``--matryoshka-steps N`` also fine-tunes the checkpoint N steps on its
own training data with ``loss.matryoshka.dims=[D/4, D/2, D]`` (everything else as it was trained,
learning rate --matryoshka-lr) and adds its rows at full width and at dim/4: what the cut costs a
model trained for it (compare those two with each other; the fine-tune itself moves both).

    python benchmarks/compress_levers.py [--checkpoint runs/demo] [--split data/demo/test.csv]
                                         [--out /tmp/align-compress-levers] [--threads 1] [--repeats 50]
                                         [--matryoshka-steps 62]

Prints a markdown table (for the README) and, last, a JSON line {"rows": {lever: {...}}, ...};
without the checkpoint or the split it prints why and {"skipped": reason}.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from align.encoding import Processes  # noqa: E402
from align.eval.retrieval import RetrievalEvaluator, recall_from_top  # noqa: E402
from align.eval.runner import embed_for_eval  # noqa: E402
from align.export.command import export  # noqa: E402
from align.export.onnx import OnnxEncoder  # noqa: E402
from align.index.build import INDEX_FILE, build_index  # noqa: E402
from align.index.vectors import FORMAT, ItemEmbeddings  # noqa: E402
from align.loading import load_model, model_folder, read_saved_config  # noqa: E402
from benchmarks.export_parity import alternating_median_ms  # noqa: E402

PAIR = "text->image"
K = 10


@dataclass
class Lever:
    """One row: which model, which graphs (precision, width) and which index."""

    name: str
    precision: str  # "float32" | "int8"
    cut: bool  # Matryoshka dim/4
    index: str  # align index --kind
    model: str = "given"  # "given": --checkpoint; "matryoshka": its --matryoshka-steps fine-tune

    @property
    def graphs(self) -> Tuple[str, str, bool]:
        return self.model, self.precision, self.cut


LEVERS = [Lever("float32 baseline", "float32", False, "exact"), Lever("int8 ONNX", "int8", False, "exact"),
          Lever("Matryoshka dim/4", "float32", True, "exact"), Lever("FAISS IVF-PQ", "float32", False, "ivfpq"),
          Lever("int8 + dim/4 + PQ", "int8", True, "ivfpq")]
TRAINED = [Lever("Matryoshka-trained, full width", "float32", False, "exact", "matryoshka"),
           Lever("Matryoshka-trained, dim/4", "float32", True, "exact", "matryoshka")]


@dataclass
class Row:
    model_mb: float
    index_kb: float
    vector_bytes: int
    factory: str
    encode_ms: float
    search_ms: float
    r10: float
    r1: float
    index_recall10: Optional[float]


def missing_inputs(checkpoint: str, split: Optional[str]) -> Optional[str]:
    """Why the benchmark cannot run here, or None. ``split`` None: the checkpoint's data.val."""
    if not os.path.exists(checkpoint):
        return f"no checkpoint at {checkpoint} (run `make demo` first, or pass --checkpoint)"
    try:
        folder = model_folder(checkpoint)
    except Exception as error:  # align/loading.py raises its own errors for a folder without a model
        return f"{checkpoint}: {error}"
    if not os.path.isfile(os.path.join(folder, "model.safetensors")):
        return f"no model.safetensors under {checkpoint} (run `make demo` first, or pass --checkpoint)"
    if split is not None and not os.path.isfile(split):
        return f"no test split at {split} (run `make demo` first, or pass --split)"
    return None


def split_of(checkpoint: str, split: Optional[str]) -> str:
    return split or read_saved_config(model_folder(checkpoint)).data.val or "data/demo/test.csv"


def vector_bytes(factory: str, dim: int) -> int:
    """Bytes one item's vector takes in the index: float32 for Flat, the PQ code size for PQ."""
    code = factory.split(",")[-1]
    return int(code[2:].split("x")[0]) if code.startswith("PQ") else 4 * dim


def candidate_index(vectors: torch.Tensor, kind: str, folder: str) -> Any:
    """An `align index` over the candidate vectors (ids are their positions), saved to ``folder``."""
    ones = torch.ones(len(vectors), dtype=torch.bool)
    emb = ItemEmbeddings([str(n) for n in range(len(vectors))], {"image": vectors, "fused": vectors},
                         {"image": ones, "fused": ones},
                         {"format": FORMAT, "checkpoint": "", "dim": str(vectors.shape[1]), "modalities": "image",
                          "fusion": "mean"})
    index = build_index(emb, kind=kind, modality="image", measure=kind != "exact")
    index.save(folder)
    return index


def matryoshka_finetune(checkpoint: str, dims: List[int], steps: int, lr: float, out: str) -> str:
    """``checkpoint`` trained ``steps`` more steps with ``loss.matryoshka.dims=dims``, everything else
    as its saved config says (no evaluation); the new checkpoint folder."""
    import dataclasses

    from align.loading import rebuild_config
    from align.train.recipe import train  # a benchmark may train; the library packages never do

    folder = model_folder(checkpoint)
    overrides = [f"model.init_from={folder}", f"loss.matryoshka.dims=[{','.join(map(str, dims))}]",
                 f"train.output_dir={out}", f"train.max_steps={steps}", "train.resume=", "data.val=",
                 f"optim.lr={lr}", f"optim.warmup_steps={max(steps // 10, 1)}", "train.progress=false",
                 "train.wandb=disabled"]
    shutil.rmtree(out, ignore_errors=True)  # this benchmark's own run folder: a fresh run each time
    started = time.perf_counter()
    config = read_saved_config(folder, overrides)
    # the towers' sources (the CLIP's model config) are the copies saved beside the weights
    result = train(dataclasses.replace(config, model=rebuild_config(config.model, folder)))
    print(f"Matryoshka fine-tune: {steps} steps with loss.matryoshka.dims={dims} in "
          f"{time.perf_counter() - started:.0f} s -> {result['checkpoint']}", flush=True)
    return result["checkpoint"]


def measure(levers: List[Lever], encoders: Dict[Any, OnnxEncoder], embedded: Dict[Any, Dict[str, Any]],
            query_tokens: torch.Tensor, out: str, repeats: int) -> Dict[str, Row]:
    """Every lever's row; the query encoders are timed in turn, so all see the same machine load."""
    keys = list(encoders)
    encode_ms = dict(zip(keys, alternating_median_ms(
        [lambda e=encoders[key]: e.encode("text", query_tokens) for key in keys], repeats)))
    rows = {}
    for lever in levers:
        key = lever.graphs
        split = embedded[key]
        ranked, q_rows, c_rows = RetrievalEvaluator(ks=(1, K)).rank(
            {m: split["embeddings"][m] for m in ("text", "image")}, split["masks"], split["ids"], split["groups"],
            split["texts"])[PAIR]
        candidates = split["embeddings"]["image"][c_rows]  # (C, d)
        queries = split["embeddings"]["text"][q_rows][ranked.queries].numpy()  # (Q', d)
        folder = os.path.join(out, "index-" + lever.name.replace(" ", "_").replace("/", "").replace("+", ""))
        index = candidate_index(candidates, lever.index, folder)
        _, ids = index.search(queries, K)
        top = torch.tensor([[int(i) for i in row] + [-1] * (K - len(row)) for row in ids], dtype=torch.long)
        recall = recall_from_top(top, ranked, (1, K))
        times = []
        for query in queries[:max(repeats, 1)]:
            start = time.perf_counter()
            index.search(query[None], K)
            times.append(time.perf_counter() - start)
        index_kb = os.path.getsize(os.path.join(folder, INDEX_FILE)) / 1e3
        rows[lever.name] = Row(encoders[key].graph_bytes() / 1e6, index_kb,
                               vector_bytes(index.factory, index.dim), index.factory, encode_ms[key],
                               1000 * statistics.median(times), recall[f"R@{K}~"], recall["R@1~"], index.recall10)
    return rows


def smaller(text: str, ratio: float, digits: int) -> str:
    """``text (3.4x smaller)``, or ``text`` alone when the ratio rounds to 1."""
    return text if round(ratio, digits) == 1 else f"{text} ({ratio:.{digits}f}x smaller)"


def markdown(rows: Dict[str, Row], dim: int, full: int) -> str:
    """The README table: each lever beside the float32 baseline (the first row)."""
    base = rows[LEVERS[0].name]
    lines = ["| lever | model (3 towers) | index file | vector bytes/item | query encode (text, b1) | search (1 query) "
             "| text→image R@10 | R@1 |", "|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        r10, r1 = (f"{value:.3f}" if row is base else f"{value:.3f} ({value - before:+.3f})"
                   for value, before in ((row.r10, base.r10), (row.r1, base.r1)))
        lines.append(f"| {name} | {smaller(f'{row.model_mb:.1f} MB', base.model_mb / row.model_mb, 1)} | "
                     f"{row.index_kb:.0f} KB | "
                     f"{smaller(str(row.vector_bytes), base.vector_bytes / row.vector_bytes, 0)} | "
                     f"{row.encode_ms:.2f} ms | {row.search_ms:.3f} ms | {r10} | {r1} |")
    pq = [f"{n}: {r.factory}, index recall@10 {r.index_recall10:.3f} against exact search"
          for n, r in rows.items() if "PQ" in r.factory and r.index_recall10 is not None]
    return "\n".join(lines) + f"\n\ndim/4 = {dim} of {full}; " + "; ".join(pq)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="runs/demo")
    parser.add_argument("--split", help="test manifest (default: the checkpoint's data.val, else data/demo/test.csv)")
    parser.add_argument("--out", default="/tmp/align-compress-levers")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime and FAISS threads (default 1)")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per latency figure (median)")
    parser.add_argument("--matryoshka-steps", type=int, default=0,
                        help="also fine-tune this many steps with loss.matryoshka and add its rows (default 0: no)")
    parser.add_argument("--matryoshka-lr", type=float, default=3e-4, help="learning rate of that fine-tune")
    args = parser.parse_args(argv)
    why = missing_inputs(args.checkpoint, None)
    split = split_of(args.checkpoint, args.split) if why is None else ""
    why = why or missing_inputs(args.checkpoint, split)
    if why:
        print(f"compress_levers: skipped: {why}")
        print(json.dumps({"skipped": why}))
        return 0
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # FAISS (align/index/build.py reads it)
    torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint)
    full = int(model.embed_dim)
    dim = max(full // 4, 1)
    levers, checkpoints = list(LEVERS), {"given": args.checkpoint}
    if args.matryoshka_steps > 0:
        checkpoints["matryoshka"] = matryoshka_finetune(args.checkpoint, sorted({dim, max(full // 2, 1), full}),
                                                        args.matryoshka_steps, args.matryoshka_lr,
                                                        os.path.join(args.out, "matryoshka-run"))
        levers += TRAINED
    folders = {(tag, cut): os.path.join(args.out, f"export-{tag}-{f'dim{dim}' if cut else 'full'}")
               for tag in checkpoints for cut in (False, True)}
    for (tag, cut), folder in folders.items():
        export(checkpoints[tag], folder, ["onnx"], overwrite=True, quantize="int8", dim=dim if cut else None)
    preprocessors = model.preprocessors(train=False)
    keys = sorted({lever.graphs for lever in levers})
    encoders = {key: OnnxEncoder(os.path.join(folders[key[0], key[2]], "onnx"), key[1], preprocessors, args.threads)
                for key in keys}
    config = read_saved_config(model_folder(args.checkpoint))
    embedded = {key: embed_for_eval(encoder, config, split, Processes(0, 1, torch.device("cpu")))[0]
                for key, encoder in encoders.items()}
    first = next(iter(embedded.values()))
    query_tokens = torch.stack([preprocessors["text"](first["texts"][0])])  # (1, L): one shopper's query
    rows = measure(levers, encoders, embedded, query_tokens, args.out, args.repeats)

    print(f"\nsmaller and faster: what each lever costs ({model_folder(args.checkpoint)}, {split}, "
          f"{args.threads} thread(s), onnxruntime {__import__('onnxruntime').__version__} CPU)\n")
    print(markdown(rows, dim, full))
    base = rows[LEVERS[0].name]
    summary: Dict[str, Any] = {"checkpoint": model_folder(args.checkpoint), "split": split, "dim": dim,
                               "full_dim": full,
                               "threads": args.threads, "matryoshka_steps": args.matryoshka_steps,
                               "rows": {n: asdict(r) for n, r in rows.items()}}
    for key, name in (("int8", "int8 ONNX"), ("dim4", "Matryoshka dim/4"), ("pq", "FAISS IVF-PQ"),
                      ("all", "int8 + dim/4 + PQ")):
        summary[f"{key}_r10_drop"] = base.r10 - rows[name].r10
    if args.matryoshka_steps > 0:
        summary["trained_dim4_r10_drop"] = rows[TRAINED[0].name].r10 - rows[TRAINED[1].name].r10
        summary["trained_dim4_r1_drop"] = rows[TRAINED[0].name].r1 - rows[TRAINED[1].name].r1
    summary["dim4_r1_drop"] = base.r1 - rows["Matryoshka dim/4"].r1
    summary["all_model_ratio"] = base.model_mb / rows["int8 + dim/4 + PQ"].model_mb
    summary["all_vector_ratio"] = base.vector_bytes / rows["int8 + dim/4 + PQ"].vector_bytes
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
