"""Sigmoid pairwise loss, SigLIP (Zhai et al. 2023, https://arxiv.org/abs/2303.15343).

Every (query, candidate) pair is an independent binary problem. With x_ij = s * <a_i, b_j> + t
(s = ``logit_scale``, t = the learnable ``logit_bias``) and y_ij = +1 for positives, -1 else::

    loss = -1/N sum_i [ sum_{j valid} log sigmoid(y_ij x_ij)
                        + sum_{k present} log sigmoid(-(s <a_i, n_ik> + t)) ]

Positives: the pair itself, plus same-group candidates with ``same_group="positive"``; with
``"ignore"`` same-group pairs j != i are left out of the sum. Explicit negatives n_ik count as
negative pairs. Normalised by the number of valid rows N as in the paper and open_clip's
``SigLipLoss`` (equal to it with no masks, groups or negatives).

Args:
    gather: all-gather B across ranks with gradients; each rank sums its rows against all
        candidates (the "all-gather" variant; exact, O(n N) memory).
    same_group: "ignore" or "positive".
    bias_init: initial value of the learnable bias t (paper: -10).

Inputs: as ``InfoNCE`` (a, b (B, D); logit_scale scalar; valid, groups, negatives, negatives_mask).
Returns: {"loss", "positive", "negative"}: the total and its positive-pair and negative-pair
parts (per-rank shares under ``gather``).

Related: ``siglip_tiled`` (same value, O(tile^2) memory), ``infonce``.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from align.losses.pairs import PairedBatch, check_same_group, pair_up


def explicit_negatives_term(pairs: PairedBatch, logit_scale: Tensor, bias: Tensor) -> Tensor:
    """Sum of -log sigmoid(-z) over each anchor's explicit negatives (0 when there are none)."""
    if pairs.negatives is None or pairs.negatives.shape[1] == 0:
        return pairs.a_rows.new_zeros(())
    neg_logits = logit_scale * torch.einsum("nd,nkd->nk", pairs.a_rows.float(),
                                            pairs.negatives.float()) + bias  # (n, K)
    return (-F.logsigmoid(-neg_logits) * pairs.negatives_mask).sum()


class SigLIP(nn.Module):
    """Sigmoid loss with a learnable bias (owned here as ``logit_bias``)."""

    def __init__(self, *, gather: bool = True, same_group: str = "ignore", bias_init: float = -10.0) -> None:
        super().__init__()
        self.gather = gather
        self.same_group = check_same_group(same_group)
        self.logit_bias = nn.Parameter(torch.tensor(float(bias_init)))

    def forward(
        self, a: Tensor, b: Tensor, *, logit_scale: Tensor, valid: Optional[Tensor] = None,
        groups: Optional[Tensor] = None, negatives: Optional[Tensor] = None,
        negatives_mask: Optional[Tensor] = None,
    ) -> Dict[str, Tensor]:
        pairs = pair_up(a, b, valid=valid, groups=groups, negatives=negatives,
                        negatives_mask=negatives_mask, gather=self.gather, gather_a=False)
        bias = self.logit_bias
        logits = logit_scale * pairs.a_rows.float() @ pairs.b_cols.float().T + bias  # (n, N)
        positives = pairs.positive_mask()  # (n, N)
        counted = torch.ones_like(positives)
        same = pairs.same_group_mask()
        if same is not None:
            if self.same_group == "ignore":
                counted = ~same
            else:
                positives = positives | same
        signs = torch.where(positives, 1.0, -1.0)
        pair_losses = -F.logsigmoid(signs * logits) * counted  # (n, N)
        positive = (pair_losses * positives).sum()
        negative = (pair_losses * ~positives).sum()
        negative = negative + explicit_negatives_term(pairs, logit_scale, bias)
        positive, negative = positive * pairs.scale, negative * pairs.scale
        return {"loss": pairs.finish(positive + negative), "positive": positive, "negative": negative}
