"""Zero-shot classification with the text tower as the classifier (CLIP's recipe).

Each class name is written into every prompt template ("a photo of a {}."), the text tower embeds
the prompts, and the class vector is their mean, renormalised. Each sample (of the configured
modality) is scored against every class vector; top-k accuracy is the share of samples whose true
class is among their k best, overall and per class::

    scores = samples @ class_vectors.T     # (N, C): cosines of unit vectors
    top-k hit_i = true_i in topk(scores_i)

The class of an item is a manifest column of the eval split (``eval.classify.column``); the class
names are its distinct values there, in first-seen order. Items without a value are left out.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from align.errors import ConfigError

CHUNK = 4096  # samples scored at once: (4096, C) floats


def read_labels(split: str, column: str, columns: Any) -> Dict[str, str]:
    """Item id -> class name from ``column`` of the manifest ``split`` (ids without a value left out).

    ``columns``: the run's ``ColumnsConfig`` (the id column and the rest as training read them).
    A split that is not a manifest, or a column with no value in it, is a ``ConfigError`` naming it."""
    from dataclasses import replace

    from align.data.manifest import is_manifest, read_manifest

    if not is_manifest(split):
        raise ConfigError(f"eval.classify reads its classes from a manifest column; {split} is not a manifest "
                          f"(.csv, .jsonl, .parquet): evaluate a manifest split or leave eval.classify.column empty")
    rows = read_manifest(split, replace(columns, category=column))
    labels = {row["id"]: row["category"] for row in rows if row["category"] is not None}
    if not labels:
        raise ConfigError(f"eval.classify.column: {column!r} is absent from {split} or empty in every row; "
                          f"name a column of that file")
    return labels


@torch.no_grad()
def class_vectors(model: Any, names: Sequence[str], templates: Sequence[str], device: torch.device,
                  batch_size: int = 256) -> torch.Tensor:
    """(C, D) unit class vectors: the renormalised mean of each name's prompt embeddings."""
    tokenize = model.preprocessors(train=False)["text"]
    prompts = [template.replace("{}", name) for name in names for template in templates]  # class-major
    embedded = []
    for start in range(0, len(prompts), batch_size):
        tokens = [tokenize(prompt) for prompt in prompts[start:start + batch_size]]
        batch = ({key: torch.stack([t[key] for t in tokens]).to(device) for key in tokens[0]}
                 if isinstance(tokens[0], dict) else torch.stack(tokens).to(device))
        embedded.append(F.normalize(model.encode("text", batch).float().cpu(), dim=-1))
    per_prompt = torch.cat(embedded).view(len(names), len(templates), -1)  # (C, T, D)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)


def accuracy(samples: torch.Tensor, labels: torch.Tensor, vectors: torch.Tensor, names: Sequence[str],
             ks: Sequence[int] = (1, 5)) -> Dict[str, Any]:
    """Top-k accuracy of nearest-class-vector predictions.

    Args:
        samples: (N, D) unit sample vectors; labels: (N,) int64 class index of each sample.
        vectors: (C, D) unit class vectors, row c for ``names[c]``.
        ks: each k is capped at C (with 3 classes, top-5 is top-3: every sample is a hit).
    Returns:
        {"top1": ..., "top5": ..., "n": N, "classes": C, "per_class": {name: {"top1", "top5", "n"}}}.
    """
    deepest = min(max(ks), len(names))
    rank_of_true = torch.empty(len(labels), dtype=torch.long)  # 0-based place of the true class, capped
    for start in range(0, len(samples), CHUNK):
        scores = samples[start:start + CHUNK].float() @ vectors.float().T  # (n, C)
        top = scores.topk(deepest, dim=1).indices  # (n, deepest)
        hit = top == labels[start:start + CHUNK, None]
        rank_of_true[start:start + CHUNK] = torch.where(hit.any(1), hit.float().argmax(1), torch.tensor(deepest))
    result: Dict[str, Any] = {f"top{k}": float((rank_of_true < k).double().mean()) if len(labels) else float("nan")
                              for k in ks}
    result.update(n=int(len(labels)), classes=len(names), per_class={})
    for c, name in enumerate(names):
        own = rank_of_true[labels == c]
        result["per_class"][name] = {**{f"top{k}": float((own < k).double().mean()) if len(own) else float("nan")
                                        for k in ks}, "n": int(len(own))}
    return result


def classify_split(model: Any, embedded: Dict[str, Any], labels: Dict[str, str], modality: str,
                   templates: Sequence[str], ks: Sequence[int], device: torch.device,
                   batch_size: int = 256) -> Optional[Dict[str, Any]]:
    """Classify the samples of ``modality`` in an embedded split (``embed_split``'s output) whose id
    has a label; None when none has. The report adds the modality, column values and templates."""
    mask = embedded["masks"][modality]  # (N,)
    rows = [r for r in mask.nonzero(as_tuple=True)[0].tolist() if embedded["ids"][r] in labels]
    if not rows:
        return None
    names: List[str] = list(dict.fromkeys(labels[embedded["ids"][r]] for r in rows))
    index = {name: c for c, name in enumerate(names)}
    truth = torch.tensor([index[labels[embedded["ids"][r]]] for r in rows], dtype=torch.long)
    samples = F.normalize(embedded["embeddings"][modality][torch.tensor(rows)].float(), dim=-1)
    report = accuracy(samples, truth, class_vectors(model, names, templates, device, batch_size), names, ks)
    return {"modality": modality, "templates": list(templates), **report}


def format_classify(report: Dict[str, Any], ks: Sequence[int]) -> str:
    """The printed table: overall, then per class."""
    head = f"{'class':>20} " + " ".join(f"{'top' + str(k):>8}" for k in ks) + f" {'n':>8}"
    lines = [f"zero-shot classification of {report['modality']} samples into {report['classes']} classes", head]
    rows = [("all", report)] + list(report["per_class"].items())
    for name, m in rows:
        lines.append(f"{name[:20]:>20} " + " ".join(f"{m[f'top{k}']:>8.3f}" for k in ks) + f" {m['n']:>8d}")
    return "\n".join(lines)
