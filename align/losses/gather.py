"""Cross-rank gathering for contrastive losses, exact for ranks holding different batch sizes.

A contrastive loss needs every rank's embeddings as candidates. ``accelerator.gather`` carries no
gradient, so the candidate side would get no gradient from other ranks' queries; here the
features go through ``torch.distributed.nn.functional.all_gather``, whose backward sums the
gradient of every rank's copy back onto the owner (reduce-scatter, or all-to-all + sum on gloo).

Ranks may hold different numbers of rows (the last batch of an epoch, a filtered batch): the row
counts are gathered first, each rank pads to the largest count, and the padding is cut away
after the gather, so the result is exactly ``torch.cat`` of every rank's rows in rank order.

Every rank must call these functions the same number of times in the same order (they are
collectives), and every rank must run backward through a ``gather_with_grad`` result, which the
losses guarantee by keeping the gathered tensors in their graph even when a rank has no rows.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor


def world_info() -> Tuple[int, int]:
    """(rank, world_size) of the default process group; (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_sizes(rows: int, device: torch.device) -> List[int]:
    """Number of rows every rank holds, in rank order (a collective)."""
    _, world = world_info()
    if world == 1:
        return [rows]
    mine = torch.tensor([rows], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine)
    return [int(s.item()) for s in sizes]


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    if x.shape[0] == rows:
        return x.contiguous()
    padding = x.new_zeros((rows - x.shape[0],) + tuple(x.shape[1:]))
    return torch.cat([x, padding], dim=0)


def gather_with_grad(x: Tensor, sizes: Optional[List[int]] = None) -> Tensor:
    """``torch.cat`` over ranks of ``x`` (n_r, ...) -> (sum n_r, ...), differentiable.

    The backward sums, over all ranks, the gradient flowing into this rank's slice, so a loss
    of the form ``world / N * sum(local rows)`` yields, after DDP's gradient *averaging*, the
    gradients of the single-process loss on the concatenated batch.
    """
    _, world = world_info()
    if world == 1:
        return x
    sizes = sizes if sizes is not None else gather_sizes(x.shape[0], x.device)
    parts = dist_fn.all_gather(_pad_rows(x, max(sizes)))  # world x (max_rows, ...)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)


def gather_no_grad(x: Tensor, sizes: Optional[List[int]] = None) -> Tensor:
    """``torch.cat`` over ranks of ``x`` without gradient (masks, group ids, counts).

    Bool tensors travel as uint8 (not every backend reduces or gathers bool).
    """
    _, world = world_info()
    if world == 1:
        return x
    sizes = sizes if sizes is not None else gather_sizes(x.shape[0], x.device)
    wire = x.to(torch.uint8) if x.dtype == torch.bool else x
    wire = _pad_rows(wire.detach(), max(sizes))
    parts = [torch.empty_like(wire) for _ in sizes]
    dist.all_gather(parts, wire)
    out = torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)
    return out.to(torch.bool) if x.dtype == torch.bool else out
