"""InfoNCE with several graded positives per query: relevance-weighted, multi-positive.

GCL (Zhu, Jung & Clark 2024, "Generalized Contrastive Learning for Multi-Modal Retrieval and
Ranking", https://arxiv.org/abs/2404.08535) trains on (query, product, relevance score) and
weights each pair's softmax cross-entropy term by a weight mapped from its score, so that a
bought product is pulled closer than a merely viewed one. As we read it, GCL scores one positive
per row; a search log gives a query several graded products, often in the same batch, and
treating them as each other's negatives would push apart what the log says belongs together.
So here each positive is contrasted against the negatives only (the other positives leave its
denominator), and the terms are weighted by the graded relevance.

For query i with logits z_ij = s * <a_i, b_j> (s = ``logit_scale``), P_i its positives (the
candidates whose product it has a grade g_ij > 0 for), w_ij = f(g_ij) their weights, and N_i its
negatives (every other candidate, minus same-group ones under ``same_group="ignore"``, plus its
present explicit negatives)::

    l_ij = -log( exp(z_ij) / (exp(z_ij) + sum_{k in N_i} exp(z_ik)) )
         = softplus( logsumexp_{k in N_i} z_ik - z_ij )

    normalise="query":  a2b = 1/N   sum_i  sum_{j in P_i} w_ij l_ij / sum_{j in P_i} w_ij
    normalise="pair":   a2b = sum_i sum_{j in P_i} w_ij l_ij  /  sum_i sum_{j in P_i} w_ij

"query" counts every query once and lets the grades order its own products; "pair" is GCL's
weighting: a strongly relevant pair counts more than a weakly relevant one across the batch.
With one positive per query, of any weight under "query" or of weight 1 under "pair", l_ii is
plain InfoNCE's row term and a2b equals ``infonce``'s a2b (the same maths, different rounding).

b2a is the same with the roles swapped: product j (row b_j) against every query of the batch,
its positives the queries that grade it (g_ij > 0, transposed), with the same weights; explicit
negatives join a2b only, as in ``infonce``. ``loss = (a2b + b2a) / 2``, or ``a2b`` alone with
``symmetric=False`` (then the queries are not gathered).

Grade -> weight, f (``weighting``): "linear" w = g; "log" w = log2(1 + g) (the DCG gain shape:
buys count more than views, with diminishing returns); "table" w = ``table[g]``, e.g.
``table: {1: 0.3, 2: 0.6, 3: 1.0}`` (grades missing from the table are an error). Grades <= 0
mean "not relevant": such a candidate stays a negative.

Groups: under ``same_group="ignore"`` a same-group candidate without a grade is left out of the
query's candidates; under "positive" it is a positive weighted as the query's own pair. A graded
candidate is a positive whatever its group.

Relevance input (per row, so that it survives the cross-rank gather; all three or none, on
every rank alike)::

    item_keys        (B,)    int64   key of row i's product b_i (a catalogue id, >= 0)
    positive_keys    (B, P)  int64   keys of the products query a_i has grades for; -1 = padding.
                                     Must list a_i's own product item_keys[i].
    positive_grades  (B, P)  float   their grades (view 1, cart 2, buy 3 ...)

The loss gathers the keys, and the weights mapped from the grades, from every rank (without
gradient) and matches them by key against the gathered products, so the relevance follows the
gathered candidate order whatever the ranks hold; a product present in several rows is matched
at each of them. Without the relevance input every query's only positive is its own pair with
weight 1: plain InfoNCE.

Args:
    weighting: "linear", "log" or "table" (see above).
    table: grade -> weight for ``weighting="table"`` (YAML keys are read as strings: "1", "2.5").
    normalise: "query" or "pair" (see above).
    symmetric: also score b -> a.
    gather: across ranks, all-gather candidates with gradients (``pairs.py``).
    same_group: "ignore" or "positive".

Inputs: a (B, D) queries, b (B, D) products, L2-normalised; logit_scale scalar (already exp'd);
valid (B,) bool; groups (B,) int64 (-1 = none); negatives (B, K, D) products that are hard
negatives of a[i]; negatives_mask (B, K) bool; the relevance input above.

Returns: {"loss", "a2b"[, "b2a"]}, scalars; under ``gather`` with several ranks each value is
this rank's share: its mean over ranks is the global value.

The dense (n, N) logits are built as in ``infonce``; ``graded_infonce_tiled``
(``graded_tiled.py``) is the same loss without them. The positives travel as a sparse list of
(query row, candidate column, weight) triples (``PositivePairs``), so both scorers share the
matching and the normalisation.

Related: ``infonce`` (one positive; its ``same_group="positive"`` is SupCon's L_out, one
softmax over all positives together, unweighted), ``sampled_softmax``.

Example::

    loss = GradedInfoNCE(weighting="table", table={"1": 0.3, "2": 0.6, "3": 1.0})
    out = loss(queries, products, logit_scale=s, item_keys=ids, positive_keys=keys, positive_grades=grades)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Literal, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from align.losses.base import PairLoss, SameGroup
from align.losses.gather import gather_no_grad, gather_sizes
from align.losses.pairs import MASKED_LOGIT, PairedBatch, negative_logits, pair_up, upcast

Weighting = Literal["linear", "log", "table"]
Normalise = Literal["query", "pair"]


def parse_table(table: Optional[Mapping]) -> Dict[float, float]:
    """``{"1": 0.3, 2: 0.6}`` -> {1.0: 0.3, 2.0: 0.6}; keys are grades, values weights > 0."""
    parsed = {}
    for key, value in (table or {}).items():
        try:
            grade = float(key)
        except (TypeError, ValueError):
            raise ValueError(f"table: key {key!r} is not a grade (a number)") from None
        if not float(value) > 0:
            raise ValueError(f"table: grade {key!r} has weight {value!r}; weights must be > 0")
        parsed[grade] = float(value)
    return parsed


@dataclass
class PositivePairs:
    """The positives of one direction as a sparse list, one entry per (query, candidate) pair:
    rows (E,) local query row, cols (E,) candidate column, weights (E,) > 0. Sorted by
    (row, col), no pair twice; every query's own pair is listed."""

    rows: Tensor
    cols: Tensor
    weights: Tensor

    def dense(self, n_rows: int, n_cols: int) -> Tensor:
        """(n_rows, n_cols) weights, 0 off the positives."""
        out = self.weights.new_zeros(n_rows, n_cols)
        out[self.rows, self.cols] = self.weights
        return out


def unique_pairs(rows: Tensor, cols: Tensor, weights: Tensor, n_cols: int) -> PositivePairs:
    """Sorted, one entry per (row, col); a pair given several times keeps its largest weight."""
    linear, inverse = torch.unique(rows * n_cols + cols, return_inverse=True)  # sorted
    best = weights.new_zeros(linear.shape[0]).scatter_reduce(0, inverse, weights, "amax", include_self=False)
    return PositivePairs(rows=linear // n_cols, cols=linear % n_cols, weights=best)


def equal_positions(wanted: Tensor, values: Tensor) -> Tuple[Tensor, Tensor]:
    """Every (w, v) with wanted[w] == values[v], without a (len(wanted), len(values)) matrix.

    Sorts ``values`` once and finds each wanted value's run by binary search: O((W + V) log V
    + matches). Returns (w, v) index tensors, grouped by w.
    """
    sorted_values, order = torch.sort(values)
    first = torch.searchsorted(sorted_values, wanted)
    count = torch.searchsorted(sorted_values, wanted, right=True) - first  # (W,) run lengths
    starts = torch.repeat_interleave(first, count)
    within = torch.arange(starts.shape[0], device=values.device) - torch.repeat_interleave(count.cumsum(0) - count, count)
    return torch.repeat_interleave(torch.arange(wanted.shape[0], device=values.device), count), order[starts + within]


def match_pairs(query_keys: Tensor, query_weights: Tensor, item_keys: Tensor) -> PositivePairs:
    """Each query's listed products at every candidate holding them, as a sparse list.

    query_keys (q, P) int64 with -1 padding, query_weights (q, P) (0 = not relevant),
    item_keys (c,). A key listed twice keeps its largest weight; a key held by several
    candidates is matched at each. No (q, c) matrix is made.
    """
    slots = (query_keys >= 0) & (query_weights > 0)  # (q, P)
    rows = torch.arange(query_keys.shape[0], device=query_keys.device)[:, None].expand_as(query_keys)[slots]
    keys, weights = query_keys[slots], query_weights[slots]  # (S,) listed slots
    slot, cols = equal_positions(keys, item_keys)
    return unique_pairs(rows[slot], cols, weights[slot], max(item_keys.shape[0], 1))


def own_pairs(pairs: PairedBatch, dtype: torch.dtype) -> PositivePairs:
    """Every query's own pair, weight 1 (no relevance input: plain InfoNCE)."""
    rows = torch.arange(pairs.n_rows, device=pairs.row_index.device)
    return PositivePairs(rows=rows, cols=pairs.row_index, weights=torch.ones(pairs.n_rows, dtype=dtype,
                                                                           device=rows.device))


class GradedInfoNCE(PairLoss):
    """Relevance-weighted multi-positive InfoNCE (see the module doc for formula and inputs)."""

    def __init__(self, *, weighting: Weighting = "linear", table: Optional[Dict[str, float]] = None,
                 normalise: Normalise = "query", symmetric: bool = True, gather: bool = True,
                 same_group: SameGroup = "ignore") -> None:
        super().__init__(gather=gather, same_group=same_group)
        if weighting not in ("linear", "log", "table"):
            raise ValueError(f"weighting must be linear, log or table, got {weighting!r}")
        if normalise not in ("query", "pair"):
            raise ValueError(f"normalise must be query or pair, got {normalise!r}")
        if weighting == "table" and not table:
            raise ValueError("weighting: table needs table, e.g. {1: 0.3, 2: 0.6, 3: 1.0}")
        if weighting != "table" and table:
            raise ValueError(f"table is read only with weighting: table (weighting is {weighting!r})")
        self.weighting = weighting
        self.table = parse_table(table)
        self.normalise = normalise
        self.symmetric = bool(symmetric)

    def weights(self, grades: Tensor) -> Tensor:
        """Grade -> weight, elementwise; 0 where grade <= 0 (not relevant)."""
        relevant = grades > 0
        safe = torch.where(relevant, grades, torch.ones_like(grades))
        if self.weighting == "linear":
            weight = safe
        elif self.weighting == "log":
            weight = torch.log2(1 + safe)
        else:
            keys = torch.tensor(list(self.table), dtype=grades.dtype, device=grades.device)  # (T,)
            values = torch.tensor(list(self.table.values()), dtype=grades.dtype, device=grades.device)
            match = safe[..., None] == keys  # (..., T)
            unknown = relevant & ~match.any(-1)
            if unknown.any():
                raise ValueError(f"grade {grades[unknown][0].item()!r} has no entry in table "
                                 f"(grades: {sorted(self.table)}); add it to loss.params.table")
            weight = (match.to(grades.dtype) * values).sum(-1)
        return torch.where(relevant, weight, torch.zeros_like(weight))

    # ------------------------------------------------------------------ forward

    def forward(self, a: Tensor, b: Tensor, *, logit_scale: Optional[Tensor] = None, valid: Optional[Tensor] = None,
                groups: Optional[Tensor] = None, negatives: Optional[Tensor] = None,
                negatives_mask: Optional[Tensor] = None, item_keys: Optional[Tensor] = None,
                positive_keys: Optional[Tensor] = None, positive_grades: Optional[Tensor] = None,
                ) -> Dict[str, Tensor]:
        """As ``PairLoss.forward`` plus the relevance input (module doc): item_keys (B,),
        positive_keys (B, P) and positive_grades (B, P), all three or none."""
        if logit_scale is None:
            raise ValueError(f"{type(self).__name__} needs logit_scale")
        given = [x is not None for x in (item_keys, positive_keys, positive_grades)]
        if any(given) and not all(given):
            raise ValueError(f"{type(self).__name__}: give item_keys, positive_keys and positive_grades "
                             f"together, or none")
        pairs = pair_up(a, b, valid=valid, groups=groups, negatives=negatives, negatives_mask=negatives_mask,
                        gather=self.gather, gather_a=self.symmetric)
        if all(given):
            positives_ab, positives_ba = self.relevance_pairs(pairs, valid, item_keys, positive_keys, positive_grades)
        else:  # own pair only, weight 1: plain InfoNCE
            positives_ab = positives_ba = own_pairs(pairs, upcast(pairs.a_rows).dtype)
        out = self.score(pairs, positives_ab, positives_ba, logit_scale)
        out["loss"] = (out["a2b"] + out["b2a"]) / 2 if self.symmetric else out["a2b"]
        out["loss"] = pairs.finish(out["loss"])
        return out

    def relevance_pairs(self, pairs: PairedBatch, valid: Optional[Tensor], item_keys: Tensor,
                        positive_keys: Tensor, positive_grades: Tensor) -> Tuple[PositivePairs, PositivePairs]:
        """The positives of each local query among the gathered products (a2b), and of each
        local product among the gathered queries (b2a)."""
        rows = item_keys.shape[0]
        if item_keys.shape != (rows,) or positive_keys.dim() != 2 or positive_keys.shape[0] != rows \
                or positive_grades.shape != positive_keys.shape:
            raise ValueError(f"item_keys must be (B,), positive_keys and positive_grades (B, P); got "
                             f"{tuple(item_keys.shape)}, {tuple(positive_keys.shape)}, {tuple(positive_grades.shape)}")
        dtype = upcast(pairs.a_rows).dtype
        valid = torch.ones(rows, dtype=torch.bool, device=item_keys.device) if valid is None else valid.to(torch.bool)
        keys = positive_keys.long()
        list_weights = self.weights(positive_grades.to(dtype)) * (keys >= 0)  # (B, P)
        own = ((keys == item_keys.long()[:, None]) & (list_weights > 0)).any(1)  # (B,)
        missing = (valid & ~own).nonzero(as_tuple=True)[0]
        if missing.numel():
            row = int(missing[0])
            raise ValueError(f"row {row}: positive_keys does not list the row's own product "
                             f"(item_keys[{row}] = {int(item_keys[row])}) with a grade > 0")
        local_items, local_keys, local_weights = item_keys.long()[valid], keys[valid], list_weights[valid]
        if pairs.world > 1:  # every rank's lists, in the gathered (rank, valid row) order
            sizes = gather_sizes(rows, item_keys.device)
            widths = gather_sizes(keys.shape[1], item_keys.device)  # P may differ by rank
            width = max(widths)
            pad = width - keys.shape[1]
            keys_all = gather_no_grad(F.pad(keys, (0, pad), value=-1), sizes)
            weights_all = gather_no_grad(F.pad(list_weights, (0, pad)), sizes)
            valid_all = gather_no_grad(valid, sizes)
            items_all = gather_no_grad(item_keys.long(), sizes)
            col_items, col_keys, col_weights = items_all[valid_all], keys_all[valid_all], weights_all[valid_all]
        else:
            col_items, col_keys, col_weights = local_items, local_keys, local_weights
        positives_ab = match_pairs(local_keys, local_weights, col_items)
        # b2a: gathered queries (rows of the match) grading local products, seen from the products
        by_query = match_pairs(col_keys, col_weights, local_items)
        positives_ba = unique_pairs(by_query.cols, by_query.rows, by_query.weights, max(col_items.shape[0], 1))
        return positives_ab, positives_ba

    def score(self, pairs: PairedBatch, positives_ab: PositivePairs, positives_ba: PositivePairs,
              logit_scale: Tensor) -> Dict[str, Tensor]:
        """{"a2b"[, "b2a"]}: this rank's shares of each direction (dense (n, N) logits)."""
        n, m = pairs.n_rows, pairs.b_cols.shape[0]
        out = {"a2b": self.direction(pairs.a_rows, pairs.b_cols, positives_ab.dense(n, m), pairs, logit_scale,
                                     negative_logits(pairs, logit_scale))}
        if self.symmetric:
            out["b2a"] = self.direction(pairs.b_rows, pairs.a_cols, positives_ba.dense(n, m), pairs, logit_scale, None)
        return out

    def direction(self, queries: Tensor, candidates: Tensor, weights: Tensor, pairs: PairedBatch,
                  logit_scale: Tensor, explicit: Optional[Tensor]) -> Tensor:
        """This rank's share of one direction: weighted multi-positive terms, normalised."""
        logits = logit_scale * upcast(queries) @ upcast(candidates).T  # (n, N)
        positives = weights > 0
        same = pairs.same_group_mask()
        if same is not None:
            mates = same & ~positives
            if self.same_group == "positive":  # an ungraded group mate weighs as the own pair
                own = weights.gather(1, pairs.row_index[:, None])  # (n, 1)
                weights = torch.where(mates, own.expand_as(weights), weights)
                negatives = ~positives & ~mates
                positives = positives | mates
            else:
                negatives = ~positives & ~mates
        else:
            negatives = ~positives
        if explicit is not None:
            logits = torch.cat([logits, explicit], dim=1)  # (n, N + K)
            weights = torch.cat([weights, torch.zeros_like(explicit)], dim=1)
            negatives = torch.cat([negatives, pairs.negatives_mask], dim=1)
        negative_lse = torch.logsumexp(logits.masked_fill(~negatives, MASKED_LOGIT), dim=1)  # (n,)
        # l_ij = -log(e^z_ij / (e^z_ij + sum_neg e^z_ik)); zero weight off the positives
        terms = weights * F.softplus(negative_lse[:, None] - logits)  # (n, N + K)
        return self.normalised(terms.sum(1), weights.sum(1), pairs)

    def normalised(self, row_terms: Tensor, row_weights: Tensor, pairs: PairedBatch) -> Tensor:
        """This rank's share of a direction from each local query's weighted term sum (n,) and
        weight sum (n,): per query ("query") or per pair over every rank's weights ("pair")."""
        if self.normalise == "query":
            return (row_terms / row_weights.clamp(min=torch.finfo(row_weights.dtype).tiny)).sum() * pairs.scale
        total = row_weights.sum().detach()
        if pairs.world > 1:
            total = total.clone()
            dist.all_reduce(total)
        return row_terms.sum() * pairs.world / total.clamp(min=torch.finfo(total.dtype).tiny)
