"""SigLIP computed in tiles (Inf-CL style, https://arxiv.org/abs/2410.17243).

The same value and gradients as ``siglip`` (https://arxiv.org/abs/2303.15343) without the
(n, N) logit matrix: ``tiled_sigmoid_pairs`` sums softplus(-y (s <a_i, b_j> + t)) block by
block and its backward recomputes each block once. Memory O((n + N) D + tile^2). Groups work
in both modes ("positive": same-group pairs get y = +1; "ignore": they are left out);
explicit negatives (n, K) are added untiled. Across ranks each rank scores its rows against
all gathered B (gradients flow back through the gather). With ``exchange="ring"`` nothing is
gathered: the key blocks of B (and their group ids) pass round a ring of ranks (``ring.py``),
each rank sums its rows' pairs block by block and the keys' gradients travel home one hop
behind their blocks; O(local batch x D) features per rank whatever the world size, the loss
and gradients the gathered path's (to fp32 rounding).

Args:
    gather, same_group, bias_init: as ``siglip`` (owns the learnable ``logit_bias``).
    tile_size: rows and columns per block.
    exchange: across ranks, "gather" (all-gather B with gradients, memory O(N D) per rank) or
        "ring" (pass B's blocks round the ranks, O(n D) per rank). One process, or
        gather=False: both are the plain tiled loss.

Returns: {"loss", "positive", "negative"}.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor

from align.losses.base import SameGroup
from align.losses.pairs import PairedBatch
from align.losses.ring import Exchange, RingExchange, RingLayout, check_exchange, ring_sigmoid_pairs
from align.losses.siglip import SigLIP, explicit_negatives_term
from align.losses.tiled import DEFAULT_TILE, check_tile_size, tiled_sigmoid_pairs


class SigLIPTiled(RingExchange, SigLIP):
    """Exact SigLIP with O(tile^2) logit memory and a learnable bias."""

    def __init__(self, *, gather: bool = True, same_group: SameGroup = "ignore", bias_init: float = -10.0,
                 tile_size: int = DEFAULT_TILE, exchange: Exchange = "gather") -> None:
        super().__init__(gather=gather, same_group=same_group, bias_init=bias_init)
        self.tile_size = check_tile_size(tile_size)
        self.exchange = check_exchange("siglip_tiled", exchange)

    def terms(self, pairs: PairedBatch, logit_scale: Tensor,
              ring: Optional[RingLayout] = None) -> Dict[str, Tensor]:
        scale = torch.as_tensor(logit_scale, dtype=torch.float32, device=pairs.a_rows.device)
        groups_positive = self.same_group == "positive"
        if ring is not None:  # local rows against every rank's B, whose blocks come round the ring
            positive, negative = ring_sigmoid_pairs(
                pairs.a_rows, pairs.b_rows, scale, self.logit_bias, pairs.row_groups, layout=ring,
                groups_positive=groups_positive, tile=self.tile_size)
        else:
            positive, negative = tiled_sigmoid_pairs(
                pairs.a_rows, pairs.b_cols, scale, self.logit_bias, pairs.row_index,
                pairs.row_groups, pairs.col_groups, groups_positive=groups_positive, tile=self.tile_size)
        negative = negative + explicit_negatives_term(pairs, scale, self.logit_bias)
        positive, negative = positive * pairs.scale, negative * pairs.scale
        return {"loss": positive + negative, "positive": positive, "negative": negative}
