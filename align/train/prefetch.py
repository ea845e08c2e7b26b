"""Batches to the device one step ahead: while step k computes, batch k + 1 is already on its way.

On CUDA the copy runs on a side stream from pinned host memory (the loaders pin it when the
device is CUDA), so it overlaps the step's kernels instead of waiting in line behind them; the
step's stream waits for the copy only when it needs the batch, and each copied tensor is marked
as used by that stream so that its memory is not handed out again while the step still reads it.
Elsewhere (CPU) batches are moved as they come: there is nothing to overlap.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Iterator, Optional

import torch


def to_device(value: Any, device: torch.device) -> Any:
    """Tensors, in nested dicts, on ``device`` (non-blocking: asynchronous from pinned memory).
    Everything else stays as it is: ids, texts, and the ``JpegBytes`` of ``data.image_decode:
    device`` (align/data/sample.py), which the image tower's JPEG decoder reads on the host."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def _mark_used_by(value: Any, stream: "torch.cuda.Stream") -> None:
    if isinstance(value, torch.Tensor):
        value.record_stream(stream)
    elif isinstance(value, dict):
        for item in value.values():
            _mark_used_by(item, stream)


def prefetch_to_device(batches: Iterable[Dict[str, Any]], device: torch.device) -> Iterator[Dict[str, Any]]:
    """``batches`` on ``device``, each copied while the one before it is being used (CUDA)."""
    if device.type != "cuda":
        for batch in batches:
            yield to_device(batch, device)
        return
    copies = torch.cuda.Stream(device)
    source = iter(batches)

    def start(batch: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
        if batch is None:
            return None
        with torch.cuda.stream(copies):
            return to_device(batch, device)

    upcoming = start(next(source, None))
    while upcoming is not None:
        compute = torch.cuda.current_stream(device)
        compute.wait_stream(copies)
        _mark_used_by(upcoming, compute)
        batch, upcoming = upcoming, start(next(source, None))
        yield batch
