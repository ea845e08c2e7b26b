"""Tile-by-tile kernels for exact contrastive losses without the (n, N) logit matrix (Inf-CL).

Inf-CL (Cheng et al. 2024, https://arxiv.org/abs/2410.17243) computes the contrastive loss
over (tile, tile) blocks of the logit matrix: the forward keeps only an online log-sum-exp per
row (and per column), the backward recomputes each block once and turns it straight into
gradient contributions with two matmuls. Memory is O((n + N) D + tile^2) instead of O(n N).

Two autograd Functions, both over queries q (n, D), keys k (M, D), logits z = s <q_i, k_j>:

``tiled_logsumexp``   -> (lse_rows (n,), lse_cols (M,) or empty)
    lse over the allowed keys of every query row (and, ``both=True``, over the queries of every
    key column: the B->A direction of a square single-process batch, in the same pass).
``tiled_negative_logsumexp`` -> (lse_rows, lse_cols, listed (E,))
    the same with a sparse list of E (row, key) pairs left out too (several positives per row:
    ``graded_infonce_tiled``), and the logits of the listed pairs, read off the same tiles.
``tiled_sigmoid_pairs`` -> (positive_sum, negative_sum)
    sum over allowed pairs of softplus(-y_ij (z_ij + t)), split by label y = +1 / -1.

Masking inside a tile: key j is *the* positive of row i when ``j == row_index[i]``; it shares
the row's group when ``row_groups[i] == col_groups[j] >= 0``. Same-group pairs other than the
positive are removed (``ignore``), or for the sigmoid kernel may count as positives. Listed
pairs (``PairTiles``, bucketed by tile once) are removed whatever their group.

Gradients: dL/dz_ij = G_ij, dq = s G k, dk = G^T (s q), ds = sum_i <q_i, dq_i / s>, so the scale
gradient costs no extra pass over the tile. Accumulation is fp32 whatever the input dtype
(bf16 inputs on GPU: bf16 matmuls with fp32 accumulation, fp32 exp/log); fp16 inputs meet G
in fp32 in the G k and G^T q products (in fp16 a large batch's small weights would flush to 0).

Cost: one GEMM per tile forward, three backward (recompute, G k, G^T q), against open_clip's
one + two on the full matrix; every other operation is a handful of in-place passes over a
preallocated tile buffer, so big tiles (2048-4096 on CPU) keep the per-op overhead negligible.
The logit scale rides in the GEMMs (``alpha``): no scaled copy of the inputs is made. Peak
memory beyond the inputs: two (tile, tile) fp32 buffers plus fp32 (n, D) and (M, D) gradient
accumulators.
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_TILE = 2048
BACKENDS = ("auto", "torch", "triton")


@functools.lru_cache(maxsize=1)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401  (ships with torch's CUDA builds)
    except ImportError:
        return False
    return True


# The default until the Triton kernels have been run and timed on a GPU (they are checked in
# Triton's CPU interpreter only): then it becomes "auto".
DEFAULT_BACKEND = "torch"


def tiled_backend(queries: Tensor, backend: Optional[str] = None) -> str:
    """The kernels to run, "torch" or "triton": ``backend``, else $ALIGN_TILED_BACKEND, else
    ``DEFAULT_BACKEND``.

    auto picks the fused Triton kernels (``align.losses.tiled_triton``) for CUDA inputs when
    Triton imports and the kernels take them, and this module's torch kernels (the CPU path and
    the reference) otherwise: float64 inputs, and rows too wide for the GPU's shared memory
    (``tiled_triton.shared_memory_needed``: on an H100 fp32 D > 1024, 16-bit D > 2048), stay on
    the torch kernels with one warning. "triton" refuses float64 and fails on such rows with an
    error; on CPU tensors it needs TRITON_INTERPRET=1 (Triton's interpreter: the tests).
    """
    choice = backend or os.environ.get("ALIGN_TILED_BACKEND") or DEFAULT_BACKEND
    if choice not in BACKENDS:
        raise ValueError(f"tiled loss backend {choice!r} (argument or ALIGN_TILED_BACKEND): "
                         f"choose one of {', '.join(BACKENDS)}")
    if choice == "auto":
        if not (queries.is_cuda and _triton_importable()):
            return "torch"
        from align.losses.tiled_triton import unsupported  # imports Triton only for CUDA inputs

        reason = unsupported(queries)
        if reason is not None:
            _warn_once(f"the fused Triton loss kernels cannot take {reason}: the tiled loss runs the torch kernels")
            return "torch"
        return "triton"
    return choice


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def check_tile_size(tile_size: int) -> int:
    if tile_size < 1:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    return int(tile_size)


def _matmul_into(buffer: Tensor, left: Tensor, right_t: Tensor, alpha: float) -> Tensor:
    """fp32 (rows, cols) view of ``buffer`` holding alpha * left @ right_t.

    The scale rides in the GEMM (``alpha``), so no scaled copy of the queries is ever made.
    """
    out = buffer[: left.shape[0] * right_t.shape[1]].view(left.shape[0], right_t.shape[1])
    if left.dtype == torch.float32:
        out.addmm_(left, right_t, beta=0, alpha=alpha)  # beta=0: the buffer's old contents are ignored
        return out
    try:  # CUDA: bf16 inputs, fp32 accumulation *and* fp32 output
        out.copy_(torch.mm(left, right_t, out_dtype=torch.float32))
    except (RuntimeError, NotImplementedError, TypeError):  # elsewhere the product is rounded once
        out.copy_(left @ right_t)
    return out.mul_(alpha)


def _same_group_tile(row_groups: Optional[Tensor], col_groups: Optional[Tensor],
                     i0: int, i1: int, j0: int, j1: int) -> Optional[Tensor]:
    """(ti, tj) bool: key shares the query's group (including the query's own pair)."""
    if row_groups is None:
        return None
    rows = row_groups[i0:i1, None]
    return (rows == col_groups[None, j0:j1]) & (rows >= 0)


def _diagonal_in_tile(row_index: Tensor, i0: int, i1: int, j0: int, j1: int) -> Tuple[Tensor, Tensor]:
    """(rows, cols) inside the tile where a query meets its own pair."""
    cols = row_index[i0:i1] - j0
    inside = (cols >= 0) & (cols < j1 - j0)
    rows = torch.arange(i1 - i0, device=row_index.device)[inside]
    return rows, cols[inside]


def _ignore_tile(row_index, row_groups, col_groups, i0, i1, j0, j1) -> Optional[Tensor]:
    """(ti, tj) bool: same-group keys that are not the query's own pair (removed)."""
    same = _same_group_tile(row_groups, col_groups, i0, i1, j0, j1)
    if same is None:
        return None
    rows, cols = _diagonal_in_tile(row_index, i0, i1, j0, j1)
    same[rows, cols] = False
    return same


def _logsumexp_into(z: Tensor, dim: int, scratch: Tensor) -> Tensor:
    """logsumexp of z along dim using ``scratch`` (same numel) instead of fresh allocations."""
    peak = z.amax(dim, keepdim=True)
    peak = peak.masked_fill(torch.isinf(peak), 0.0)  # fully masked lines: exp(-inf) = 0
    shifted = scratch[: z.numel()].view_as(z)
    torch.sub(z, peak, out=shifted)
    shifted.exp_()
    return shifted.sum(dim).log_() + peak.squeeze(dim)


def _exp_shift(logit_lse: Tensor, grad: Tensor) -> Tuple[Tensor, bool]:
    """Shift so that exp(z - shift) = grad * exp(z - lse); falls back when grad < 0."""
    if bool((grad >= 0).all()):
        return logit_lse - torch.log(grad.float()), True  # grad 0 -> +inf shift -> 0
    return logit_lse, False


# Fast path: shift every logit by one bound c >= max z (Cauchy-Schwarz: s max|q| max|k|), so one
# exp per element serves rows and columns alike, in the forward and in the backward
# (G = exp(z - c) * (u_i + v_j)). Exact unless a row's (or column's) log-sum-exp lies far below
# c, where exp(z - c) would underflow: with exp underflowing below -87 and at most ~e^12 terms,
# a margin of 60 nats keeps the relative error under 1e-6. Unit-norm embeddings with
# logit_scale <= 30 never come near it; otherwise the call reruns with exact per-tile maxima.
SAFE_MARGIN = 60.0


class _TiledLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, queries, keys, logit_scale, row_index, row_groups, col_groups, tile, both, excluded=None):
        scale = float(logit_scale)
        bound = _logit_bound(queries, keys, scale)
        listed = torch.empty(0 if excluded is None else excluded.rows.shape[0], dtype=torch.float32,
                             device=queries.device)
        lse_rows, lse_cols = _lse_shared_shift(queries, keys, scale, bound, row_index, row_groups, col_groups,
                                               tile, both, excluded, listed)
        # a line far below the bound (or, with excluded pairs, with nothing left) is redone exactly
        exact = bool((lse_rows < bound - SAFE_MARGIN).any()) or bool((lse_cols < bound - SAFE_MARGIN).any())
        if exact:
            lse_rows, lse_cols = _lse_exact(queries, keys, scale, row_index, row_groups, col_groups, tile, both,
                                            excluded)
        ctx.save_for_backward(queries, keys, logit_scale, row_index, row_groups, col_groups, lse_rows, lse_cols)
        ctx.tile, ctx.both, ctx.exact, ctx.bound, ctx.scale = tile, both, exact, bound, scale
        ctx.excluded = excluded
        return lse_rows, lse_cols, listed

    @staticmethod
    def backward(ctx, grad_rows, grad_cols, grad_listed):
        queries, keys, logit_scale, row_index, row_groups, col_groups, lse_rows, lse_cols = ctx.saved_tensors
        tile, both, scale, excluded = ctx.tile, ctx.both, ctx.scale, ctx.excluded
        n, m = queries.shape[0], keys.shape[0]
        keys_t = keys.T
        # a line with every pair masked (lse -inf) has only -inf logits: +inf makes its weights 0, not NaN
        lse_rows = lse_rows.masked_fill(torch.isneginf(lse_rows), float("inf"))
        lse_cols = lse_cols.masked_fill(torch.isneginf(lse_cols), float("inf"))
        if ctx.exact:  # G = g_r exp(z - lse_r) (+ g_c exp(z - lse_c)), shifts per row / column
            shift_rows, fused_rows = _exp_shift(lse_rows, grad_rows)
            if both:
                shift_cols, fused_cols = _exp_shift(lse_cols, grad_cols)
        else:  # G = exp(z - c) * (u_i + v_j), u = g_r exp(c - lse_r), v = g_c exp(c - lse_c)
            row_weight = grad_rows.float() * torch.exp(ctx.bound - lse_rows)
            col_weight = grad_cols.float() * torch.exp(ctx.bound - lse_cols) if both else None
        grad_q = torch.zeros(queries.shape, dtype=torch.float32, device=queries.device)  # sum_j G_ij k_j
        grad_k = torch.zeros(keys.shape, dtype=torch.float32, device=keys.device)  # sum_i G_ij s q_i
        z_buffer = torch.empty(min(tile, n) * min(tile, m), dtype=torch.float32, device=queries.device)
        g_buffer = torch.empty_like(z_buffer)
        for i0 in range(0, n, tile):
            i1 = min(i0 + tile, n)
            for j0 in range(0, m, tile):
                j1 = min(j0 + tile, m)
                z = _masked_logits(z_buffer, queries, keys_t, scale, row_index, row_groups, col_groups,
                                   i0, i1, j0, j1, excluded)
                g = g_buffer[: z.numel()].view_as(z)
                if not ctx.exact:
                    z.sub_(ctx.bound).exp_()  # exp(z - c)
                    torch.mul(z, row_weight[i0:i1, None], out=g)
                    if both:
                        g.addcmul_(z, col_weight[None, j0:j1])
                else:
                    torch.sub(z, shift_rows[i0:i1, None], out=g).exp_()
                    if not fused_rows:
                        g.mul_(grad_rows[i0:i1, None])
                    if both:
                        z.sub_(shift_cols[None, j0:j1]).exp_()
                        if not fused_cols:
                            z.mul_(grad_cols[None, j0:j1])
                        g.add_(z)
                if excluded is not None:  # the listed logits' own gradient
                    index, rows, cols = excluded.at(i0, j0)
                    g.index_put_((rows, cols), grad_listed[index].float(), accumulate=True)
                _accumulate(grad_q[i0:i1], grad_k[j0:j1], g, keys[j0:j1], queries[i0:i1], scale)
        grad_scale, grad_q = _finish_query_grads(queries, grad_q, logit_scale, scale)
        return grad_q, grad_k.to(keys.dtype), grad_scale, None, None, None, None, None, None


def _finish_query_grads(queries: Tensor, grad_q: Tensor, logit_scale: Tensor, scale: float):
    """From grad_q = sum_j G_ij k_j (fp32): ds = sum_i <q_i, grad_q_i>, dq = s grad_q (in place)."""
    # per-row dots, then a float64 sum: one fp32 dot over n * D terms loses digits at B ~ 10^4
    grad_scale = torch.linalg.vecdot(queries.float(), grad_q).sum(dtype=torch.float64)
    grad_scale = grad_scale.reshape(logit_scale.shape).to(logit_scale.dtype)
    return grad_scale, grad_q.mul_(scale).to(queries.dtype)


def _logit_bound(queries: Tensor, keys: Tensor, scale: float) -> float:
    """c >= every s <q_i, k_j> (Cauchy-Schwarz), plus slack for low-precision matmuls."""
    if queries.shape[0] == 0 or keys.shape[0] == 0:
        return 0.0
    bound = abs(scale) * float(queries.float().norm(dim=1).max() * keys.float().norm(dim=1).max())
    return bound * (1.0 + 1e-2) if queries.dtype != torch.float32 else bound


class PairTiles:
    """A sparse list of (row, key) pairs bucketed by tile, so that each tile of the loops finds
    its pairs without scanning the list."""

    def __init__(self, rows: Tensor, cols: Tensor, n_rows: int, n_cols: int, tile: int) -> None:
        self.rows, self.cols, self.tile = rows, cols, tile
        self.col_tiles = -(-n_cols // tile)
        block = (rows // tile) * self.col_tiles + cols // tile  # (E,)
        self.order = torch.argsort(block, stable=True)
        counts = torch.bincount(block, minlength=-(-n_rows // tile) * self.col_tiles)
        self.ends = counts.cumsum(0).tolist()  # one Python list: no device sync per tile

    def at(self, i0: int, j0: int) -> Tuple[Tensor, Tensor, Tensor]:
        """(index into the list, row, col inside the tile) of the pairs in tile (i0, j0)."""
        block = (i0 // self.tile) * self.col_tiles + j0 // self.tile
        start = self.ends[block - 1] if block else 0
        index = self.order[start:self.ends[block]]
        return index, self.rows[index] - i0, self.cols[index] - j0


def _masked_logits(z_buffer, queries, keys_t, scale, row_index, row_groups, col_groups, i0, i1, j0, j1,
                   excluded: Optional[PairTiles] = None, listed: Optional[Tensor] = None) -> Tensor:
    """(ti, tj) fp32 logits s q k^T of one tile, -inf where the pair is ignored or listed in
    ``excluded``; the listed pairs' logits are first copied into ``listed`` (E,) when given."""
    z = _matmul_into(z_buffer, queries[i0:i1], keys_t[:, j0:j1], scale)
    if excluded is not None:
        index, rows, cols = excluded.at(i0, j0)
        if listed is not None:
            listed[index] = z[rows, cols]
    ignore = _ignore_tile(row_index, row_groups, col_groups, i0, i1, j0, j1)
    if ignore is not None:
        z.masked_fill_(ignore, float("-inf"))
    if excluded is not None:
        z[rows, cols] = float("-inf")
    return z


def _lse_shared_shift(queries, keys, scale, bound, row_index, row_groups, col_groups, tile, both,
                      excluded=None, listed=None):
    """Row / column log-sum-exp with the one shift ``bound`` (fast path, see SAFE_MARGIN); fills
    ``listed`` with the logits of the ``excluded`` pairs when given."""
    n, m = queries.shape[0], keys.shape[0]
    keys_t = keys.T
    sum_rows = torch.zeros(n, dtype=torch.float32, device=queries.device)
    sum_cols = torch.zeros(m if both else 0, dtype=torch.float32, device=queries.device)
    z_buffer = torch.empty(min(tile, n) * min(tile, m), dtype=torch.float32, device=queries.device)
    for i0 in range(0, n, tile):
        i1 = min(i0 + tile, n)
        for j0 in range(0, m, tile):
            j1 = min(j0 + tile, m)
            z = _masked_logits(z_buffer, queries, keys_t, scale, row_index, row_groups, col_groups, i0, i1, j0, j1,
                               excluded, listed)
            z.sub_(bound).exp_()  # (ti, tj) exp(z - c) in [0, 1]
            sum_rows[i0:i1] += z.sum(1)
            if both:
                sum_cols[j0:j1] += z.sum(0)
    return sum_rows.log() + bound, sum_cols.log() + bound


def _lse_exact(queries, keys, scale, row_index, row_groups, col_groups, tile, both, excluded=None):
    """Row / column log-sum-exp with exact maxima per tile line (robust path)."""
    n, m = queries.shape[0], keys.shape[0]
    keys_t = keys.T
    lse_rows = torch.full((n,), float("-inf"), dtype=torch.float32, device=queries.device)
    lse_cols = torch.full((m if both else 0,), float("-inf"), dtype=torch.float32, device=queries.device)
    z_buffer = torch.empty(min(tile, n) * min(tile, m), dtype=torch.float32, device=queries.device)
    scratch = torch.empty_like(z_buffer)
    for i0 in range(0, n, tile):
        i1 = min(i0 + tile, n)
        running = lse_rows[i0:i1]
        for j0 in range(0, m, tile):
            j1 = min(j0 + tile, m)
            z = _masked_logits(z_buffer, queries, keys_t, scale, row_index, row_groups, col_groups, i0, i1, j0, j1,
                               excluded)
            torch.logaddexp(running, _logsumexp_into(z, 1, scratch), out=running)
            if both:
                torch.logaddexp(lse_cols[j0:j1], _logsumexp_into(z, 0, scratch), out=lse_cols[j0:j1])
    return lse_rows, lse_cols


def _accumulate(grad_q: Tensor, grad_k: Tensor, g: Tensor, keys: Tensor, queries: Tensor, scale: float) -> None:
    """grad_q += G @ k (scaled by s once at the end), grad_k += s G^T @ q; fp32 accumulation.

    G (fp32) meets bf16 and float64 rows in their dtype (bf16 has fp32's exponent range) and
    fp16 rows as fp32: in fp16 the weights of a large batch (~ 1 / (2 N^2), 7e-9 at N = 8192)
    would flush to zero.
    """
    if keys.dtype == torch.float16:
        keys, queries = keys.float(), queries.float()  # (tile, D) copies: O(1 / tile) of the GEMMs' work
    if keys.dtype == torch.float32:
        grad_q.addmm_(g, keys)
        grad_k.addmm_(g.T, queries, alpha=scale)
    else:
        low = g.to(keys.dtype)
        grad_q.add_((low @ keys).float())
        grad_k.add_((low.T @ queries).float(), alpha=scale)


def tiled_logsumexp(
    queries: Tensor, keys: Tensor, logit_scale: Tensor, row_index: Tensor,
    row_groups: Optional[Tensor] = None, col_groups: Optional[Tensor] = None,
    *, tile: int = DEFAULT_TILE, both: bool = False, backend: Optional[str] = None,
) -> Tuple[Tensor, Tensor]:
    """Row (and with ``both`` column) log-sum-exp of s q k^T without the full matrix.

    queries (n, D), keys (M, D), logit_scale scalar tensor, row_index (n,) column of each row's
    own pair, groups (n,)/(M,) int64 or None (same-group keys other than the own pair are
    masked out). ``both`` needs a square batch whose row i pairs with column i.
    ``backend``: see ``tiled_backend``. Returns fp32 (n,) and (M,) (empty unless ``both``).
    """
    if (row_groups is None) != (col_groups is None):
        raise ValueError("row_groups and col_groups must be given together")
    if both and (queries.shape[0] != keys.shape[0]):
        raise ValueError("both=True needs as many queries as keys (row i pairs with column i)")
    scale = torch.as_tensor(logit_scale, dtype=torch.float32, device=queries.device)
    if tiled_backend(queries, backend) == "triton":
        from align.losses.tiled_triton import TritonLogSumExp  # imports Triton only when used
        return TritonLogSumExp.apply(queries, keys, scale, row_index, row_groups, col_groups, int(tile), both)
    lse_rows, lse_cols, _ = _TiledLogSumExp.apply(queries, keys, scale, row_index, row_groups, col_groups, int(tile),
                                                  both)
    return lse_rows, lse_cols


def tiled_negative_logsumexp(
    queries: Tensor, keys: Tensor, logit_scale: Tensor, row_index: Tensor, excluded_rows: Tensor,
    excluded_cols: Tensor, row_groups: Optional[Tensor] = None, col_groups: Optional[Tensor] = None,
    *, tile: int = DEFAULT_TILE, both: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``tiled_logsumexp`` with the E listed pairs (excluded_rows[e], excluded_cols[e]) left out
    too, whatever their group, and their logits s <q, k> returned, read off the same tiles.

    For several positives per row, each against the negatives only (``graded_infonce_tiled``):
    list every row's positives (its own pair among them). ``both`` needs the list symmetric.
    Returns fp32 (n,), (M,) (empty unless ``both``) and (E,); a line with nothing left has
    log-sum-exp -inf. Torch kernels only (no Triton variant yet).
    """
    if (row_groups is None) != (col_groups is None):
        raise ValueError("row_groups and col_groups must be given together")
    if both and (queries.shape[0] != keys.shape[0]):
        raise ValueError("both=True needs as many queries as keys (row i pairs with column i)")
    scale = torch.as_tensor(logit_scale, dtype=torch.float32, device=queries.device)
    excluded = PairTiles(excluded_rows, excluded_cols, queries.shape[0], keys.shape[0], int(tile))
    return _TiledLogSumExp.apply(queries, keys, scale, row_index, row_groups, col_groups, int(tile), both, excluded)


class _TiledSigmoidPairs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, queries, keys, logit_scale, logit_bias, row_index, row_groups, col_groups,
                groups_positive, tile):
        scale = float(logit_scale)
        positive, negative = _sigmoid_sums(queries, keys, scale, logit_bias, row_index, row_groups, col_groups,
                                           groups_positive, tile)
        ctx.save_for_backward(queries, keys, logit_scale, logit_bias, row_index, row_groups, col_groups)
        ctx.tile, ctx.groups_positive, ctx.scale = tile, groups_positive, scale
        return positive.float(), negative.float()

    @staticmethod
    def backward(ctx, grad_positive, grad_negative):
        queries, keys, logit_scale, logit_bias, row_index, row_groups, col_groups = ctx.saved_tensors
        grad_q = torch.zeros(queries.shape, dtype=torch.float32, device=queries.device)
        grad_k, grad_bias = _sigmoid_grads(grad_q, queries, keys, ctx.scale, logit_bias, row_index, row_groups,
                                           col_groups, ctx.groups_positive, ctx.tile, grad_positive, grad_negative)
        grad_scale, grad_q = _finish_query_grads(queries, grad_q, logit_scale, ctx.scale)
        grad_bias = grad_bias.to(logit_bias.dtype).reshape(logit_bias.shape)
        return grad_q, grad_k.to(keys.dtype), grad_scale, grad_bias, None, None, None, None, None


def _sigmoid_sums(queries: Tensor, keys: Tensor, scale: float, logit_bias: Tensor, row_index: Tensor,
                  row_groups: Optional[Tensor], col_groups: Optional[Tensor], groups_positive: bool,
                  tile: int) -> Tuple[Tensor, Tensor]:
    """fp64 sums of softplus(-y (s q k^T + t)) over the positive and over the negative pairs of
    queries (n, D) against keys (m, D), tile by tile (a whole batch, or one block of the ring)."""
    total = torch.zeros((), dtype=torch.float64, device=queries.device)
    positive = torch.zeros((), dtype=torch.float64, device=queries.device)
    for _, _, u, positives, diag in _signed_tiles(queries, keys, scale, logit_bias, row_index, row_groups,
                                                  col_groups, groups_positive, tile):
        losses = F.softplus(u)  # -log sigmoid(y x) with u = -y x
        total += losses.sum(dtype=torch.float64)
        if positives is not None:
            positive += losses[positives].sum(dtype=torch.float64)
        else:
            positive += losses[diag].sum(dtype=torch.float64)
    return positive, total - positive


def _sigmoid_grads(grad_q: Tensor, queries: Tensor, keys: Tensor, scale: float, logit_bias: Tensor,
                   row_index: Tensor, row_groups: Optional[Tensor], col_groups: Optional[Tensor],
                   groups_positive: bool, tile: int, grad_positive: Tensor,
                   grad_negative: Tensor) -> Tuple[Tensor, Tensor]:
    """Adds sum_j G_ij k_j to grad_q (n, D) fp32; returns s sum_i G_ij q_i (m, D) fp32 and the
    fp64 sum of G (the bias gradient), G_ij = d(grad_positive * positive_sum + grad_negative *
    negative_sum) / dz_ij over the pairs of queries against keys (a batch, or one ring block)."""
    grad_k = torch.zeros(keys.shape, dtype=torch.float32, device=keys.device)
    grad_bias = torch.zeros((), dtype=torch.float64, device=queries.device)
    g_pos, g_neg = grad_positive.float(), grad_negative.float()
    for rows, cols, u, positives, diag in _signed_tiles(queries, keys, scale, logit_bias, row_index, row_groups,
                                                        col_groups, groups_positive, tile):
        g = u.sigmoid_()  # d softplus(u)/du; dz/du = -1 at positives, +1 at negatives
        if positives is not None:
            g.copy_(torch.where(positives, g * -g_pos, g * g_neg))
        else:
            diag_values = g[diag] * -g_pos
            g.mul_(g_neg)
            g[diag] = diag_values
        grad_bias += g.sum(dtype=torch.float64)
        _accumulate(grad_q[rows], grad_k[cols], g, keys[cols], queries[rows], scale)
    return grad_k, grad_bias


def _signed_tiles(queries: Tensor, keys: Tensor, scale: float, logit_bias: Tensor, row_index: Tensor,
                  row_groups: Optional[Tensor], col_groups: Optional[Tensor], groups_positive: bool, tile: int):
    """Every (tile, tile) block of queries against keys in turn: (row slice, key slice, u,
    positives, diag) as ``_signed_logits``; u lives in one buffer, overwritten by the next tile."""
    n, m = queries.shape[0], keys.shape[0]
    keys_t = keys.T
    z_buffer = torch.empty(min(tile, n) * min(tile, m), dtype=torch.float32, device=queries.device)
    for i0 in range(0, n, tile):
        i1 = min(i0 + tile, n)
        for j0 in range(0, m, tile):
            j1 = min(j0 + tile, m)
            yield (slice(i0, i1), slice(j0, j1),
                   *_signed_logits(z_buffer, queries, keys_t, scale, logit_bias, row_index, row_groups, col_groups,
                                   groups_positive, i0, i1, j0, j1))


def _signed_logits(z_buffer, queries, keys_t, scale, logit_bias, row_index, row_groups, col_groups,
                   groups_positive, i0, i1, j0, j1):
    """u = -y (s q k^T + t) for one tile, -inf where the pair is ignored.

    Returns (u, positives mask or None, diagonal (rows, cols)).
    """
    u = _matmul_into(z_buffer, queries[i0:i1], keys_t[:, j0:j1], scale)
    u.add_(logit_bias.float())
    diag = _diagonal_in_tile(row_index, i0, i1, j0, j1)
    same = _same_group_tile(row_groups, col_groups, i0, i1, j0, j1)
    if same is not None and groups_positive:
        same[diag] = True
        u.copy_(torch.where(same, -u, u))
        return u, same, diag
    u[diag] = -u[diag]  # negatives (y = -1) keep u = x; the own pair (y = +1) gets -x
    if same is not None:  # ignore mode: same group, not the own pair
        same[diag] = False
        u.masked_fill_(same, float("-inf"))
    return u, None, diag


def tiled_sigmoid_pairs(
    queries: Tensor, keys: Tensor, logit_scale: Tensor, logit_bias: Tensor, row_index: Tensor,
    row_groups: Optional[Tensor] = None, col_groups: Optional[Tensor] = None,
    *, groups_positive: bool = False, tile: int = DEFAULT_TILE, backend: Optional[str] = None,
) -> Tuple[Tensor, Tensor]:
    """Sums of -log sigmoid(y (s q k^T + t)) over positive and over negative pairs, tiled.

    Same inputs as ``tiled_logsumexp`` plus the bias t (scalar tensor). Same-group pairs are
    positives with ``groups_positive``, otherwise left out (the own pair is always positive).
    ``backend``: see ``tiled_backend``.
    """
    if (row_groups is None) != (col_groups is None):
        raise ValueError("row_groups and col_groups must be given together")
    scale = torch.as_tensor(logit_scale, dtype=torch.float32, device=queries.device)
    if tiled_backend(queries, backend) == "triton":
        from align.losses.tiled_triton import TritonSigmoidPairs
        return TritonSigmoidPairs.apply(queries, keys, scale, logit_bias, row_index, row_groups,
                                        col_groups, bool(groups_positive), int(tile))
    return _TiledSigmoidPairs.apply(queries, keys, scale, logit_bias, row_index, row_groups,
                                    col_groups, bool(groups_positive), int(tile))
