"""Relevance-weighted multi-positive InfoNCE computed in tiles (Inf-CL style).

The same loss as ``graded_infonce`` (GCL, https://arxiv.org/abs/2404.08535: several graded
positives per query, each contrasted against the negatives only, weighted by its grade), with
the same value and gradients to fp32 rounding, but the (n, N) logit matrix never exists: as in
``infonce_tiled`` (Inf-CL, https://arxiv.org/abs/2410.17243) the logits are made one (tile,
tile) block at a time, reduced to an online log-sum-exp, and recomputed block by block in the
backward. Formula, weighting, normalisation, groups and relevance input: see ``graded_infonce``.

Each positive's denominator holds its own logit and the query's negatives, never the other
positives, so one log-sum-exp per query serves all its positives::

    L_i   = logsumexp_{k in N_i} z_ik        (tiled: positives and group mates masked in the blocks,
                                              present explicit negatives merged with logaddexp)
    l_ij  = softplus(L_i - z_ij)             = -log(e^z_ij / (e^z_ij + e^L_i)),   j in P_i

The positives are a sparse list of (query, candidate, weight) triples (``PositivePairs``: the
graded matches, plus the ungraded group mates under ``same_group="positive"``). The tile pass
that builds L also reads z_ij off the blocks at the listed pairs, so the positive logits cost
no extra product, and its backward adds their gradients into the same blocks. The weighted
sums over the E listed pairs are plain autograd on (E,) vectors.

One process: the columns of the same blocks give b2a's log-sum-exp (a product's negatives are
the queries that neither grade it nor share its group: the transpose of a2b's), one pass for
both directions. Several ranks: each rank runs a2b for its queries against all gathered
products and b2a for its products against all gathered queries; gradients flow back through the
gather (``pair_up``), as in ``infonce_tiled``'s "gather" exchange.

Args:
    weighting, table, normalise, symmetric, gather, same_group: as ``graded_infonce``.
    tile_size: rows and columns per block (CPU: 2048-4096; GPU: 4096-8192).

Inputs and returns: as ``graded_infonce``.

Memory beyond the inputs: O(tile^2) for the blocks, O(n + N) for the log-sum-exps, and O(E) for
the listed positives (E <= n P matches, plus sum over groups of |group|^2 mate pairs under
"positive"). Runs torch kernels on every device (no Triton variant, no "ring" exchange yet).

Related: ``graded_infonce`` (dense, the reference), ``infonce_tiled`` (one positive).

Example::

    loss = GradedInfoNCETiled(weighting="log", tile_size=4096)
    out = loss(queries, products, logit_scale=s, item_keys=ids, positive_keys=keys, positive_grades=grades)
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from align.losses.base import SameGroup
from align.losses.graded_infonce import (GradedInfoNCE, Normalise, PositivePairs, Weighting, equal_positions,
                                         unique_pairs)
from align.losses.pairs import PairedBatch, negative_logits
from align.losses.tiled import DEFAULT_TILE, check_tile_size, tiled_negative_logsumexp


def with_group_mates(positives: PositivePairs, pairs: PairedBatch) -> PositivePairs:
    """``same_group="positive"``: add every query's ungraded group mates, weighted as its own
    pair (as ``graded_infonce``'s dense mask does); a graded mate keeps its grade's weight."""
    n_cols = pairs.b_cols.shape[0]
    grouped = (pairs.row_groups >= 0).nonzero(as_tuple=True)[0]  # queries that have a group
    slot, cols = equal_positions(pairs.row_groups[grouped], pairs.col_groups)
    rows = grouped[slot]
    linear = positives.rows * n_cols + positives.cols  # sorted (unique_pairs)
    mate = (cols != pairs.row_index[rows]) & ~torch.isin(rows * n_cols + cols, linear)
    own_weight = positives.weights.new_zeros(pairs.n_rows)
    own = positives.cols == pairs.row_index[positives.rows]
    own_weight[positives.rows[own]] = positives.weights[own]
    rows, cols = rows[mate], cols[mate]
    return unique_pairs(torch.cat([positives.rows, rows]), torch.cat([positives.cols, cols]),
                        torch.cat([positives.weights, own_weight[rows]]), max(n_cols, 1))


def transposed_positions(positives: PositivePairs, transposed: PositivePairs, n_cols: int) -> Tensor:
    """(E,) where each pair (j, i) of ``transposed`` sits as (i, j) in ``positives`` (sorted)."""
    linear = positives.rows * n_cols + positives.cols
    wanted = transposed.cols * n_cols + transposed.rows
    where = torch.searchsorted(linear, wanted).clamp(max=max(linear.shape[0] - 1, 0))
    if wanted.numel() and not bool((linear[where] == wanted).all()):
        raise RuntimeError("graded_infonce_tiled: the b2a positives are not the transpose of the a2b "
                           "positives in a one-process batch (a bug: please report it)")
    return where


class GradedInfoNCETiled(GradedInfoNCE):
    """Relevance-weighted multi-positive InfoNCE with O(tile^2) logit memory (see the module doc)."""

    def __init__(self, *, weighting: Weighting = "linear", table: Optional[Dict[str, float]] = None,
                 normalise: Normalise = "query", symmetric: bool = True, gather: bool = True,
                 same_group: SameGroup = "ignore", tile_size: int = DEFAULT_TILE) -> None:
        super().__init__(weighting=weighting, table=table, normalise=normalise, symmetric=symmetric, gather=gather,
                         same_group=same_group)
        self.tile_size = check_tile_size(tile_size)

    def score(self, pairs: PairedBatch, positives_ab: PositivePairs, positives_ba: PositivePairs,
              logit_scale: Tensor) -> Dict[str, Tensor]:
        """{"a2b"[, "b2a"]}: this rank's shares of each direction, tile by tile."""
        scale = torch.as_tensor(logit_scale, dtype=torch.float32, device=pairs.a_rows.device)
        if self.same_group == "positive" and pairs.row_groups is not None:
            positives_ab, positives_ba = with_group_mates(positives_ab, pairs), with_group_mates(positives_ba, pairs)
        groups = (pairs.row_groups, pairs.col_groups)
        if pairs.world == 1 and self.symmetric:  # square: the columns of one pass give b2a
            lse_ab, lse_ba, z_ab = tiled_negative_logsumexp(
                pairs.a_rows, pairs.b_cols, scale, pairs.row_index, positives_ab.rows, positives_ab.cols, *groups,
                tile=self.tile_size, both=True)
            z_ba = z_ab[transposed_positions(positives_ab, positives_ba, pairs.b_cols.shape[0])]
        else:
            lse_ab, _, z_ab = tiled_negative_logsumexp(pairs.a_rows, pairs.b_cols, scale, pairs.row_index,
                                                       positives_ab.rows, positives_ab.cols, *groups,
                                                       tile=self.tile_size)
            if self.symmetric:
                lse_ba, _, z_ba = tiled_negative_logsumexp(pairs.b_rows, pairs.a_cols, scale, pairs.row_index,
                                                           positives_ba.rows, positives_ba.cols, *groups,
                                                           tile=self.tile_size)
        explicit = negative_logits(pairs, scale)  # (n, K) or None
        if explicit is not None:
            lse_ab = torch.logaddexp(lse_ab, torch.logsumexp(explicit, dim=1))
        out = {"a2b": self.listed_terms(lse_ab, z_ab, positives_ab, pairs)}
        if self.symmetric:
            out["b2a"] = self.listed_terms(lse_ba, z_ba, positives_ba, pairs)
        return out

    def listed_terms(self, negative_lse: Tensor, logits: Tensor, positives: PositivePairs,
                     pairs: PairedBatch) -> Tensor:
        """One direction from its listed positives: w_ij softplus(L_i - z_ij), summed per query
        and normalised as ``graded_infonce``."""
        terms = positives.weights * F.softplus(negative_lse[positives.rows] - logits)  # (E,)
        row_terms = terms.new_zeros(pairs.n_rows).index_add(0, positives.rows, terms)  # (n,)
        row_weights = positives.weights.new_zeros(pairs.n_rows).index_add(0, positives.rows, positives.weights)
        return self.normalised(row_terms, row_weights, pairs)
