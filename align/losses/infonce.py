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

    loss = InfoNCE()(a, b, logit_scale=model.logit_scale.exp())["loss"]
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor, nn

from align.losses.pairs import PairedBatch, check_same_group, negative_logits, pair_up


def directional_row_losses(
    queries: Tensor, candidates: Tensor, pairs: PairedBatch, logit_scale: Tensor,
    same_group: str, extra_negatives: Optional[Tensor] = None,
) -> Tensor:
    """(n,) InfoNCE term of every local query against all candidates (dense (n, N) logits)."""
    logits = logit_scale * queries.float() @ candidates.float().T  # (n, N)
    positives = pairs.positive_mask()  # (n, N)
    same = pairs.same_group_mask()
    if same is not None:
        if same_group == "ignore":
            logits = logits.masked_fill(same, float("-inf"))
        else:
            positives = positives | same
    if extra_negatives is not None:  # (n, K): candidates, never positives
        logits = torch.cat([logits, extra_negatives], dim=1)
        positives = torch.cat([positives, torch.zeros_like(extra_negatives, dtype=torch.bool)], dim=1)
    positive_mean = torch.where(positives, logits, 0.0).sum(1) / positives.sum(1)  # (n,)
    return torch.logsumexp(logits, dim=1) - positive_mean


class InfoNCE(nn.Module):
    """Symmetric InfoNCE / CLIP loss with groups, valid masks and explicit negatives."""

    def __init__(self, *, gather: bool = True, same_group: str = "ignore") -> None:
        super().__init__()
        self.gather = gather
        self.same_group = check_same_group(same_group)

    def terms(self, pairs: PairedBatch, logit_scale: Tensor) -> Dict[str, Tensor]:
        """Loss terms from an already paired batch (shared with composite losses)."""
        a2b = directional_row_losses(
            pairs.a_rows, pairs.b_cols, pairs, logit_scale, self.same_group,
            negative_logits(pairs, logit_scale),
        ).sum() * pairs.scale
        b2a = directional_row_losses(
            pairs.b_rows, pairs.a_cols, pairs, logit_scale, self.same_group
        ).sum() * pairs.scale
        return {"loss": (a2b + b2a) / 2, "a2b": a2b, "b2a": b2a}

    def forward(
        self, a: Tensor, b: Tensor, *, logit_scale: Tensor, valid: Optional[Tensor] = None,
        groups: Optional[Tensor] = None, negatives: Optional[Tensor] = None,
        negatives_mask: Optional[Tensor] = None,
    ) -> Dict[str, Tensor]:
        pairs = pair_up(a, b, valid=valid, groups=groups, negatives=negatives,
                        negatives_mask=negatives_mask, gather=self.gather)
        out = self.terms(pairs, logit_scale)
        out["loss"] = pairs.finish(out["loss"])
        return out
