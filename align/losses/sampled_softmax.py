"""Sampled softmax with logQ correction, the two-tower recommender loss (Yi et al. 2019,
"Sampling-bias-corrected neural modeling for large corpus item recommendations",
https://research.google/pubs/pub48840/; Bengio & Senecal 2008 for the importance correction).

A batch holds N (user, item) pairs; every user is scored against every item of the batch
(gathered from all ranks), and the logit of candidate j is corrected by the log of the
probability q_j with which in-batch sampling drew it::

    z_ij = s * <u_i, v_j> - log q_j
    loss = 1/N sum_i [ log sum_{j in C_i} exp(z_ij) - z_ii ]

Popular items appear as negatives far more often than the softmax over the whole catalogue
would weigh them; without the correction the model learns to push them down (a popularity
penalty it was never asked for). C_i leaves out the other rows holding the same item as row i
(``groups`` = item id with ``same_group="ignore"``): buying the same thing as another user in
the batch is no negative. Only the user -> item direction is scored (``gather_a = False``).

Args:
    gather: across ranks, all-gather the items with gradients (as every ``PairLoss``); rows of
        the same item never count as each other's negatives (``same_group`` is "ignore").

Inputs: a (B, D) user vectors, b (B, D) item vectors, both L2-normalised; logit_scale scalar
(1 / temperature); log_q (B,) log sampling probability of each row's item, or None for no
correction (plain in-batch softmax); valid (B,) bool; groups (B,) int64 item ids; negatives
(B, K, D) explicit negative items of user i (uncorrected) and negatives_mask (B, K).

Returns: {"loss"}: this rank's share under ``gather`` (the mean over ranks is the global value).

Related: ``infonce`` (the symmetric version, no correction).

Example::

    loss = SampledSoftmax()(users, items, logit_scale=torch.tensor(20.0), log_q=log_q, groups=item_ids)["loss"]
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor

from align.losses.base import PairLoss
from align.losses.gather import gather_no_grad, gather_sizes
from align.losses.pairs import MASKED_LOGIT, PairedBatch, negative_logits, pair_up, upcast


class SampledSoftmax(PairLoss):
    """User -> item in-batch softmax with logQ correction of the candidates' logits."""

    gather_a = False

    def __init__(self, *, gather: bool = True) -> None:
        super().__init__(gather=gather, same_group="ignore")

    def forward(self, a: Tensor, b: Tensor, *, logit_scale: Optional[Tensor] = None, log_q: Optional[Tensor] = None,
                valid: Optional[Tensor] = None, groups: Optional[Tensor] = None, negatives: Optional[Tensor] = None,
                negatives_mask: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """As ``PairLoss.forward`` plus ``log_q`` (B,): each row's item's log sampling probability.
        Explicit negatives (B, K, D), items chosen for the user rather than sampled, join the
        candidates uncorrected."""
        if logit_scale is None:
            raise ValueError("SampledSoftmax needs logit_scale")
        pairs = pair_up(a, b, valid=valid, groups=groups, negatives=negatives, negatives_mask=negatives_mask,
                        gather=self.gather, gather_a=False)
        bias = None
        if log_q is not None:
            if log_q.shape != (a.shape[0],):
                raise ValueError(f"log_q must be ({a.shape[0]},), got {tuple(log_q.shape)}")
            keep = torch.ones(a.shape[0], dtype=torch.bool, device=a.device) if valid is None else valid.bool()
            if pairs.world > 1:  # the candidates are every rank's valid rows, in rank order
                sizes = gather_sizes(a.shape[0], a.device)
                log_q, keep = gather_no_grad(log_q, sizes), gather_no_grad(keep, sizes)
            bias = log_q[keep]  # (N,)
        out = self.scored(pairs, logit_scale, bias)
        out["loss"] = pairs.finish(out["loss"])
        return out

    def scored(self, pairs: PairedBatch, logit_scale: Tensor, bias: Optional[Tensor]) -> Dict[str, Tensor]:
        logits = logit_scale * upcast(pairs.a_rows) @ upcast(pairs.b_cols).T  # (n, N)
        if bias is not None:
            logits = logits - bias.to(logits.dtype)[None, :]
        logits, positives, negatives = self.candidates(logits, pairs, negative_logits(pairs, logit_scale))
        logits = logits.masked_fill(~(positives | negatives), MASKED_LOGIT)
        rows = torch.logsumexp(logits, dim=1) - logits[positives]  # one positive per row: (n,)
        return {"loss": rows.sum() * pairs.scale}

    def terms(self, pairs: PairedBatch, logit_scale: Optional[Tensor]) -> Dict[str, Tensor]:
        return self.scored(pairs, logit_scale, None)
