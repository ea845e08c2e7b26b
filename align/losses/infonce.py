"""Symmetric InfoNCE, the CLIP loss (Radford et al. 2021, https://arxiv.org/abs/2103.00020).

For N valid pairs (a_i, b_i) and logits z_ij = s * <a_i, b_j> (s = ``logit_scale``)::

    a2b = 1/N sum_i [ log sum_{j in C_i} exp(z_ij) - 1/|P_i| sum_{p in P_i} z_ip ]
    b2a = the same with the roles of a and b swapped (z_ji)
    loss = (a2b + b2a) / 2

C_i, the candidates of query i: every valid b_j, plus (A->B only) its explicit hard negatives.
P_i, its positives: its own pair i, plus, with ``same_group="positive"``, every candidate of the
same group (multi-positive, as SupCon's L_out, https://arxiv.org/abs/2004.11362). With
``same_group="ignore"`` same-group candidates j != i are removed from C_i instead. With no
groups, no negatives and all rows valid this is exactly open_clip's ``ClipLoss``.

Args:
    gather: across ranks, all-gather candidates with gradients and score local rows against
        them (see ``align/losses/pairs.py`` for the normalisation).
    same_group: "ignore" or "positive".

Inputs: a, b (B, D) L2-normalised; logit_scale scalar (already exp'd); valid (B,) bool;
groups (B,) int64 with -1 = none; negatives (B, K, D) modality-B hard negatives for a[i];
negatives_mask (B, K) bool.

Returns: {"loss", "a2b", "b2a"}, scalars. Under ``gather`` with several ranks each value is this
rank's share: its mean over ranks is the global value.

Related: ``infonce_tiled`` (same value, O(tile^2) memory), ``hcl`` (re-weighted negatives),
``vsepp`` with ``infonce_weight`` (InfoNCE plus a VSE++ margin term), ``siglip``.

Example::

    loss = InfoNCE()(a, b, logit_scale=model.logit_scale())["loss"]
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor

from align.losses.base import PairLoss
from align.losses.pairs import MASKED_LOGIT, PairedBatch, negative_logits, upcast


class InfoNCE(PairLoss):
    """Symmetric InfoNCE / CLIP loss with groups, valid masks and explicit negatives."""

    def terms(self, pairs: PairedBatch, logit_scale: Tensor) -> Dict[str, Tensor]:
        a2b, b2a = self.directions(pairs, logit_scale, negative_logits(pairs, logit_scale))
        return {"loss": (a2b + b2a) / 2, "a2b": a2b, "b2a": b2a}

    def row_losses(self, queries: Tensor, candidates: Tensor, pairs: PairedBatch, logit_scale: Tensor,
                   explicit: Optional[Tensor]) -> Tensor:
        """(n,) InfoNCE term of every local query against all candidates (dense (n, N) logits)."""
        logits = logit_scale * upcast(queries) @ upcast(candidates).T  # (n, N)
        logits, positives, negatives = self.candidates(logits, pairs, explicit)  # (n, N + K)
        logits = logits.masked_fill(~(positives | negatives), MASKED_LOGIT)  # ignored: exp(.) = 0
        positive_mean = torch.where(positives, logits, 0.0).sum(1) / positives.sum(1)  # (n,)
        return torch.logsumexp(logits, dim=1) - positive_mean
