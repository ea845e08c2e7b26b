"""Which rows a rank scores, against which candidates, and which pairs are positives.

Every pairwise loss starts the same way: drop invalid rows, gather candidates from all ranks
(with gradients), and work out for each local query row where its positive sits among the
gathered candidates and which candidates share its group. ``pair_up`` does that once;
``PairedBatch`` hands the pieces to the loss.

Layout (n = this rank's valid rows, N = valid rows over all ranks, K = explicit negatives)::

    a_rows, b_rows   (n, D)   queries: this rank's valid rows (gradient flows locally)
    a_cols, b_cols   (N, D)   candidates: every rank's valid rows, in rank order (gradient
                              flows back through the gather to the owning rank)
    row_index        (n,)     column of each query's own pair among the N candidates
    row_groups       (n,)     group ids of the queries, or None when no row has a group
    col_groups       (N,)     group ids of the candidates, or None
    negatives        (n, K, D) explicit hard negatives of modality B (never gathered)
    negatives_mask   (n, K)

A loss sums its per-row terms over the local rows and multiplies by ``scale = world / N``: the
mean over ranks of that number is the single-process mean over all N rows, and since the
gather's backward sums every rank's contribution, DDP's gradient *averaging* reproduces the
single-process gradients exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from align.losses.gather import gather_no_grad, gather_sizes, gather_with_grad, world_info

# Fill for logits that must not count. Finite, so that rows where *everything* is masked give
# finite values and zero (not NaN) gradients; exp(-1e9 - anything reasonable) is exactly 0.
MASKED_LOGIT = -1e9


def upcast(x: Tensor) -> Tensor:
    """Half-precision embeddings (bf16/fp16 autocast) are scored in float32; float32 and float64
    stay as they are, so a float64 run (the parity checks) is float64 throughout."""
    return x if x.dtype == torch.float64 else x.float()


@dataclass
class PairedBatch:
    """Queries, gathered candidates and pair structure for one loss call (see module doc)."""

    a_rows: Tensor
    b_rows: Tensor
    a_cols: Optional[Tensor]
    b_cols: Tensor
    row_index: Tensor
    row_groups: Optional[Tensor]
    col_groups: Optional[Tensor]
    negatives: Optional[Tensor]
    negatives_mask: Optional[Tensor]
    n_total: int
    world: int
    keepalive: Tensor

    @property
    def scale(self) -> float:
        """Multiply a sum of local row terms by this to get this rank's share of the mean."""
        return self.world / max(self.n_total, 1)

    @property
    def n_rows(self) -> int:
        return self.a_rows.shape[0]

    def positive_mask(self) -> Tensor:
        """(n, N) bool: True at each query's own pair."""
        mask = torch.zeros(self.n_rows, self.b_cols.shape[0], dtype=torch.bool, device=self.b_cols.device)
        mask[torch.arange(self.n_rows, device=mask.device), self.row_index] = True
        return mask

    def same_group_mask(self) -> Optional[Tensor]:
        """(n, N) bool: candidate shares the query's group (id != -1) and is not its own pair."""
        if self.row_groups is None:
            return None
        same = (self.row_groups[:, None] == self.col_groups[None, :]) & (self.row_groups[:, None] >= 0)
        return same & ~self.positive_mask()

    def finish(self, loss: Tensor) -> Tensor:
        """Keep the gathered candidates in the graph so every rank runs the gather's backward."""
        return loss + self.keepalive


def pair_up(
    a: Tensor,
    b: Tensor,
    *,
    valid: Optional[Tensor] = None,
    groups: Optional[Tensor] = None,
    negatives: Optional[Tensor] = None,
    negatives_mask: Optional[Tensor] = None,
    gather: bool = True,
    gather_a: bool = True,
) -> PairedBatch:
    """Select valid rows and gather candidates across ranks (``gather_a=False`` skips A's).

    a, b: (B, D); valid: (B,) bool or None; groups: (B,) int64 (-1 = none) or None;
    negatives: (B, K, D) or None; negatives_mask: (B, K) bool or None (all present).
    """
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"a and b must both be (B, D); got {tuple(a.shape)} and {tuple(b.shape)}")
    rows = a.shape[0]
    device = a.device
    valid = torch.ones(rows, dtype=torch.bool, device=device) if valid is None else valid.to(torch.bool)
    if valid.shape != (rows,):
        raise ValueError(f"valid must be ({rows},) bool, got shape {tuple(valid.shape)}")
    if groups is not None and groups.shape != (rows,):
        raise ValueError(f"groups must be ({rows},) int64, got shape {tuple(groups.shape)}")

    rank, world = world_info()
    world = world if gather else 1
    if world > 1:
        sizes = gather_sizes(rows, device)
        offset = sum(sizes[:rank])
        valid_all = gather_no_grad(valid, sizes)
        groups_all = gather_no_grad(groups, sizes) if groups is not None else None
        b_all = gather_with_grad(b, sizes)
        a_all = gather_with_grad(a, sizes) if gather_a else None
        keepalive = 0.0 * b_all.sum() + (0.0 * a_all.sum() if a_all is not None else 0.0)
    else:
        offset, valid_all, groups_all, a_all, b_all = 0, valid, groups, a, b
        keepalive = a.new_zeros(())

    local = valid.nonzero(as_tuple=True)[0]  # (n,)
    cols = valid_all.nonzero(as_tuple=True)[0]  # (N,)
    column_of = torch.cumsum(valid_all.long(), 0) - 1  # global row -> candidate column
    row_index = column_of[local + offset]  # (n,)

    has_groups = groups_all is not None and bool((groups_all[cols] >= 0).any())
    if negatives is not None:
        if negatives.dim() != 3 or negatives.shape[0] != rows or negatives.shape[2] != a.shape[1]:
            raise ValueError(f"negatives must be ({rows}, K, {a.shape[1]}), got {tuple(negatives.shape)}")
        if negatives_mask is None:
            negatives_mask = torch.ones(negatives.shape[:2], dtype=torch.bool, device=device)
        negatives_mask = negatives_mask.to(torch.bool)
        if local.numel() != rows:
            negatives, negatives_mask = negatives[local], negatives_mask[local]
    every_row, every_col = local.numel() == rows, cols.numel() == valid_all.numel()
    return PairedBatch(  # no copies (and no index backward) when every row is valid
        a_rows=a if every_row else a[local],
        b_rows=b if every_row else b[local],
        a_cols=None if a_all is None else (a_all if every_col else a_all[cols]),
        b_cols=b_all if every_col else b_all[cols],
        row_index=row_index,
        row_groups=groups[local] if has_groups else None,
        col_groups=groups_all[cols] if has_groups else None,
        negatives=negatives,
        negatives_mask=negatives_mask,
        n_total=int(cols.numel()),
        world=world,
        keepalive=keepalive,
    )


def explicit_cosines(pairs: PairedBatch) -> Optional[Tensor]:
    """(n, K) fp32 <a_i, n_ik> of each query with its explicit negatives; None when there are none."""
    if pairs.negatives is None or pairs.negatives.shape[1] == 0:
        return None
    return torch.einsum("nd,nkd->nk", upcast(pairs.a_rows), upcast(pairs.negatives))


def negative_logits(pairs: PairedBatch, logit_scale: Tensor) -> Optional[Tensor]:
    """(n, K) logits of each query against its explicit negatives, MASKED_LOGIT where absent."""
    cosines = explicit_cosines(pairs)
    if cosines is None:
        return None
    return (logit_scale * cosines).masked_fill(~pairs.negatives_mask, MASKED_LOGIT)
