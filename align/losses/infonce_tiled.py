"""Symmetric InfoNCE computed in tiles (Inf-CL, https://arxiv.org/abs/2410.17243).

The same value and gradients as ``infonce`` (to fp32 rounding), but the (n, N) logit matrix
never exists: each direction's log-sum-exp comes from ``tiled_logsumexp``, whose backward
recomputes every (tile, tile) block once. Memory O((n + N) D + tile^2), so batches of 10^5
pairs fit on one CPU or GPU. Formula, groups, negatives and normalisation: see ``infonce``::

    l_i = log sum_{j in C_i} exp(z_ij) - mean_{p in P_i} z_ip

The positive term needs no tiling: mean_p z_ip = s <q_i, mean_{p in P_i} c_p> uses per-group
means of the candidates (O(N D)); the explicit negatives (n, K) are merged with logaddexp.

One process: one pass gives both directions (rows and columns of the same tiles). Several
ranks: each rank runs A->B for its rows against all gathered B, and B->A for its rows against
all gathered A; the gradient of the gathered side flows back through the gather. With
``exchange="ring"`` nothing is gathered: the key blocks pass round a ring of ranks (``ring.py``,
Inf-CL's multi-level tiling), one GEMM a tile gives both directions, and each rank holds
O(local batch x D) features whatever the world size; the loss and gradients are the gathered
path's (to fp32 rounding).

Args:
    gather, same_group: as ``infonce`` ("positive" works: no masking in the tiles, group means
        for the positive term).
    tile_size: rows and columns per block (CPU: 2048-4096; GPU: 4096-8192).
    exchange: across ranks, "gather" (all-gather the candidates with gradients, memory
        O(N D) per rank) or "ring" (pass feature blocks round the ranks, O(n D) per rank;
        "positive" group means come round the ring too). One process, or gather=False: both
        are the plain tiled loss.

Returns: {"loss", "a2b", "b2a"}.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import torch
from torch import Tensor

from align.losses.base import PairLoss, SameGroup
from align.losses.pairs import PairedBatch, negative_logits
from align.losses.ring import Exchange, RingExchange, RingLayout, check_exchange, ring_group_mean, ring_logsumexp
from align.losses.tiled import DEFAULT_TILE, check_tile_size, tiled_logsumexp


def positive_targets(cols: Tensor, row_index: Tensor, col_groups: Optional[Tensor]) -> Tensor:
    """(n, D) mean of each row's positives among ``cols`` (N, D): its pair or its group's mean."""
    if col_groups is None:
        if row_index.shape[0] == cols.shape[0] and bool(
                (row_index == torch.arange(len(row_index), device=row_index.device)).all()):
            return cols  # row i pairs with column i: no (n, D) copy
        return cols[row_index]
    _, inverse = torch.unique(col_groups, return_inverse=True)  # (N,) group slot per column
    sums = cols.new_zeros(int(inverse.max()) + 1, cols.shape[1], dtype=torch.float32)
    sums = sums.index_add(0, inverse, cols.float())  # (G, D)
    counts = torch.bincount(inverse).float()  # (G,)
    slot = inverse[row_index]
    means = sums[slot] / counts[slot, None]
    return torch.where(col_groups[row_index, None] >= 0, means, cols[row_index].float())


class InfoNCETiled(RingExchange, PairLoss):
    """Exact symmetric InfoNCE with O(tile^2) logit memory."""

    def __init__(self, *, gather: bool = True, same_group: SameGroup = "ignore", tile_size: int = DEFAULT_TILE,
                 exchange: Exchange = "gather") -> None:
        super().__init__(gather=gather, same_group=same_group)
        self.tile_size = check_tile_size(tile_size)
        self.exchange = check_exchange("infonce_tiled", exchange)

    def terms(self, pairs: PairedBatch, logit_scale: Tensor,
              ring: Optional[RingLayout] = None) -> Dict[str, Tensor]:
        scale = torch.as_tensor(logit_scale, dtype=torch.float32, device=pairs.a_rows.device)
        ignore = self.same_group == "ignore"
        mask_groups = (pairs.row_groups, pairs.col_groups) if ignore else (None, None)
        if ring is not None:  # local rows; other ranks' blocks come round the ring
            tiles = ring if ignore else dataclasses.replace(ring, has_groups=False)  # "positive": no masks
            lse_a2b, lse_b2a = ring_logsumexp(pairs.a_rows, pairs.b_rows, scale, mask_groups[0], layout=tiles,
                                              tile=self.tile_size)
        elif pairs.world == 1:  # square: rows and columns of one pass give both directions
            lse_a2b, lse_b2a = tiled_logsumexp(pairs.a_rows, pairs.b_cols, scale, pairs.row_index,
                                               *mask_groups, tile=self.tile_size, both=True)
        else:
            lse_a2b, _ = tiled_logsumexp(pairs.a_rows, pairs.b_cols, scale, pairs.row_index,
                                         *mask_groups, tile=self.tile_size)
            lse_b2a, _ = tiled_logsumexp(pairs.b_rows, pairs.a_cols, scale, pairs.row_index,
                                         *mask_groups, tile=self.tile_size)
        extra = negative_logits(pairs, scale)  # (n, K) or None
        if extra is not None:
            lse_a2b = torch.logaddexp(lse_a2b, torch.logsumexp(extra, dim=1))
        if ring is not None and not ignore:  # group means over every rank's rows, round the ring
            both = ring_group_mean(torch.cat([pairs.b_rows, pairs.a_rows], dim=1), pairs.row_groups, ring)  # one pass
            targets_b, targets_a = both.split(pairs.b_rows.shape[1], dim=1)
        else:
            groups_for_positives = None if ignore else pairs.col_groups
            targets_b = positive_targets(pairs.b_cols, pairs.row_index, groups_for_positives)  # (n, D)
            targets_a = positive_targets(pairs.a_cols, pairs.row_index, groups_for_positives)
        pos_a2b = scale * torch.linalg.vecdot(pairs.a_rows.float(), targets_b.float())  # (n,)
        pos_b2a = scale * torch.linalg.vecdot(pairs.b_rows.float(), targets_a.float())
        a2b = (lse_a2b - pos_a2b).sum() * pairs.scale
        b2a = (lse_b2a - pos_b2a).sum() * pairs.scale
        return {"loss": (a2b + b2a) / 2, "a2b": a2b, "b2a": b2a}
