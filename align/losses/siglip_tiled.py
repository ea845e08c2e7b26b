"""SigLIP computed in tiles (Inf-CL style, https://arxiv.org/abs/2410.17243).

The same value and gradients as ``siglip`` (https://arxiv.org/abs/2303.15343) without the
(n, N) logit matrix: ``tiled_sigmoid_pairs`` sums softplus(-y (s <a_i, b_j> + t)) block by
block and its backward recomputes each block once. Memory O((n + N) D + tile^2). Groups work
in both modes ("positive": same-group pairs get y = +1; "ignore": they are left out);
explicit negatives (n, K) are added untiled. Across ranks each rank scores its rows against
all gathered B (gradients flow back through the gather).

Args:
    gather, same_group, bias_init: as ``siglip`` (owns the learnable ``logit_bias``).
    tile_size: rows and columns per block.

Returns: {"loss", "positive", "negative"}.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor

from align.losses.base import SameGroup
from align.losses.pairs import PairedBatch
from align.losses.siglip import SigLIP, explicit_negatives_term
from align.losses.tiled import DEFAULT_TILE, check_tile_size, tiled_sigmoid_pairs


class SigLIPTiled(SigLIP):
    """Exact SigLIP with O(tile^2) logit memory and a learnable bias."""

    def __init__(self, *, gather: bool = True, same_group: SameGroup = "ignore", bias_init: float = -10.0,
                 tile_size: int = DEFAULT_TILE) -> None:
        super().__init__(gather=gather, same_group=same_group, bias_init=bias_init)
        self.tile_size = check_tile_size(tile_size)

    def terms(self, pairs: PairedBatch, logit_scale: Tensor) -> Dict[str, Tensor]:
        scale = torch.as_tensor(logit_scale, dtype=torch.float32, device=pairs.a_rows.device)
        positive, negative = tiled_sigmoid_pairs(
            pairs.a_rows, pairs.b_cols, scale, self.logit_bias, pairs.row_index,
            pairs.row_groups, pairs.col_groups, groups_positive=self.same_group == "positive",
            tile=self.tile_size)
        negative = negative + explicit_negatives_term(pairs, scale, self.logit_bias)
        positive, negative = positive * pairs.scale, negative * pairs.scale
        return {"loss": positive + negative, "positive": positive, "negative": negative}
