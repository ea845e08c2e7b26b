"""Which history items made the head recommend an item, and by how much.

The head's score of item i for a history H is the cosine ``s(H, i) = <u(H), v_i>`` of the user
vector (the user encoder over the item-tower vectors of H's newest ``head.history`` entries,
align/rec/head.py) and the item vector. Each entry j of H gets a contribution to s, by one of:

* ``leave_one_out`` (exact): ``c_j = s(H, i) - s(H without entry j, i)``, the history re-scored
  with the entry removed, as ``align recommend`` would read it (an older entry slides into the
  window when one is removed). One batched forward of the user encoder over len(window) + 1
  histories serves all k items: cheap while the window is short.
* ``gradient_x_input`` (first order): ``c_j = <d s / d x_j, x_j>`` with x_j the entry's item-tower
  vector as the user encoder reads it; one backward per item. For the mean encoder it ranks the
  entries exactly as the first-order expansion of leave-one-out does: removing j moves the mean
  by (mean - x_j) / (n - 1), and the mean's term is the same for every j.

``auto`` takes leave-one-out up to ``loo_max`` entries read, the gradient above. Entries older
than the window are not read by the head: they contribute nothing and are only counted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence, Tuple

import numpy as np
import torch

Recommender = Any  # an align.rec.recommend.Recommender: not imported, as align recommend / align search import this package

Method = Literal["auto", "leave_one_out", "gradient_x_input"]
METHODS = ("auto", "leave_one_out", "gradient_x_input")
LOO_MAX = 32  # ``auto``: leave-one-out while the head reads at most this many entries


@dataclass
class HistoryContributions:
    """What each history entry the head reads added to each explained item's score.

    Attributes:
        method: "leave_one_out" or "gradient_x_input".
        positions: (P,) the read entries' positions in the history (0 = oldest).
        values: (P, k) float64 contribution of entry positions[p] to item k's score.
        scores: (k,) float64 the head's cosine of each item with the whole history.
        unread: older entries the head's window (``head.history``) leaves out.
    """

    method: str
    positions: np.ndarray
    values: np.ndarray
    scores: np.ndarray
    unread: int

    def ranking(self, column: int) -> np.ndarray:
        """(P,) indices into ``positions``, largest contribution to item ``column`` first."""
        return np.argsort(-self.values[:, column], kind="stable")


def read_positions(length: int, window: int) -> np.ndarray:
    """(P,) positions of the entries a head with a ``window``-entry history reads (the newest)."""
    return np.arange(max(0, length - window), length)


def resolve_method(method: Method, read: int, loo_max: int = LOO_MAX) -> str:
    """The method ``method`` stands for with ``read`` entries read (``auto`` picks by ``loo_max``)."""
    if method not in METHODS:
        raise ValueError(f"explanation method {method!r}: use one of {', '.join(METHODS)}")
    if method != "auto":
        return method
    return "leave_one_out" if read <= loo_max else "gradient_x_input"


def window_inputs(recommender: "Recommender", history: Sequence[int], removed: Sequence[int] = ()
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """What the user encoder reads for ``history`` (item rows, oldest first) and for it with each
    of the entries at ``removed`` (read positions) taken out: (inputs (1 + P, L, dim) the entries'
    item-tower vectors, zero in padding; mask (1 + P, L) bool), left-padded to L = ``head.history``
    as ``Recommender.user_vectors`` pads. The item tower runs once per distinct item."""
    length = recommender.config.head.history
    history = [int(r) for r in history]
    last = history[-(length + 1):]  # the window and the entry that slides in when one is removed
    start = len(history) - (length + 1)  # the history position of full[0] (negative: padding)
    full = np.array([-1] * (length + 1 - len(last)) + last, dtype=np.int64)  # (L + 1,)
    if any(not len(history) - length <= p < len(history) for p in removed):
        raise ValueError(f"removed positions {list(removed)}: only the newest {length} of {len(history)} are read")
    slots = torch.from_numpy(np.stack([full[1:]] + [np.delete(full, p - start) for p in removed]))  # (1 + P, L)
    mask = slots >= 0
    rows, inverse = torch.unique(slots[mask], return_inverse=True)  # the distinct items, once each
    vectors = recommender.head.items(recommender.features[rows], recommender.id_rows[rows])  # (R, dim)
    inputs = vectors.new_zeros(*slots.shape, vectors.shape[-1])  # (1 + P, L, dim)
    inputs[mask] = vectors[inverse]
    return inputs, mask


@torch.no_grad()
def removal_scores(recommender: "Recommender", history: Sequence[int], items: Sequence[int],
                   positions: Sequence[int]) -> np.ndarray:
    """(1 + P, k) float64: the head's cosine of each of ``items`` (catalogue rows) with the whole
    ``history`` (row 0) and with the read entry at each of ``positions`` removed (rows 1..P). One
    forward of the user encoder for all of them."""
    inputs, mask = window_inputs(recommender, history, positions)
    users = recommender.head.users(inputs, mask)  # (1 + P, dim)
    return (users.double() @ recommender.item_vectors[list(items)].double().T).numpy()  # (1 + P, k)


def gradient_x_input(recommender: "Recommender", history: Sequence[int], items: Sequence[int]) -> np.ndarray:
    """(P, k) float64 ``<d s_k / d x_j, x_j>`` for the P entries the head reads (oldest first)."""
    targets = recommender.item_vectors[list(items)]  # (k, dim)
    with torch.no_grad():
        inputs, mask = window_inputs(recommender, history)  # (1, L, dim), (1, L)
    with torch.enable_grad():
        # One copy of the history per item, so one backward gives every item's gradient.
        x = inputs.expand(len(targets), -1, -1).clone().requires_grad_(True)  # (k, L, dim)
        users = recommender.head.users(x, mask.expand(len(targets), -1))  # (k, dim)
        (users * targets).sum().backward()
    contribution = (x.grad * x.detach()).sum(-1).double()  # (k, L)
    read = int(mask.sum())
    return contribution[:, mask.shape[1] - read:].T.numpy()  # (P, k), the read slots are the last ones


def history_contributions(recommender: "Recommender", history: Sequence[int], items: Sequence[int],
                          method: Method = "auto", loo_max: int = LOO_MAX) -> HistoryContributions:
    """Each read history entry's contribution to each of ``items``' scores (module docstring).

    Args:
        recommender: a loaded head (``Recommender.load``).
        history: the user's item rows (catalogue rows of ``recommender.item_ids``), oldest first.
        items: the explained items' rows (k of them).
        method: "auto", "leave_one_out" or "gradient_x_input".
        loo_max: with "auto", leave-one-out up to this many read entries.
    """
    history, items = [int(r) for r in history], [int(r) for r in items]
    positions = read_positions(len(history), recommender.config.head.history)
    chosen = resolve_method(method, len(positions), loo_max)
    if chosen == "leave_one_out":
        scores = removal_scores(recommender, history, items, positions.tolist())
        full, values = scores[0], scores[0][None, :] - scores[1:]
    else:
        full = removal_scores(recommender, history, items, [])[0]
        values = gradient_x_input(recommender, history, items) if len(positions) else np.zeros((0, len(items)))
    return HistoryContributions(method=chosen, positions=positions, values=values, scores=full,
                                unread=len(history) - len(positions))
