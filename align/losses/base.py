"""What every pairwise loss shares: its call signature, gathering, masks, typed config.

A loss subclasses ``PairLoss`` and implements one hook, ``terms(pairs, logit_scale) -> dict``,
on a ``PairedBatch`` (``pairs.py``: local query rows, candidates gathered from every rank,
where each query's own pair sits, group ids, explicit negatives). ``PairLoss.forward`` does the
rest, the same for every loss::

    forward(a, b, *, logit_scale, valid=None, groups=None, negatives=None, negatives_mask=None)
        -> pair_up (gathers B, and A unless the class sets gather_a = False)
        -> terms(pairs, logit_scale)              {"loss": scalar, ...named terms}
        -> out["loss"] = pairs.finish(out["loss"])  (every rank runs the gather's backward)

Dense losses score each query against all its candidates: they implement
``row_losses(queries, candidates, pairs, logit_scale, explicit) -> (n,)`` and get both
directions from ``directions`` (explicit negatives join A->B only). ``candidates`` builds the
masks they share, for query i and candidate j::

    positive   j is i's own pair, or (same_group="positive") shares i's group
    negative   j is neither i's pair nor in i's group (either mode), or a present explicit negative
    ignored    neither: same group under "ignore", absent explicit negatives

Parameters: a loss takes keyword arguments only, each annotated with a precise type
(``SameGroup``, bool, int, float) and given a default. ``Loss.Config`` is the dataclass of
exactly those (same names, types, defaults), made from the constructor when the class is
defined, so the two cannot drift; ``Loss.from_config(Loss.Config(beta=0.5))`` builds the loss.
Value checks (ranges) stay in the constructor and raise ValueError.
"""
from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any, ClassVar, Dict, Literal, Optional, Tuple, get_args

import torch
from torch import Tensor, nn

from align.losses.pairs import PairedBatch, pair_up

SameGroup = Literal["ignore", "positive"]
SAME_GROUP_MODES = get_args(SameGroup)


def check_same_group(mode: str) -> str:
    if mode not in SAME_GROUP_MODES:
        raise ValueError(f"same_group must be one of {SAME_GROUP_MODES}, got {mode!r}")
    return mode


def keyword_config(loss_cls: type) -> type:
    """The dataclass of ``loss_cls``'s keyword parameters: same names, types and defaults."""
    hints = typing.get_type_hints(loss_cls.__init__)
    fields = []
    for name, param in list(inspect.signature(loss_cls.__init__).parameters.items())[1:]:
        if param.kind is not inspect.Parameter.KEYWORD_ONLY:
            raise TypeError(f"{loss_cls.__name__}.__init__: parameter {name!r} must be keyword-only")
        default = dataclasses.field() if param.default is param.empty else dataclasses.field(default=param.default)
        fields.append((name, hints.get(name, Any), default))
    config = dataclasses.make_dataclass("Config", fields, kw_only=True)
    config.__module__, config.__qualname__ = loss_cls.__module__, f"{loss_cls.__qualname__}.Config"
    config.__doc__ = f"Keyword parameters of ``{loss_cls.__name__}`` (see its module docstring)."
    return config


class PairLoss(nn.Module):
    """Base of the pairwise contrastive losses: one forward signature, one gather, shared masks.

    Args:
        gather: across ranks, all-gather candidates with gradients and score local rows against
            them (see ``pairs.py`` for the normalisation); False scores the local batch only.
        same_group: what a candidate in the query's group (other than its own pair) is:
            "ignore" (left out) or "positive" (multi-positive).
    """

    gather_a: ClassVar[bool] = True  # whether A is gathered too (False: only A->B is scored)
    Config: ClassVar[type]  # made per subclass from its constructor (see the module doc)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "Config" not in cls.__dict__:  # a class may still spell its own out
            cls.Config = keyword_config(cls)

    def __init__(self, *, gather: bool = True, same_group: SameGroup = "ignore") -> None:
        super().__init__()
        self.gather = bool(gather)
        self.same_group = check_same_group(same_group)

    @classmethod
    def from_config(cls, config: Any) -> "PairLoss":
        """Build the loss from its ``Config``: the same as calling it with the fields as keywords."""
        if type(config) is not cls.Config:
            raise TypeError(f"{cls.__name__}.from_config takes a {cls.__name__}.Config, got {type(config).__name__}")
        return cls(**dataclasses.asdict(config))

    @property
    def needs_logit_scale(self) -> bool:
        return True

    def forward(
        self, a: Tensor, b: Tensor, *, logit_scale: Optional[Tensor] = None, valid: Optional[Tensor] = None,
        groups: Optional[Tensor] = None, negatives: Optional[Tensor] = None,
        negatives_mask: Optional[Tensor] = None,
    ) -> Dict[str, Tensor]:
        """a, b (B, D); logit_scale scalar (already exp'd); valid (B,) bool; groups (B,) int64
        (-1 = none); negatives (B, K, D) modality-B hard negatives of a[i]; negatives_mask (B, K).
        Returns {"loss": scalar, ...named terms}, this rank's shares under ``gather``."""
        if logit_scale is None and self.needs_logit_scale:
            raise ValueError(f"{type(self).__name__} needs logit_scale")
        pairs = pair_up(a, b, valid=valid, groups=groups, negatives=negatives, negatives_mask=negatives_mask,
                        gather=self.gather, gather_a=self.gather_a)
        out = self.terms(pairs, logit_scale)
        out["loss"] = pairs.finish(out["loss"])
        return out

    def terms(self, pairs: PairedBatch, logit_scale: Optional[Tensor]) -> Dict[str, Tensor]:
        """The loss's terms on a paired batch: {"loss": scalar, ...}; the hook every loss implements."""
        raise NotImplementedError

    def row_losses(self, queries: Tensor, candidates: Tensor, pairs: PairedBatch, logit_scale: Optional[Tensor],
                   explicit: Optional[Tensor]) -> Tensor:
        """(n,) loss of every query (n, D) against ``candidates`` (N, D) and, when given, its
        explicit negatives' scores (n, K); the hook of dense losses that use ``directions``."""
        raise NotImplementedError

    def directions(self, pairs: PairedBatch, logit_scale: Optional[Tensor],
                   explicit: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """(a2b, b2a): ``row_losses`` summed over this rank's rows, times ``pairs.scale``.
        A->B queries are a_rows against b_cols plus ``explicit`` (n, K); B->A, b_rows against a_cols."""
        a2b = self.row_losses(pairs.a_rows, pairs.b_cols, pairs, logit_scale, explicit).sum() * pairs.scale
        b2a = self.row_losses(pairs.b_rows, pairs.a_cols, pairs, logit_scale, None).sum() * pairs.scale
        return a2b, b2a

    def candidates(self, scores: Tensor, pairs: PairedBatch,
                   explicit: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """Scores and masks over each query's candidates (see the module doc).

        scores (n, N): against the gathered candidates; explicit (n, K) or None: against the
        query's explicit negatives, appended as candidates that are never positives.
        Returns (scores, positives, negatives), each (n, N) or (n, N + K).
        """
        positives = pairs.positive_mask()  # (n, N)
        same = pairs.same_group_mask()
        if same is None:
            negatives = ~positives
        else:
            negatives = ~positives & ~same  # a group mate is never a negative
            if self.same_group == "positive":
                positives = positives | same
        if explicit is not None:
            scores = torch.cat([scores, explicit], dim=1)  # (n, N + K)
            positives = torch.cat([positives, torch.zeros_like(explicit, dtype=torch.bool)], dim=1)
            negatives = torch.cat([negatives, pairs.negatives_mask], dim=1)
        return scores, positives, negatives
