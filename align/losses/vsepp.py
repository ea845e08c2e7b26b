"""Max-violation margin loss, VSE++ (Faghri et al. 2018, https://arxiv.org/abs/1707.05612).

Only the hardest negative of each query counts. With cosine similarities c_ij = <a_i, b_j>
(no logit scale: the margin is in cosine units) and margin alpha::

    a2b = 1/N sum_i mean_{p in P_i} [alpha - c_ip + max_{j in Neg_i} c_ij]_+
    b2a = the same with a and b swapped
    loss = a2b + b2a  (+ infonce_weight * InfoNCE)        (the paper sums both directions)

Neg_i: valid candidates that are not positives and not in the query's group (either
``same_group`` mode), plus, for A->B, the explicit negatives. P_i: the pair itself, plus
same-group candidates with ``same_group="positive"``. A query without negatives adds 0.

The hinge alone gives a gradient to one negative per query, which makes training from scratch
slow (the paper warm-starts); ``infonce_weight > 0`` adds the ``infonce`` loss on the same
gathered batch (one gather for both terms), the usual way to use it from scratch.

Args:
    gather, same_group: as ``infonce``.
    margin: alpha, in cosine units (paper: 0.2).
    infonce_weight: weight of an added InfoNCE term (0: the pure VSE++ loss).

Inputs: as ``InfoNCE``; ``logit_scale`` only enters the InfoNCE term.
Returns: {"loss", "a2b", "b2a", "max_violation"} (a2b / b2a of the hinge), plus "infonce"
when ``infonce_weight > 0``. Under ``gather`` with several ranks each value is this rank's
share: its mean over ranks is the global value.

Related: ``hcl`` (soft re-weighting of all negatives instead of the hardest one), ``infonce``.

Example::

    loss = MaxViolation(margin=0.2, infonce_weight=1.0)(a, b, logit_scale=s)["loss"]
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor

from align.losses.base import PairLoss, SameGroup
from align.losses.infonce import InfoNCE
from align.losses.pairs import MASKED_LOGIT, PairedBatch, explicit_cosines, upcast


class MaxViolation(PairLoss):
    """Hinge on the hardest negative per query (VSE++), both directions; optional InfoNCE term."""

    def __init__(self, *, gather: bool = True, same_group: SameGroup = "ignore", margin: float = 0.2,
                 infonce_weight: float = 0.0) -> None:
        super().__init__(gather=gather, same_group=same_group)
        if infonce_weight < 0:
            raise ValueError(f"infonce_weight must be >= 0, got {infonce_weight}")
        self.margin = float(margin)
        self.infonce_weight = float(infonce_weight)
        self.infonce = InfoNCE(gather=gather, same_group=same_group) if infonce_weight > 0 else None

    @property
    def needs_logit_scale(self) -> bool:
        return self.infonce is not None  # the hinge itself works in cosine units

    def terms(self, pairs: PairedBatch, logit_scale: Optional[Tensor]) -> Dict[str, Tensor]:
        a2b, b2a = self.directions(pairs, logit_scale, explicit_cosines(pairs))
        hinge = a2b + b2a
        out = {"a2b": a2b, "b2a": b2a, "max_violation": hinge}
        loss = hinge
        if self.infonce is not None:  # on this call's paired batch: one gather for both terms
            out["infonce"] = self.infonce.terms(pairs, logit_scale)["loss"]
            loss = hinge + self.infonce_weight * out["infonce"]
        out["loss"] = loss
        return out

    def row_losses(self, queries: Tensor, candidates: Tensor, pairs: PairedBatch, logit_scale: Optional[Tensor],
                   explicit: Optional[Tensor]) -> Tensor:
        """(n,) hinge of every local query against its hardest negative."""
        sims = upcast(queries) @ upcast(candidates).T  # (n, N) cosine
        sims_all, positives, negatives = self.candidates(sims, pairs, explicit)  # (n, N + K)
        # MASKED_LOGIT (not -inf) and a padded column keep empty rows / empty batches finite
        masked = torch.cat([sims_all.masked_fill(~negatives, MASKED_LOGIT),
                            sims_all.new_full((sims_all.shape[0], 1), MASKED_LOGIT)], dim=1)
        hardest = masked.amax(1)  # (n,)
        has_negative = negatives.any(1)
        positives = positives[:, : sims.shape[1]]  # (n, N): explicit negatives are never positives
        hinge = (self.margin - sims + hardest[:, None]).clamp(min=0) * positives  # (n, N)
        return torch.where(has_negative, hinge.sum(1) / positives.sum(1).clamp(min=1), 0.0)
