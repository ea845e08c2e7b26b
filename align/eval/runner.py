"""Embed a held-out split with a model and run retrieval evaluation; ``align eval`` lives here."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import torch

from align.config import Config
from align.data.loader import loader_from_config
from align.data.sample import scatter_rows
from align.data.transforms import SampleProcessor
from align.errors import RunError, write_json_atomic
from align.eval.retrieval import RetrievalEvaluator, format_table


@torch.no_grad()
def embed_split(model, loader, device: torch.device) -> Dict[str, Any]:
    """Embeddings {modality: (N, D)} (zero rows where missing), masks, ids, groups and texts."""
    model.eval()
    chunks: Dict[str, List[torch.Tensor]] = {m: [] for m in model.modalities}
    masks: Dict[str, List[torch.Tensor]] = {m: [] for m in model.modalities}
    ids: List[str] = []
    texts: List[Optional[str]] = []
    groups: List[torch.Tensor] = []
    for batch in loader.iterate(0):
        for modality in model.modalities:
            mask = batch["masks"][modality]
            masks[modality].append(mask)
            if modality in batch["inputs"]:
                inputs = batch["inputs"][modality]
                inputs = ({k: v.to(device, non_blocking=True) for k, v in inputs.items()} if isinstance(inputs, dict)
                          else inputs.to(device, non_blocking=True))
                embedded = model.encode(modality, inputs).float().cpu()  # (n_m, D)
            else:
                embedded = torch.zeros(0, 1)
            dim = embedded.shape[-1] if embedded.numel() else None
            chunks[modality].append(scatter_rows(embedded, mask) if dim else None)
        ids.extend(batch["ids"])
        texts.extend(batch.get("texts") or [None] * len(batch["ids"]))
        groups.append(batch["groups"])
    dim = next((c.shape[-1] for cs in chunks.values() for c in cs if c is not None), None)
    if dim is None:
        bad = f"; {loader.bad.total} of {loader.bad.seen} samples were skipped: {dict(loader.bad.counts)}" \
            if loader.bad.total else ""
        raise RunError(f"{loader.bad.source}: no sample to evaluate{bad}")
    embeddings = {m: torch.cat([c if c is not None else torch.zeros(len(k), dim) for c, k in zip(cs, masks[m])])
                  for m, cs in chunks.items()}
    return {"embeddings": embeddings, "masks": {m: torch.cat(v) for m, v in masks.items()}, "ids": ids,
            "texts": texts, "groups": torch.cat(groups)}


def evaluate_model(model, config: Config, split: str, device: torch.device) -> Dict[str, Dict[str, float]]:
    processor = SampleProcessor(model.preprocessors(train=False))
    loader = loader_from_config(config, processor, train=False, spec=split,
                                pin_memory=torch.device(device).type == "cuda")
    embedded = embed_split(model, loader, device)
    evaluator = RetrievalEvaluator(ks=tuple(config.eval.ks))
    results = evaluator(embedded["embeddings"], embedded["masks"], embedded["ids"], embedded["groups"],
                        embedded["texts"])
    print(format_table(results, evaluator.ks), flush=True)
    if loader.bad.total:
        print(f"skipped {loader.bad.total} bad samples in {split}: {dict(loader.bad.counts)}", flush=True)
    return results


def evaluate_checkpoint(checkpoint: str, split: Optional[str] = None, overrides: Optional[List[str]] = None,
                        output: Optional[str] = None, device: Optional[str] = None) -> Dict[str, Dict[str, float]]:
    """Load ``checkpoint`` (a checkpoint or its ``model/`` folder; safetensors, YAML and JSON are
    read, never a pickle: align/loading.py) and evaluate ``split``."""
    from align.config import ConfigError
    from align.loading import load_model, read_saved_config
    from align.preflight import check_data_spec

    if not os.path.isdir(checkpoint):
        raise ConfigError(f"--checkpoint {checkpoint}: no such folder")
    config = read_saved_config(checkpoint, overrides)
    key = "--split" if split else "eval.split" if config.eval.split else "data.val"
    split = split or config.eval.split or config.data.val
    if not split:
        raise ConfigError("no split to evaluate: pass --split or set eval.split / data.val")
    check_data_spec(key, split)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(checkpoint, device=target)
    results = evaluate_model(model, config, split, target)
    write_json_atomic(results, output or os.path.join(checkpoint, "eval.json"))
    return results
