"""Hard negative contrastive loss, HCL (Robinson et al. 2021, https://arxiv.org/abs/2010.04592).

InfoNCE whose negative term is (i) re-weighted towards negatives that are already close to the
query (concentration ``beta``) and (ii) debiased for false negatives (class prior ``tau_plus``).
With logits z = s * <q, c>, for query i with positives P_i and M_i negatives (the authors'
``estimator='hard'``, written in log space)::

    w_ij   = exp(beta z_ij) / mean_k exp(beta z_ik)                 importance weights
    R_i    = sum_j w_ij exp(z_ij)                                    re-weighted negative mass
    Ng_i   = max( (R_i - tau_plus M_i mean_{p in P_i} exp(z_ip)) / (1 - tau_plus),
                  M_i exp(-s) )                                      (lower bound: cos >= -1)
    l_i    = log( sum_{p in P_i} exp(z_ip) + Ng_i ) - mean_{p in P_i} z_ip
    loss   = (mean_i l_i over A->B + mean_i l_i over B->A) / 2

With beta = 0 and tau_plus = 0, R_i is the plain sum of exp(z) over negatives and the loss is
exactly ``infonce`` (tested). Negatives, positives, groups, valid rows and explicit negatives
(A->B only) are as in ``infonce``; a query with no negative contributes its positive term only.

Args:
    gather, same_group: as ``infonce``.
    beta: concentration on hard negatives (paper: 0.5 or 1.0).
    tau_plus: prior probability that a negative is a false negative, in [0, 1).

Returns: {"loss", "a2b", "b2a"}.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from align.losses.base import SameGroup
from align.losses.infonce import InfoNCE
from align.losses.pairs import MASKED_LOGIT, PairedBatch, upcast


def _masked_logsumexp(values: Tensor, mask: Tensor) -> Tensor:
    return torch.logsumexp(values.masked_fill(~mask, MASKED_LOGIT), dim=1)


class HardNegativeInfoNCE(InfoNCE):
    """InfoNCE with hard-negative importance weighting and positive-unlabelled debiasing."""

    def __init__(self, *, gather: bool = True, same_group: SameGroup = "ignore", beta: float = 1.0,
                 tau_plus: float = 0.1) -> None:
        super().__init__(gather=gather, same_group=same_group)
        if not 0.0 <= tau_plus < 1.0:
            raise ValueError(f"tau_plus must be in [0, 1), got {tau_plus}")
        self.beta = float(beta)
        self.tau_plus = float(tau_plus)

    def row_losses(self, queries: Tensor, candidates: Tensor, pairs: PairedBatch, logit_scale: Tensor,
                   explicit: Optional[Tensor]) -> Tensor:
        """(n,) HCL term of every local query (``terms``, both directions: as ``InfoNCE``)."""
        logits = logit_scale * upcast(queries) @ upcast(candidates).T  # (n, N)
        logits, positives, negatives = self.candidates(logits, pairs, explicit)  # (n, N + K)
        n_neg = negatives.sum(1)  # (n,)
        n_pos = positives.sum(1)
        has_neg = n_neg > 0
        log_n_neg = torch.log(n_neg.clamp(min=1).to(logits.dtype))
        # log R_i = log sum_j exp((1 + beta) z_ij) - log sum_j exp(beta z_ij) + log M_i
        log_reweighted = (_masked_logsumexp((1 + self.beta) * logits, negatives)
                          - _masked_logsumexp(self.beta * logits, negatives) + log_n_neg)
        log_reweighted = torch.where(has_neg, log_reweighted, 0.0)  # keep empty rows finite
        log_pos_mass = _masked_logsumexp(logits, positives)  # log sum_P exp(z_ip)
        log_ng = log_reweighted
        if self.tau_plus > 0:
            # log of ratio = tau_plus M_i mean_P exp(z_ip) / R_i; Ng_i <= 0 (ratio >= 1) falls
            # to the lower bound. All in log space: exp(z) overflows fp32 for logit scales ~100.
            log_ratio = (math.log(self.tau_plus) + log_n_neg + log_pos_mass
                         - torch.log(n_pos.to(logits.dtype)) - log_reweighted)
            log_remaining = torch.log(-torch.expm1(log_ratio.clamp(max=-1e-30)))  # log(1 - ratio)
            log_ng = torch.where(log_ratio < 0, log_reweighted + log_remaining - math.log(1 - self.tau_plus),
                                 MASKED_LOGIT)
        # the authors clamp Ng at M e^{-1/t}: the smallest mass M unit-norm negatives can have
        log_ng = torch.maximum(log_ng, log_n_neg - logit_scale)
        positive_mean = torch.where(positives, logits, 0.0).sum(1) / n_pos
        with_negatives = torch.logaddexp(log_pos_mass, log_ng)
        return torch.where(has_neg, with_negatives, log_pos_mass) - positive_mean
