"""Ring exchange for the tiled InfoNCE and SigLIP across ranks (Inf-CL): no rank holds every
rank's features.

Inf-CL (Cheng et al. 2024, https://arxiv.org/abs/2410.17243, "multi-level tiling"): instead of
all-gathering the candidates (N, D) on every rank, each rank keeps its own rows and the blocks of
the others pass round a ring, one hop a step, while the current block's tiles are computed. Rank
r holds its queries a_r (n_r, D) and keys b_r (n_r, D); the logit matrix of the whole batch is
the grid of blocks z(r, s) = s_logit a_r b_s^T. Block (r, s) gives

    rows     lse over the keys of rank s of every query of rank r: A->B of r's rows (stays on r)
    columns  lse over the queries of rank r of every key of rank s: B->A of s's rows (travels
             with b_s and is home after one round)

so one pass of the key blocks gives both directions with one GEMM a tile, n_r x N per rank,
the same FLOPs as one process spends on its N x N (the gathered path spends two).

What travels, hop by hop to rank + 1 (unequal and empty blocks are fine: every rank knows every
block's size from one small all-gather, and empty tensors are not sent)::

    forward   b_s (n_s, D), group ids (n_s,)            sent ahead: overlaps the current tiles
              column lse of b_s (n_s,) fp32              sent after its tiles, overlapping the next
    backward  b_s, group ids, lse and grad of b_s's columns (n_s,) each      sent ahead
              dL/db_s (n_s, D) fp32, summed over the ranks it has visited    one hop behind

The accumulators (column lse, dL/db_s) are one hop behind their block: a rank computes its
block's partial result into a fresh buffer while the running sum arrives, adds the two, and
sends the sum on with the next step's transfers; after the last step each accumulator takes a
final hop home. Each pass is ``world`` steps; forward one pass (plus one exact pass when the
shared-shift check below fails on any rank), backward one pass. Memory per rank: two key blocks
(the current and the arriving one), three (n_max, D) fp32 gradient buffers, the local (n_r, D)
gradient and one (tile, tile) logit buffer: O(n_max D + tile^2), whatever the world size.

Gradients: rank r's backward returns, for a_r and b_r, the gradient of *every* rank's loss
terms (what ``gather_with_grad``'s backward returns), and for the logit scale the part of
sum_ij G_ij z_ij / s from its row blocks; summed over ranks (DDP averages, the loss scales by
world / N) that is the single-process gradient, as with the gather.

Multi-positive groups (same_group="positive"): the positive term needs, for each local row,
the mean of every rank's rows in its group; ``ring_group_mean`` passes (rows, group ids) blocks
round once and adds each block's per-group sums to the local rows of those groups (backward:
the same pass over grad / count, "same group" being symmetric). O(n D) per rank as well.

Precision and kernels: per block, ``align.losses.tiled``'s torch kernels (one shared shift
c = s max|a| max|b| over all ranks, the exact per-tile maxima when some lse lies more than
``SAFE_MARGIN`` below c on any rank) or the Triton kernels on CUDA (``tiled_backend``).

SigLIP (``ring_sigmoid_pairs``, ``siglip_tiled``'s exchange="ring"): rank r's terms are
softplus(-y_ij (s <a_i, b_j> + t)) of its rows a_i against every rank's keys b_j, block (r, s)
by block. No term needs a sum over a column (no B->A direction, no column lse), so the forward
sends only the key blocks and no accumulator comes home::

    forward   b_s (n_s, D), group ids (n_s,)                          sent ahead
              (the positive and negative sums of block (r, s) stay on r, fp64)
    backward  b_s, group ids                                          sent ahead
              dL/db_s (n_s, D) fp32, summed over the ranks it has visited   one hop behind

One pass each way; rank r keeps dL/da_r and the scale and bias gradients of its own terms, and
b_s's gradient comes home summed over every rank's terms, as through the gather. Memory per
rank as above: O(n_max D + tile^2). Explicit hard negatives stay with the caller (local rows).

The loss scales each rank's sum by world / N (``ring_pairs``: N valid rows over all ranks),
the gathered path's convention, so DDP's average of the gradients is the single-process one.

Every rank must call ``ring_logsumexp`` / ``ring_sigmoid_pairs`` (and run their backward) the
same number of times in the same order, with or without rows: they are sequences of collectives.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, List, Literal, Optional, Sequence, Tuple, get_args

import torch
import torch.distributed as dist
from torch import Tensor

from align.losses.gather import world_info
from align.losses.pairs import PairedBatch, pair_up
from align.losses.tiled import (DEFAULT_TILE, SAFE_MARGIN, _accumulate, _finish_query_grads, _lse_exact,
                                _lse_shared_shift, _masked_logits, _sigmoid_grads, _sigmoid_sums, check_tile_size,
                                tiled_backend)

Exchange = Literal["gather", "ring"]  # how a tiled loss meets the other ranks' rows


def check_exchange(loss: str, exchange: str) -> str:
    """``exchange`` when it is one of ``Exchange``; else a ValueError naming the loss and the key."""
    if exchange not in get_args(Exchange):
        raise ValueError(f"{loss}: exchange must be one of {get_args(Exchange)}, got {exchange!r}")
    return exchange


@dataclass(frozen=True)
class RingLayout:
    """Who holds what: every rank's row count, whether any row has a group, the largest norms."""

    rank: int
    world: int
    sizes: Tuple[int, ...]  # valid rows of every rank, in rank order
    has_groups: bool  # some rank has a row with a group id >= 0: every rank sends group ids
    max_query_norm: float  # over all ranks: the shared shift c = s * max|a| * max|b|
    max_key_norm: float

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def offset(self, rank: int) -> int:
        """Column of rank ``rank``'s first row in the concatenated batch."""
        return sum(self.sizes[:rank])

    def block_at(self, step: int) -> int:
        """The rank whose key block this rank computes with at ``step`` (its own at step 0)."""
        return (self.rank - step) % self.world


def ring_layout(queries: Tensor, keys: Tensor, groups: Optional[Tensor]) -> RingLayout:
    """Every rank's row count, group flag and largest norms (one small all-gather; a collective).

    queries, keys (n_r, D) this rank's valid rows; groups (n_r,) int64 or None.
    """
    rank, world = world_info()
    stats = torch.tensor([
        queries.shape[0],
        float(groups is not None and bool((groups >= 0).any())),
        float(queries.detach().float().norm(dim=1).max()) if queries.shape[0] else 0.0,
        float(keys.detach().float().norm(dim=1).max()) if keys.shape[0] else 0.0,
    ], dtype=torch.float64, device=queries.device)
    if world > 1:
        every = [torch.empty_like(stats) for _ in range(world)]
        dist.all_gather(every, stats)
        stats_all = torch.stack(every).cpu()  # (world, 4)
    else:
        stats_all = stats[None].cpu()
    return RingLayout(rank=rank, world=world, sizes=tuple(int(n) for n in stats_all[:, 0].tolist()),
                      has_groups=bool(stats_all[:, 1].max() > 0), max_query_norm=float(stats_all[:, 2].max()),
                      max_key_norm=float(stats_all[:, 3].max()))


class RingExchange:
    """For a tiled ``PairLoss`` with ``exchange`` "gather" | "ring" whose ``terms`` take ``ring``:
    with "ring" on several ranks (and ``gather``), nothing is gathered; this rank's rows go to
    ``terms`` with the ring's layout. List it before the loss class (its ``forward`` comes first)."""

    exchange: Exchange = "gather"

    def forward(self, a: Tensor, b: Tensor, *, logit_scale: Optional[Tensor] = None, **inputs) -> Dict[str, Tensor]:
        """As ``PairLoss.forward``; with ``exchange="ring"`` on several ranks, nothing is gathered."""
        if self.exchange == "gather" or not self.gather or world_info()[1] == 1:
            return super().forward(a, b, logit_scale=logit_scale, **inputs)
        if logit_scale is None:
            raise ValueError(f"{type(self).__name__} needs logit_scale")
        pairs, ring = ring_pairs(a, b, **inputs)  # local rows; scale = world / N over every rank
        out = self.terms(pairs, logit_scale, ring=ring)
        out["loss"] = pairs.finish(out["loss"])
        return out


def ring_pairs(a: Tensor, b: Tensor, **inputs) -> Tuple[PairedBatch, RingLayout]:
    """This rank's valid rows and own pairs (nothing gathered) and the ring's layout (a collective).

    a, b (B, D) and ``inputs`` (valid, groups, negatives, negatives_mask) as ``pair_up``; the
    batch's ``scale`` is world / N over every rank's valid rows, the gathered path's convention,
    so DDP's averaging of the gradients gives the single-process ones.
    """
    pairs = pair_up(a, b, gather=False, **inputs)  # this rank's valid rows, its own pairs
    layout = ring_layout(pairs.a_rows, pairs.b_rows, pairs.row_groups)
    return dataclasses.replace(pairs, n_total=layout.total, world=layout.world), layout


# ------------------------------------------------------------------------------ the ring

def _post(layout: RingLayout, outgoing: Sequence[Tensor], incoming: Sequence[Tensor]) -> list:
    """Send ``outgoing`` to the next rank and receive ``incoming`` from the previous, non-blocking.

    Both ends know every shape, so both skip empty tensors alike. Batched (NCCL posts the sends
    and receives of a ring as one group; one by one, every rank's send would wait on a receive
    queued behind it). A tag per slot keeps gloo's matching per tensor.
    """
    next_rank, prev_rank = (layout.rank + 1) % layout.world, (layout.rank - 1) % layout.world
    ops = [dist.P2POp(dist.isend, t.contiguous(), next_rank, tag=tag) for tag, t in enumerate(outgoing) if t.numel()]
    ops += [dist.P2POp(dist.irecv, t, prev_rank, tag=tag) for tag, t in enumerate(incoming) if t.numel()]
    return dist.batch_isend_irecv(ops) if ops else []


def _circulate(layout: RingLayout, own_block: List[Tensor], empty_block: Callable[[int], List[Tensor]],
               compute: Callable[[List[Tensor], int], Optional[Tensor]],
               empty_partial: Optional[Callable[[int], Tensor]] = None,
               combine: Optional[Callable[[Tensor, Tensor], Tensor]] = None) -> Optional[Tensor]:
    """One round of the ring: every block visits every rank; returns this rank's own block's
    accumulator, home again (None without one).

    own_block: this rank's tensors (row-aligned); empty_block(rows) / empty_partial(rows):
    receive buffers for a block / an accumulator of ``rows`` rows; compute(block, owner): this
    rank's partial for the block at hand (its local accumulations happen inside);
    combine(running, partial): the accumulator after this rank.
    """
    block, running = own_block, None  # running: the accumulator of the previous step's block
    for step in range(layout.world):
        owner = layout.block_at(step)
        outgoing, incoming, arriving, arrived = [], [], None, None
        if step + 1 < layout.world:  # the next block, sent ahead
            arriving = empty_block(layout.sizes[layout.block_at(step + 1)])
            outgoing, incoming = list(block), list(arriving)
        if step > 0 and empty_partial is not None:  # the running sum of this block, one hop behind it
            arrived = empty_partial(layout.sizes[owner])
            outgoing, incoming = outgoing + [running], incoming + [arrived]
        works = _post(layout, outgoing, incoming)
        partial = compute(block, owner)  # overlaps the transfers
        for work in works:
            work.wait()
        running = partial if arrived is None else combine(arrived, partial)
        block = arriving
    if layout.world == 1 or empty_partial is None:
        return running
    home = empty_partial(layout.sizes[layout.rank])
    for work in _post(layout, [running], [home]):
        work.wait()
    return home


# --------------------------------------------------------------------- one block's tiles

def _block_lse(backend: str, queries: Tensor, keys: Tensor, scale: float, bound: Optional[float],
               row_index: Tensor, row_groups: Optional[Tensor], col_groups: Optional[Tensor],
               tile: int) -> Tuple[Tensor, Tensor]:
    """(n,) row and (m,) column lse of one block; ``bound``: the shared shift, None = exact maxima.

    row_index is relative to the block (a query's own pair outside it never matches).
    """
    if backend == "triton":
        from align.losses.tiled_triton import _lse  # imports Triton only when used
        rows = _lse(queries, keys, scale, row_index, row_groups, col_groups, tile, transposed=False)
        return rows, _lse(queries, keys, scale, row_index, row_groups, col_groups, tile, transposed=True)
    if bound is not None:
        return _lse_shared_shift(queries, keys, scale, bound, row_index, row_groups, col_groups, tile, True)
    return _lse_exact(queries, keys, scale, row_index, row_groups, col_groups, tile, True)


@dataclass
class _Weights:
    """The gradient weights of one side's lines: G_ij gets grad * exp(z_ij - lse) from each side;
    with the shared shift c, weight = grad * exp(c - lse) and one exp(z - c) serves both sides."""

    lse: Tensor
    grad: Tensor
    weight: Optional[Tensor]  # shared-shift path only


def _weights(lse: Tensor, grad: Tensor, bound: Optional[float]) -> _Weights:
    grad = grad.float().contiguous()
    return _Weights(lse, grad, None if bound is None else grad * torch.exp(bound - lse))


def _block_grads(backend: str, grad_q: Tensor, queries: Tensor, keys: Tensor, scale: float, bound: Optional[float],
                 row_index: Tensor, row_groups: Optional[Tensor], col_groups: Optional[Tensor], tile: int,
                 rows: _Weights, cols: _Weights) -> Tensor:
    """Adds sum_j G_ij k_j to grad_q (n, D) fp32; returns s * sum_i G_ij q_i (m, D) fp32."""
    if backend == "triton":
        from align.losses.tiled_triton import _grads
        weights = dict(lse_rows=rows.lse, grad_rows=rows.grad, lse_cols=cols.lse, grad_cols=cols.grad)
        part_q, _ = _grads(queries, keys, scale, row_index, row_groups, col_groups, tile, transposed=False, **weights)
        grad_q.add_(part_q)
        part_k, _ = _grads(queries, keys, scale, row_index, row_groups, col_groups, tile, transposed=True, **weights)
        return part_k.mul_(scale)
    n, m = queries.shape[0], keys.shape[0]
    grad_k = torch.zeros((m, keys.shape[1]), dtype=torch.float32, device=keys.device)
    z_buffer = torch.empty(min(tile, n) * min(tile, m), dtype=torch.float32, device=queries.device)
    g_buffer = torch.empty_like(z_buffer)
    keys_t = keys.T
    for i0 in range(0, n, tile):
        i1 = min(i0 + tile, n)
        for j0 in range(0, m, tile):
            j1 = min(j0 + tile, m)
            z = _masked_logits(z_buffer, queries, keys_t, scale, row_index, row_groups, col_groups, i0, i1, j0, j1)
            g = g_buffer[: z.numel()].view_as(z)
            if bound is not None:  # G = exp(z - c) (u_i + v_j)
                z.sub_(bound).exp_()
                torch.mul(z, rows.weight[i0:i1, None], out=g)
                g.addcmul_(z, cols.weight[None, j0:j1])
            else:  # G = g_i exp(z - lse_i) + g_j exp(z - lse_j); masked z = -inf gives 0
                torch.sub(z, rows.lse[i0:i1, None], out=g).exp_().mul_(rows.grad[i0:i1, None])
                z.sub_(cols.lse[None, j0:j1]).exp_().mul_(cols.grad[None, j0:j1])
                g.add_(z)
            _accumulate(grad_q[i0:i1], grad_k[j0:j1], g, keys[j0:j1], queries[i0:i1], scale)
    return grad_k


def _block_sigmoid_sums(backend: str, queries: Tensor, keys: Tensor, scale: float, bias: Tensor,
                        row_index: Tensor, row_groups: Optional[Tensor], col_groups: Optional[Tensor],
                        groups_positive: bool, tile: int) -> Tuple[Tensor, Tensor]:
    """fp64 sums of softplus(-y (z + t)) over one block's positive and negative pairs."""
    if backend == "triton":
        from align.losses.tiled_triton import _sigmoid_sums as fused_sums
        return fused_sums(queries, keys, scale, bias, row_index, row_groups, col_groups, groups_positive, tile)
    return _sigmoid_sums(queries, keys, scale, bias, row_index, row_groups, col_groups, groups_positive, tile)


def _block_sigmoid_grads(backend: str, grad_q: Tensor, queries: Tensor, keys: Tensor, scale: float, bias: Tensor,
                         row_index: Tensor, row_groups: Optional[Tensor], col_groups: Optional[Tensor],
                         groups_positive: bool, tile: int, grad_positive: Tensor,
                         grad_negative: Tensor) -> Tuple[Tensor, Tensor]:
    """Adds sum_j G_ij k_j to grad_q (n, D) fp32; returns s sum_i G_ij q_i (m, D) fp32 and the
    block's fp64 sum of G (its part of the bias gradient)."""
    if backend == "triton":
        from align.losses.tiled_triton import _sigmoid_grads as fused_grads
        part_q, grad_k, grad_bias = fused_grads(queries, keys, scale, bias, row_index, row_groups, col_groups,
                                                groups_positive, tile, grad_positive, grad_negative)
        grad_q.add_(part_q)
        return grad_k, grad_bias
    return _sigmoid_grads(grad_q, queries, keys, scale, bias, row_index, row_groups, col_groups, groups_positive,
                          tile, grad_positive, grad_negative)


# ------------------------------------------------------------------------------ autograd

class _Ring:
    """What both passes need: the local rows, their groups, where every block's columns start."""

    def __init__(self, queries: Tensor, keys: Tensor, groups: Optional[Tensor], layout: RingLayout,
                 scale: float, tile: int, backend: str) -> None:
        self.queries, self.keys, self.layout = queries.contiguous(), keys.contiguous(), layout
        self.scale, self.tile, self.backend = scale, tile, backend
        n = queries.shape[0]
        if layout.has_groups:
            self.groups = (torch.full((n,), -1, dtype=torch.long, device=queries.device) if groups is None
                           else groups.long().contiguous())
        else:
            self.groups = None
        # global column of each local row's own pair; minus a block's offset: its column in the block
        self.row_index = layout.offset(layout.rank) + torch.arange(n, device=queries.device)

    def own_block(self, *columns: Tensor) -> List[Tensor]:
        return [self.keys] + ([self.groups] if self.groups is not None else []) + list(columns)

    def empty_block(self, rows: int, columns: int) -> List[Tensor]:
        """Receive buffers: keys (rows, D), group ids (rows,) when any, ``columns`` fp32 (rows,)."""
        device = self.keys.device
        block = [torch.empty((rows, self.keys.shape[1]), dtype=self.keys.dtype, device=device)]
        if self.groups is not None:
            block.append(torch.empty(rows, dtype=torch.long, device=device))
        return block + [torch.empty(rows, dtype=torch.float32, device=device) for _ in range(columns)]

    def unpack(self, block: List[Tensor], owner: int):
        """(keys, col_groups, row_index relative to the block, extra columns) of a received block."""
        groups = block[1] if self.groups is not None else None
        extra = block[2:] if self.groups is not None else block[1:]
        return block[0], groups, self.row_index - self.layout.offset(owner), extra

    def lse(self, bound: Optional[float]) -> Tuple[Tensor, Tensor]:
        """(n,) lse of the local queries over every key; (n,) of the local keys over every query."""
        lse_rows = torch.full((self.queries.shape[0],), float("-inf"), dtype=torch.float32, device=self.queries.device)

        def compute(block: List[Tensor], owner: int) -> Tensor:
            keys, col_groups, row_index, _ = self.unpack(block, owner)
            rows, cols = _block_lse(self.backend, self.queries, keys, self.scale, bound, row_index,
                                    self.groups, col_groups, self.tile)
            torch.logaddexp(lse_rows, rows, out=lse_rows)
            return cols

        lse_cols = _circulate(self.layout, self.own_block(), lambda rows: self.empty_block(rows, 0), compute,
                              self._empty_lines, torch.logaddexp)
        return lse_rows, lse_cols

    def grads(self, bound: Optional[float], rows: _Weights, cols: _Weights) -> Tuple[Tensor, Tensor]:
        """fp32 (n, D) sum_j G_ij k_j of the local queries and (n, D) s sum_i G_ij q_i of the local keys."""
        grad_q = torch.zeros(self.queries.shape, dtype=torch.float32, device=self.queries.device)

        def compute(block: List[Tensor], owner: int) -> Tensor:
            keys, col_groups, row_index, (lse_cols, grad_cols) = self.unpack(block, owner)
            return _block_grads(self.backend, grad_q, self.queries, keys, self.scale, bound, row_index, self.groups,
                                col_groups, self.tile, rows, _weights(lse_cols, grad_cols, bound))

        grad_k = _circulate(self.layout, self.own_block(cols.lse, cols.grad), lambda n: self.empty_block(n, 2),
                            compute, self._empty_rows, torch.Tensor.add_)
        return grad_q, grad_k

    def sigmoid_sums(self, bias: Tensor, groups_positive: bool) -> Tuple[Tensor, Tensor]:
        """fp64 sums of softplus(-y (z + t)) of the local queries against every key, over the
        positive and over the negative pairs: each block's sums stay here, nothing travels back."""
        sums = torch.zeros(2, dtype=torch.float64, device=self.queries.device)

        def compute(block: List[Tensor], owner: int) -> None:
            keys, col_groups, row_index, _ = self.unpack(block, owner)
            positive, negative = _block_sigmoid_sums(self.backend, self.queries, keys, self.scale, bias, row_index,
                                                     self.groups, col_groups, groups_positive, self.tile)
            sums[0] += positive
            sums[1] += negative
            return None

        _circulate(self.layout, self.own_block(), lambda rows: self.empty_block(rows, 0), compute)
        return sums[0], sums[1]

    def sigmoid_grads(self, bias: Tensor, groups_positive: bool, grad_positive: Tensor,
                      grad_negative: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """fp32 (n, D) sum_j G_ij k_j of the local queries over every key, (n, D) s sum_i G_ij q_i
        of the local keys over every rank's queries (home after one round), and the fp64 sum of
        G over the local queries' pairs (the bias gradient of this rank's terms)."""
        grad_q = torch.zeros(self.queries.shape, dtype=torch.float32, device=self.queries.device)
        grad_bias = torch.zeros((), dtype=torch.float64, device=self.queries.device)

        def compute(block: List[Tensor], owner: int) -> Tensor:
            keys, col_groups, row_index, _ = self.unpack(block, owner)
            grad_k, part_bias = _block_sigmoid_grads(self.backend, grad_q, self.queries, keys, self.scale, bias,
                                                     row_index, self.groups, col_groups, groups_positive, self.tile,
                                                     grad_positive, grad_negative)
            grad_bias.add_(part_bias)
            return grad_k

        grad_k = _circulate(self.layout, self.own_block(), lambda rows: self.empty_block(rows, 0), compute,
                            self._empty_rows, torch.Tensor.add_)
        return grad_q, grad_k, grad_bias

    def _empty_lines(self, rows: int) -> Tensor:
        return torch.empty(rows, dtype=torch.float32, device=self.queries.device)

    def _empty_rows(self, rows: int) -> Tensor:
        return torch.empty((rows, self.keys.shape[1]), dtype=torch.float32, device=self.queries.device)


def _any_rank(flag: bool, layout: RingLayout, device: torch.device) -> bool:
    """Whether ``flag`` holds on some rank (a collective)."""
    if layout.world == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


class _RingLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, queries, keys, logit_scale, groups, layout, tile, backend):
        scale = float(logit_scale)
        ring = _Ring(queries, keys, groups, layout, scale, tile, backend)
        bound = None
        if backend == "torch" and layout.total:  # the shared shift, the same on every rank
            bound = abs(scale) * layout.max_query_norm * layout.max_key_norm
            bound *= 1.0 if queries.dtype == torch.float32 else 1.0 + 1e-2  # low-precision matmuls
        lse_rows, lse_cols = ring.lse(bound)
        if bound is not None:
            low = bool((lse_rows < bound - SAFE_MARGIN).any()) or bool((lse_cols < bound - SAFE_MARGIN).any())
            if _any_rank(low, layout, queries.device):  # exp(z - c) may underflow somewhere: exact pass
                bound = None
                lse_rows, lse_cols = ring.lse(bound)
        ctx.save_for_backward(queries, keys, logit_scale, groups, lse_rows, lse_cols)
        ctx.layout, ctx.tile, ctx.backend, ctx.bound = layout, tile, backend, bound
        return lse_rows, lse_cols

    @staticmethod
    def backward(ctx, grad_rows, grad_cols):
        queries, keys, logit_scale, groups, lse_rows, lse_cols = ctx.saved_tensors
        scale = float(logit_scale)
        ring = _Ring(queries, keys, groups, ctx.layout, scale, ctx.tile, ctx.backend)
        grad_q, grad_k = ring.grads(ctx.bound, _weights(lse_rows, grad_rows, ctx.bound),
                                    _weights(lse_cols, grad_cols, ctx.bound))
        grad_scale, grad_q = _finish_query_grads(queries, grad_q, logit_scale, scale)
        return grad_q, grad_k.to(keys.dtype), grad_scale, None, None, None, None


def _checked_layout(queries: Tensor, keys: Tensor, groups: Optional[Tensor],
                    layout: Optional[RingLayout]) -> RingLayout:
    """``layout``, or the ring's layout of these rows (a collective); ValueError on bad shapes."""
    if queries.shape != keys.shape or queries.dim() != 2:
        raise ValueError(f"queries and keys must both be (n, D); got {tuple(queries.shape)} and {tuple(keys.shape)}")
    if groups is not None and groups.shape != (queries.shape[0],):
        raise ValueError(f"groups must be ({queries.shape[0]},) int64, got shape {tuple(groups.shape)}")
    return layout if layout is not None else ring_layout(queries, keys, groups)


def ring_logsumexp(
    queries: Tensor, keys: Tensor, logit_scale: Tensor, groups: Optional[Tensor] = None,
    *, layout: Optional[RingLayout] = None, tile: int = DEFAULT_TILE, backend: Optional[str] = None,
) -> Tuple[Tensor, Tensor]:
    """Both directions' log-sum-exp of the batch concatenated over ranks, by a ring exchange.

    queries, keys (n_r, D): this rank's valid rows, row i of one pairing with row i of the other
    (n_r may differ between ranks and be 0); logit_scale: scalar tensor, the same on every rank;
    groups (n_r,) int64 (-1 = none) or None: same-group pairs other than the own pair are left
    out. layout: from ``ring_layout`` when the caller already has it (saves one all-gather).

    Returns fp32 (n_r,) lse over all ranks' keys of each local query (A->B) and (n_r,) lse over
    all ranks' queries of each local key (B->A): on one process, ``tiled_logsumexp(queries, keys,
    scale, arange(n), groups, groups, both=True)``. A collective: every rank calls it in turn.
    """
    layout = _checked_layout(queries, keys, groups, layout)
    scale = torch.as_tensor(logit_scale, dtype=torch.float32, device=queries.device)
    chosen = tiled_backend(queries, backend)
    return _RingLogSumExp.apply(queries, keys, scale, groups, layout, check_tile_size(tile), chosen)


class _RingSigmoidPairs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, queries, keys, logit_scale, logit_bias, groups, layout, groups_positive, tile, backend):
        scale = float(logit_scale)
        ring = _Ring(queries, keys, groups, layout, scale, tile, backend)
        positive, negative = ring.sigmoid_sums(logit_bias, groups_positive)
        ctx.save_for_backward(queries, keys, logit_scale, logit_bias, groups)
        ctx.layout, ctx.groups_positive, ctx.tile, ctx.backend = layout, groups_positive, tile, backend
        return positive.float(), negative.float()

    @staticmethod
    def backward(ctx, grad_positive, grad_negative):
        queries, keys, logit_scale, logit_bias, groups = ctx.saved_tensors
        scale = float(logit_scale)
        ring = _Ring(queries, keys, groups, ctx.layout, scale, ctx.tile, ctx.backend)
        grad_q, grad_k, grad_bias = ring.sigmoid_grads(logit_bias, ctx.groups_positive, grad_positive, grad_negative)
        grad_scale, grad_q = _finish_query_grads(queries, grad_q, logit_scale, scale)
        grad_bias = grad_bias.to(logit_bias.dtype).reshape(logit_bias.shape)
        return grad_q, grad_k.to(keys.dtype), grad_scale, grad_bias, None, None, None, None, None


def ring_sigmoid_pairs(
    queries: Tensor, keys: Tensor, logit_scale: Tensor, logit_bias: Tensor, groups: Optional[Tensor] = None,
    *, layout: Optional[RingLayout] = None, groups_positive: bool = False, tile: int = DEFAULT_TILE,
    backend: Optional[str] = None,
) -> Tuple[Tensor, Tensor]:
    """SigLIP's pair sums of the local queries against the batch concatenated over ranks, by a
    ring exchange: sums of softplus(-y_ij (s <q_i, k_j> + t)) over the positive and over the
    negative pairs (fp32 scalars, accumulated in fp64).

    queries, keys (n_r, D) and groups as ``ring_logsumexp``; logit_scale, logit_bias: scalar
    tensors, the same on every rank. The own pair is positive; same-group pairs are positives
    with ``groups_positive``, else left out. On one process, ``tiled_sigmoid_pairs(queries,
    keys, s, t, arange(n), groups, groups, groups_positive=...)``. Backward: the local queries
    get their terms' gradient, the local keys every rank's (as through the gather), the scale
    and bias this rank's terms'. A collective: every rank calls it in turn.
    """
    layout = _checked_layout(queries, keys, groups, layout)
    scale = torch.as_tensor(logit_scale, dtype=torch.float32, device=queries.device)
    chosen = tiled_backend(queries, backend)
    return _RingSigmoidPairs.apply(queries, keys, scale, logit_bias, groups, layout, bool(groups_positive),
                                   check_tile_size(tile), chosen)


# ------------------------------------------------------- group means (same_group="positive")

def _group_sums(values: Tensor, groups: Tensor, layout: RingLayout) -> Tuple[Tensor, Tensor]:
    """fp32 (n, D) sum of ``values`` over every rank's rows in each local row's group, and (n,)
    how many: a ring of (values, group ids) blocks; rows without a group (-1) get their own row.

    Per block: the sums of its groups (G_b, D), then each local row looks its group up
    (searchsorted): O((n + m) D) a block, never an (n, m) matrix.
    """
    n = values.shape[0]
    own = groups < 0
    sums = torch.where(own[:, None], values.float(), 0.0)  # (n, D)
    counts = own.float()

    def compute(block: List[Tensor], owner: int) -> None:
        block_values, block_groups = block
        grouped = block_groups >= 0
        ids, slot = torch.unique(block_groups[grouped], return_inverse=True)  # sorted (G_b,)
        if ids.numel() == 0 or n == 0:
            return None
        block_sums = torch.zeros((ids.numel(), values.shape[1]), dtype=torch.float32, device=values.device)
        block_sums.index_add_(0, slot, block_values[grouped].float())
        block_counts = torch.bincount(slot, minlength=ids.numel()).float()
        where = torch.searchsorted(ids, groups).clamp_(max=ids.numel() - 1)
        found = (ids[where] == groups) & ~own
        sums[found] += block_sums[where[found]]
        counts[found] += block_counts[where[found]]
        return None

    def empty_block(rows: int) -> List[Tensor]:
        return [torch.empty((rows, values.shape[1]), dtype=values.dtype, device=values.device),
                torch.empty(rows, dtype=torch.long, device=values.device)]

    _circulate(layout, [values.contiguous(), groups.contiguous()], empty_block, compute)
    return sums, counts


class _RingGroupMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, groups, layout):
        sums, counts = _group_sums(values, groups, layout)
        ctx.save_for_backward(groups, counts)
        ctx.layout = layout
        return (sums / counts[:, None]).to(values.dtype)

    @staticmethod
    def backward(ctx, grad_means):
        # "same group" is symmetric: d mean_i / d x_j = [j in group(i)] / count_i, so the
        # gradient of x_j is the sum, over the rows i of its group, of grad_i / count_i
        groups, counts = ctx.saved_tensors
        grad, _ = _group_sums(grad_means.float() / counts[:, None], groups, ctx.layout)
        return grad.to(grad_means.dtype), None, None


def ring_group_mean(values: Tensor, groups: Optional[Tensor], layout: RingLayout) -> Tensor:
    """(n, D) mean of ``values`` over every rank's rows that share each local row's group (-1
    or None: the row itself); ``values`` (n, D) this rank's rows, in the ring's row order.

    The positive targets of InfoNCE with same_group="positive" (``infonce_tiled.positive_targets``
    over the concatenated batch); a collective when any rank has groups.
    """
    if not layout.has_groups:  # every row's own pair
        return values
    if groups is None:
        groups = torch.full((values.shape[0],), -1, dtype=torch.long, device=values.device)
    return _RingGroupMean.apply(values, groups.long(), layout)
