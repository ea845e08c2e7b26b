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

from typing import Dict, Optional

import torch
from torch import Tensor, nn

from align.losses.pairs import check_same_group, pair_up
from align.losses.siglip import explicit_negatives_term
from align.losses.tiled import DEFAULT_TILE, tiled_sigmoid_pairs


class SigLIPTiled(nn.Module):
    """Exact SigLIP with O(tile^2) logit memory and a learnable bias."""

    def __init__(self, *, gather: bool = True, same_group: str = "ignore", bias_init: float = -10.0,
                 tile_size: int = DEFAULT_TILE) -> None:
        super().__init__()
        if tile_size < 1:
            raise ValueError(f"tile_size must be positive, got {tile_size}")
        self.gather = gather
        self.same_group = check_same_group(same_group)
        self.logit_bias = nn.Parameter(torch.tensor(float(bias_init)))
        self.tile_size = int(tile_size)

    def forward(
        self, a: Tensor, b: Tensor, *, logit_scale: Tensor, valid: Optional[Tensor] = None,
        groups: Optional[Tensor] = None, negatives: Optional[Tensor] = None,
        negatives_mask: Optional[Tensor] = None,
    ) -> Dict[str, Tensor]:
        pairs = pair_up(a, b, valid=valid, groups=groups, negatives=negatives,
                        negatives_mask=negatives_mask, gather=self.gather, gather_a=False)
        scale = torch.as_tensor(logit_scale, dtype=torch.float32, device=a.device)
        positive, negative = tiled_sigmoid_pairs(
            pairs.a_rows, pairs.b_cols, scale, self.logit_bias, pairs.row_index,
            pairs.row_groups, pairs.col_groups, groups_positive=self.same_group == "positive",
            tile=self.tile_size)
        negative = negative + explicit_negatives_term(pairs, scale, self.logit_bias)
        positive, negative = positive * pairs.scale, negative * pairs.scale
        return {"loss": pairs.finish(positive + negative), "positive": positive, "negative": negative}
