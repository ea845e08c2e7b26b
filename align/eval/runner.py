"""Embed a held-out split with a model and evaluate it; ``align eval`` lives here.

At scale: under ``accelerate launch`` (or torchrun) each rank embeds its share of the split, whole
batches of the one-process order (so the vectors are the one-process ones), and rank 0 gathers
them and scores; scoring never holds a query x candidate matrix (align/eval/retrieval.py). With
``eval.index`` set, pairs with at least ``eval.index_min_candidates`` candidates are also ranked
through a catalogue index (align/index/build.py), whose R@K are reported as approximate (``R@K~``)
beside its measured recall@10, while R@K, mAP and the median rank stay the exact ones.
``eval.classify`` adds zero-shot classification (align/eval/classify.py), and a Recall@K plot per
modality pair is written beside eval.json (align/eval/plots.py).

Results (eval.json)::

    {"text->image": {"R@1", "R@5", "R@10", "median_rank", "mAP", "n_queries",
                     ["R@1~", ..., "index_recall10"]},            # with eval.index
     ...,
     ["index": {"setting", "pairs": {pair: {"kind", "factory", "recall10"}}}],
     ["classify": {"modality", "templates", "top1", "top5", "n", "classes", "per_class": {...}}]}
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional, Tuple

import torch

from align.config import Config, EvalConfig
from align.data.bad_samples import BadSampleTally
from align.data.loader import loader_from_config
from align.data.manifest import is_manifest
from align.data.transforms import SampleProcessor
from align.errors import RunError, check_json_output, write_json_atomic
from align.encoding import Processes, embed_split, join_processes
from align.eval.retrieval import RetrievalEvaluator, format_table, recall_from_top

INDEX_QUERY_CHUNK = 4096  # queries per index search call


def _gather_rows(tensor: torch.Tensor, processes: Processes) -> torch.Tensor:
    """Every rank's rows of ``tensor`` (n_r, ...) concatenated in rank order (unequal n_r allowed)."""
    import torch.distributed as dist

    device = processes.device if processes.device.type == "cuda" else torch.device("cpu")
    wire = tensor.to(device=device, dtype=torch.uint8 if tensor.dtype == torch.bool else tensor.dtype)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(processes.world)]
    dist.all_gather(sizes, torch.tensor([wire.shape[0]], device=device))
    counts = [int(n) for n in sizes]
    padded = wire.new_zeros((max(counts), *wire.shape[1:]))  # (max n_r, ...)
    padded[:wire.shape[0]] = wire
    received = [torch.zeros_like(padded) for _ in range(processes.world)]
    dist.all_gather(received, padded)
    return torch.cat([r[:n] for r, n in zip(received, counts)]).to(device="cpu", dtype=tensor.dtype)


def _gather_split(embedded: Dict[str, Any], bad: Dict[str, Any],
                  processes: Processes) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The ranks' embedded shares joined in rank order (= split order), and their bad-sample counts."""
    import torch.distributed as dist

    lists: List[Any] = [None] * processes.world
    dist.all_gather_object(lists, (embedded["ids"], embedded["texts"], bad))
    joined = {"embeddings": {m: _gather_rows(v, processes) for m, v in embedded["embeddings"].items()},
              "masks": {m: _gather_rows(v, processes) for m, v in embedded["masks"].items()},
              "groups": _gather_rows(embedded["groups"], processes),
              "ids": [i for ids, _, _ in lists for i in ids], "texts": [t for _, texts, _ in lists for t in texts]}
    counts: Dict[str, int] = {}
    for _, _, share in lists:
        for reason, n in share["counts"].items():
            counts[reason] = counts.get(reason, 0) + n
    examples = [e for _, _, share in lists for e in share.get("examples", [])]
    return joined, {"total": sum(s["total"] for _, _, s in lists), "seen": sum(s["seen"] for _, _, s in lists),
                    "counts": counts, "source": bad["source"], "examples": examples}


def embed_for_eval(model, config: Config, split: str,
                   processes: Processes) -> Tuple[Optional[Dict[str, Any]], Dict[str, Any]]:
    """The embedded split (``embed_split``'s dict) on rank 0, None on the others, and the bad-sample
    counts. Several ranks share the work: a manifest by contiguous runs of whole batches (the batches
    of one process, so the same vectors), shards as the shard loader splits them between ranks."""
    processor = SampleProcessor(model.preprocessors(train=False))
    pin = processes.device.type == "cuda"
    several = processes.world > 1
    if several and not is_manifest(split):
        loader = loader_from_config(config, processor, rank=processes.rank, world_size=processes.world, train=False,
                                    spec=split, pin_memory=pin)
    else:
        loader = loader_from_config(config, processor, train=False, spec=split, pin_memory=pin)
    if several:  # data.max_bad_fraction holds for the whole split, checked once the shares are joined
        loader.bad.max_bad_fraction = 1.0
    if several and is_manifest(split):
        rows, size = loader.dataset.rows, config.eval.batch_size
        batches = math.ceil(len(rows) / size)
        first, end = (processes.rank * batches // processes.world, (processes.rank + 1) * batches // processes.world)
        loader.dataset.rows = rows[first * size:end * size]
    embedded = embed_split(model, loader, processes.device, require_samples=not several)
    bad = {"total": loader.bad.total, "seen": loader.bad.seen, "counts": dict(loader.bad.counts),
           "source": loader.bad.source}
    if not several:
        return embedded, bad
    bad["examples"] = loader.bad.examples[:5]
    embedded, bad = _gather_split(embedded, bad, processes)
    whole = BadSampleTally(config.data.max_bad_fraction, source=bad["source"])
    whole.restore(bad)
    whole.examples = bad.pop("examples")[:whole.max_examples]
    whole.check()  # the same figures on every rank: all stop together
    if not processes.main:
        return None, bad
    if not any(bool(m.any()) for m in embedded["masks"].values()):
        raise RunError(f"{bad['source']}: no sample to evaluate; {bad['total']} of {bad['seen']} samples were "
                       f"skipped: {bad['counts']}")
    return embedded, bad


def _uses_index(settings: EvalConfig, candidates: int) -> bool:
    return settings.index != "none" and candidates >= settings.index_min_candidates


def index_top(candidates: torch.Tensor, queries: torch.Tensor, k: int, kind: str,
              modality: str) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """(Q, k) candidate positions (best first, -1 padding) from a catalogue index of kind ``kind``
    over ``candidates`` (C, D), and the index's {"kind", "factory", "recall10"}."""
    # Imported here: only a run with eval.index builds an index.
    from align.index.build import build_index
    from align.index.vectors import FORMAT, ItemEmbeddings

    ones = torch.ones(len(candidates), dtype=torch.bool)
    emb = ItemEmbeddings([str(n) for n in range(len(candidates))], {modality: candidates, "fused": candidates},
                         {modality: ones, "fused": ones},
                         {"format": FORMAT, "checkpoint": "", "dim": str(candidates.shape[1]), "modalities": modality,
                          "fusion": "mean"})
    index = build_index(emb, kind=kind, modality=modality)
    top = torch.full((len(queries), k), -1, dtype=torch.long)
    for start in range(0, len(queries), INDEX_QUERY_CHUNK):
        _, ids = index.search(queries[start:start + INDEX_QUERY_CHUNK].float().numpy(), k)
        for n, row in enumerate(ids):
            top[start + n, :len(row)] = torch.tensor([int(i) for i in row], dtype=torch.long)
    recall = index.recall10
    return top, {"kind": index.kind, "factory": index.factory,
                 "recall10": float(recall) if recall is not None else float("nan")}


def retrieval_results(embedded: Dict[str, Any], settings: EvalConfig) -> Tuple[Dict[str, Dict[str, float]],
                                                                           Dict[str, List[float]],
                                                                           Dict[str, Dict[str, Any]]]:
    """(metrics per pair, Recall@K curves K = 1..max(ks) per pair, index details per pair ranked
    through one). With ``settings.index``, a pair's metrics gain ``R@k~`` and ``index_recall10``."""
    ks = tuple(settings.ks)
    evaluator = RetrievalEvaluator(ks=ks)
    ranked = evaluator.rank(embedded["embeddings"], embedded["masks"], embedded["ids"], embedded["groups"],
                            embedded["texts"])
    results, curves, indexes = {}, {}, {}
    for pair, (found, q_rows, c_rows) in ranked.items():
        results[pair], curves[pair] = found.metrics(ks), found.recall_curve(max(ks))
        if _uses_index(settings, len(c_rows)) and len(found.queries):
            query_modality, candidate_modality = pair.split("->")
            queries = embedded["embeddings"][query_modality][q_rows][found.queries]  # (Q', D)
            top, indexes[pair] = index_top(embedded["embeddings"][candidate_modality][c_rows], queries, max(ks),
                                           "auto" if settings.index == "auto" else settings.index, candidate_modality)
            results[pair].update(recall_from_top(top, found, ks), index_recall10=indexes[pair]["recall10"])
    return results, curves, indexes


def _bad_line(bad: Dict[str, Any], split: str) -> Optional[str]:
    return f"skipped {bad['total']} bad samples in {split}: {bad['counts']}" if bad["total"] else None


def evaluate_model(model, config: Config, split: str, device: torch.device) -> Dict[str, Dict[str, float]]:
    """Retrieval metrics per ordered modality pair on ``split``, in this process (the trainer's
    evaluation; ``align eval`` adds classification, plots and several processes)."""
    embedded, bad = embed_for_eval(model, config, split, Processes(0, 1, torch.device(device)))
    results, _, _ = retrieval_results(embedded, config.eval)
    print(format_table(results, config.eval.ks), flush=True)
    if _bad_line(bad, split):
        print(_bad_line(bad, split), flush=True)
    return results


def _write_plots(curves: Dict[str, List[float]], folder: str, split: str) -> None:
    from align.eval.plots import RECALL_PNG, plot_recall_curves

    path = plot_recall_curves(curves, folder, f"Recall@K on {os.path.basename(split)}")
    print(f"Recall@K curves -> {path}" if path else
          f"no {RECALL_PNG}: matplotlib is not installed (pip install matplotlib, or the dev extra)", flush=True)


def evaluate_checkpoint(checkpoint: str, split: Optional[str] = None, overrides: Optional[List[str]] = None,
                        output: Optional[str] = None, device: Optional[str] = None) -> Dict[str, Any]:
    """Load ``checkpoint`` (a checkpoint or its ``model/`` folder; safetensors, YAML and JSON are
    read, never a pickle: align/loading.py) and evaluate ``split`` (module docstring). Under a
    multi-process launch every rank embeds a share and rank 0 scores, writes and returns the
    results; the other ranks return {}."""
    from align.config import ConfigError
    from align.eval.classify import classify_split, format_classify, read_labels
    from align.loading import load_model, read_saved_config
    from align.preflight import check_data_spec, check_eval_index

    if not os.path.isdir(checkpoint):
        raise ConfigError(f"--checkpoint {checkpoint}: no such folder")
    check_json_output(output, "eval.json")  # before the evaluation, not at its end
    config = read_saved_config(checkpoint, overrides)
    key = "--split" if split else "eval.split" if config.eval.split else "data.val"
    split = split or config.eval.split or config.data.val
    if not split:
        raise ConfigError("no split to evaluate: pass --split or set eval.split / data.val")
    check_data_spec(key, split)
    check_eval_index(config)
    classify = config.eval.classify
    labels = read_labels(split, classify.column, config.data.columns) if classify.column else None
    processes = join_processes(device)
    model = load_model(checkpoint, device=processes.device)
    embedded, bad = embed_for_eval(model, config, split, processes)
    if not processes.main:
        processes.barrier()
        return {}
    results: Dict[str, Any]
    results, curves, indexes = retrieval_results(embedded, config.eval)
    print(format_table(results, config.eval.ks), flush=True)
    if indexes:
        results["index"] = {"setting": config.eval.index, "pairs": indexes}
        print("R@k~: ranked through the index (" + "; ".join(f"{pair}: {i['factory']}, recall@10 {i['recall10']:.3f}"
                                                         for pair, i in indexes.items()) + "); R@k, mAP, medR exact",
              flush=True)
    if labels is not None:
        report = classify_split(model, embedded, labels, classify.modality, classify.templates, classify.ks,
                                processes.device, config.eval.batch_size)
        if report is None:
            raise RunError(f"eval.classify: no {classify.modality} sample of {split} has a {classify.column!r} value")
        results["classify"] = report
        print(format_classify(report, classify.ks), flush=True)
    if _bad_line(bad, split):
        print(_bad_line(bad, split), flush=True)
    path = output or os.path.join(checkpoint, "eval.json")
    write_json_atomic(results, path)
    if config.eval.plots:
        _write_plots(curves, os.path.dirname(os.path.abspath(path)), split)
    processes.barrier()
    return results
