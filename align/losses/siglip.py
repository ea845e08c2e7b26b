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

from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from align.losses.base import PairLoss, SameGroup
from align.losses.pairs import PairedBatch, explicit_cosines, upcast


def explicit_negatives_term(pairs: PairedBatch, logit_scale: Tensor, bias: Tensor) -> Tensor:
    """Sum of -log sigmoid(-z) over each anchor's explicit negatives (0 when there are none)."""
    cosines = explicit_cosines(pairs)
    if cosines is None:
        return pairs.a_rows.new_zeros(())
    neg_logits = logit_scale * cosines + bias  # (n, K)
    return (-F.logsigmoid(-neg_logits) * pairs.negatives_mask).sum()


class SigLIP(PairLoss):
    """Sigmoid loss with a learnable bias (owned here as ``logit_bias``)."""

    gather_a = False  # only A->B pairs are scored: B alone is gathered

    def __init__(self, *, gather: bool = True, same_group: SameGroup = "ignore", bias_init: float = -10.0) -> None:
        super().__init__(gather=gather, same_group=same_group)
        self.logit_bias = nn.Parameter(torch.tensor(float(bias_init)))

    def terms(self, pairs: PairedBatch, logit_scale: Tensor) -> Dict[str, Tensor]:
        bias = self.logit_bias
        logits = logit_scale * upcast(pairs.a_rows) @ upcast(pairs.b_cols).T + bias  # (n, N)
        logits, positives, negatives = self.candidates(logits, pairs)  # same group under "ignore": neither
        signs = torch.where(positives, 1.0, -1.0)
        pair_losses = -F.logsigmoid(signs * logits)  # (n, N)
        positive = (pair_losses * positives).sum()
        negative = (pair_losses * negatives).sum()
        negative = negative + explicit_negatives_term(pairs, logit_scale, bias)
        positive, negative = positive * pairs.scale, negative * pairs.scale
        return {"loss": positive + negative, "positive": positive, "negative": negative}
