"""Encode a loader's samples with a model, on one process or on each rank of a launch: what
``align eval`` (align/eval/runner.py), ``align embed`` (align/index/embed.py) and hard-negative
mining share. It sits below both, so neither has to import the other to embed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Dict, List, Optional

import torch

from align.data.sample import scatter_rows
from align.errors import RunError

# Ranks that finish their share early wait at a barrier for the slowest; a rank that fails ends the
# launch through torchrun, so the wait may be long without hiding a crash.
BARRIER_TIMEOUT = timedelta(hours=24)


@dataclass
class Processes:
    """This process's place in a launch: ``accelerate launch`` or torchrun (WORLD_SIZE > 1) join a
    process group, each rank on its own device; a plain run is rank 0 of 1.

    Attributes:
        rank, world: this process and how many there are.
        device: where this rank computes (its own GPU under a multi-GPU launch).
        state: Accelerate's ``PartialState`` when there are several processes, else None.
    """

    rank: int
    world: int
    device: torch.device
    state: Any = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()


def join_processes(device: Optional[str] = None) -> Processes:
    """The process group of a multi-process launch (joined through Accelerate), or rank 0 of 1.

    ``device``: "cpu" keeps every rank on the CPU (gloo); otherwise each rank takes the device
    Accelerate gives it (cuda:LOCAL_RANK), or ``device`` itself in a single process; default cuda
    when available."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not dist.is_initialized():
        return Processes(0, 1, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu", timeout=BARRIER_TIMEOUT)
    target = torch.device("cpu") if device == "cpu" else state.device
    return Processes(state.process_index, state.num_processes, target, state)


@torch.no_grad()
def embed_split(model, loader, device: torch.device, require_samples: bool = True) -> Dict[str, Any]:
    """Embeddings {modality: (N, D)} (zero rows where missing), masks, ids, groups and texts.

    ``require_samples=False``: a pass in which no sample could be read (or none was given) returns
    zero-row results of the model's width instead of a ``RunError``."""
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
    if dim is None and not require_samples:
        dim = model.embed_dim
    if dim is None:
        bad = f"; {loader.bad.total} of {loader.bad.seen} samples were skipped: {dict(loader.bad.counts)}" \
            if loader.bad.total else ""
        raise RunError(f"{loader.bad.source}: no sample to evaluate{bad}")
    embeddings = {m: torch.cat([c if c is not None else torch.zeros(len(k), dim) for c, k in zip(cs, masks[m])]
                               + [torch.zeros(0, dim)]) for m, cs in chunks.items()}
    return {"embeddings": embeddings, "masks": {m: torch.cat(v) if v else torch.zeros(0, dtype=torch.bool)
                                                 for m, v in masks.items()},
            "ids": ids, "texts": texts, "groups": torch.cat(groups) if groups else torch.zeros(0, dtype=torch.long)}


