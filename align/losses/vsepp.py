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
from torch import Tensor, nn

from align.losses.infonce import InfoNCE
from align.losses.pairs import MASKED_LOGIT, PairedBatch, check_same_group, pair_up


class MaxViolation(nn.Module):
    """Hinge on the hardest negative per query (VSE++), both directions; optional InfoNCE term."""

    def __init__(self, *, gather: bool = True, same_group: str = "ignore", margin: float = 0.2,
                 infonce_weight: float = 0.0) -> None:
        super().__init__()
        if infonce_weight < 0:
            raise ValueError(f"infonce_weight must be >= 0, got {infonce_weight}")
        self.gather = gather
        self.same_group = check_same_group(same_group)
        self.margin = float(margin)
        self.infonce_weight = float(infonce_weight)
        self.infonce = InfoNCE(gather=gather, same_group=same_group) if infonce_weight > 0 else None

    def _row_losses(self, queries: Tensor, candidates: Tensor, pairs: PairedBatch,
                    extra_negatives: Optional[Tensor] = None,
                    extra_mask: Optional[Tensor] = None) -> Tensor:
        """(n,) hinge of every local query against its hardest negative."""
        sims = queries.float() @ candidates.float().T  # (n, N) cosine
        positives = pairs.positive_mask()
        negatives = ~positives
        same = pairs.same_group_mask()
        if same is not None:
            negatives = negatives & ~same
            if self.same_group == "positive":
                positives = positives | same
        if extra_negatives is not None:  # (n, K) cosine to explicit negatives
            sims_all = torch.cat([sims, extra_negatives], dim=1)  # (n, N + K)
            negatives = torch.cat([negatives, extra_mask], dim=1)
        else:
            sims_all = sims
        # MASKED_LOGIT (not -inf) and a padded column keep empty rows / empty batches finite
        masked = torch.cat([sims_all.masked_fill(~negatives, MASKED_LOGIT),
                            sims_all.new_full((sims_all.shape[0], 1), MASKED_LOGIT)], dim=1)
        hardest = masked.amax(1)  # (n,)
        has_negative = negatives.any(1)
        hinge = (self.margin - sims + hardest[:, None]).clamp(min=0) * positives  # (n, N)
        return torch.where(has_negative, hinge.sum(1) / positives.sum(1).clamp(min=1), 0.0)

    def forward(
        self, a: Tensor, b: Tensor, *, logit_scale: Optional[Tensor] = None,
        valid: Optional[Tensor] = None, groups: Optional[Tensor] = None,
        negatives: Optional[Tensor] = None, negatives_mask: Optional[Tensor] = None,
    ) -> Dict[str, Tensor]:
        pairs = pair_up(a, b, valid=valid, groups=groups, negatives=negatives,
                        negatives_mask=negatives_mask, gather=self.gather)
        extra = extra_mask = None
        if pairs.negatives is not None and pairs.negatives.shape[1] > 0:
            extra = torch.einsum("nd,nkd->nk", pairs.a_rows.float(), pairs.negatives.float())  # (n, K)
            extra_mask = pairs.negatives_mask
        a2b = self._row_losses(pairs.a_rows, pairs.b_cols, pairs, extra, extra_mask).sum() * pairs.scale
        b2a = self._row_losses(pairs.b_rows, pairs.a_cols, pairs).sum() * pairs.scale
        hinge = a2b + b2a
        out = {"a2b": a2b, "b2a": b2a, "max_violation": hinge}
        loss = hinge
        if self.infonce is not None:
            if logit_scale is None:
                raise ValueError("vsepp with infonce_weight > 0 needs logit_scale for its InfoNCE term")
            nce = self.infonce.terms(pairs, logit_scale)["loss"]
            out["infonce"] = nce
            loss = hinge + self.infonce_weight * nce
        out["loss"] = pairs.finish(loss)
        return out
