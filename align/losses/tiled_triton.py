"""Fused Triton kernels for the tiled contrastive losses (Inf-CL on the GPU).

Inf-CL (Cheng et al. 2024, https://arxiv.org/abs/2410.17243) reaches the speed of the untiled
loss by fusing each tile's matmul, exp and reductions into one kernel. These kernels compute
exactly what ``align.losses.tiled`` computes (the torch reference and the CPU implementation),
with the same inputs, masking rules and outputs, and never write an (n, M) matrix to memory:

``TritonLogSumExp``     -> (lse_rows (n,), lse_cols (M,) or empty), as ``tiled_logsumexp``
``TritonSigmoidPairs``  -> (positive_sum, negative_sum), as ``tiled_sigmoid_pairs``

Logits z_ij = s <q_i, k_j>. Masking per pair: j is *the* positive of row i when
``j == row_index[i]``; same group when ``row_groups[i] == col_groups[j] >= 0``. Same-group pairs
other than the positive are left out (log-sum-exp; sigmoid with ``groups_positive=False``) or
count as positives (sigmoid with ``groups_positive=True``). Explicit hard negatives stay with
the callers (``InfoNCETiled`` merges them with logaddexp, ``SigLIPTiled`` adds their term).

Layout: one program owns BLOCK_OUT lines (query rows, or key columns when ``TRANSPOSED``) and
walks the other side BLOCK_IN at a time, so every result is written once by one program (no
atomics, deterministic). Forward: an online max/sum per line (one GEMM per tile; a second pass
with the roles swapped gives the column log-sum-exp). Backward: one pass over rows writes
sum_j G_ij k_j, one over columns writes sum_i G_ij q_i; both recompute each tile (2 GEMMs a
tile each). Each tile holds the whole embedding (D padded to a power of two) so the gradient
accumulator (BLOCK_OUT, D) stays in registers; so even the smallest blocks need shared memory
in proportion to D, and an H100 takes fp32 rows up to D = 1024 and 16-bit rows up to 2048
(``shared_memory_needed``; the auto backend keeps wider rows on the torch kernels).

Precision: inputs keep their dtype (fp32, or bf16/fp16 on GPU) into ``tl.dot`` with fp32
accumulation; fp32 inputs use ``input_precision="ieee"`` (no TF32) so the results stay within
fp32 rounding of the exact ones; exp/log and every sum are fp32, the final sums over rows fp64.
The backward's second product G @ rows takes G in bf16 for bf16 inputs (fp32's exponent range)
and in fp32 otherwise: the weights G ~ 1 / (2 N^2) of a batch of N would flush to zero in fp16.
float64 inputs are refused (the auto backend keeps them on the torch kernels).

Triton reads ``TRITON_INTERPRET`` when this module is imported (at ``@triton.jit``): with
``TRITON_INTERPRET=1`` the kernels run on CPU tensors (slowly), which is how the tests check
them without a GPU. The interpreter keeps bf16 as raw 16-bit integers and gets its dots wrong,
so bf16 inputs are refused there.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.errors import OutOfResources


def _finish_query_grads(queries: Tensor, grad_q: Tensor, logit_scale: Tensor, scale: float):
    """From grad_q = sum_j G_ij k_j (fp32): ds = sum_i <q_i, grad_q_i> (a float64 sum) and dq = s grad_q.

    The torch path (tiled.py) finishes its gradients the same way; this module keeps its own
    copy because tiled.py dispatches here and the two must not import each other."""
    grad_scale = torch.linalg.vecdot(queries.float(), grad_q).sum(dtype=torch.float64)
    grad_scale = grad_scale.reshape(logit_scale.shape).to(logit_scale.dtype)
    return grad_scale, grad_q.mul_(scale).to(queries.dtype)


INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------- kernels

@triton.jit
def _load_lines(ptr, offs, count, stride, dim, BLOCK_D: tl.constexpr):
    """(len(offs), BLOCK_D) rows of a (count, dim) matrix, zeros outside it."""
    d = tl.arange(0, BLOCK_D)
    rows = offs.to(tl.int64)  # n * D passes 2^31 at a few million rows of 512
    mask = (offs[:, None] < count) & (d[None, :] < dim)
    return tl.load(ptr + rows[:, None] * stride + d[None, :], mask=mask, other=0.0)


@triton.jit
def _pair_masks(i, j, n, m, row_index_ptr, row_groups_ptr, col_groups_ptr, HAS_GROUPS: tl.constexpr):
    """For query indices i and key indices j that broadcast to one tile: (inside, own, same).

    inside: both exist; own: j is row i's pair; same: same group (>= 0), own pair included.
    """
    inside = (i < n) & (j < m)
    own = tl.load(row_index_ptr + i, mask=i < n, other=-1) == j
    if HAS_GROUPS:
        row_group = tl.load(row_groups_ptr + i, mask=i < n, other=-1)
        col_group = tl.load(col_groups_ptr + j, mask=j < m, other=-1)
        same = (row_group == col_group) & (row_group >= 0)
    else:
        same = own & (j < 0)  # all false, in the tile's shape
    return inside, own, same


@triton.jit
def _tile_indices(offs_out, offs_in, TRANSPOSED: tl.constexpr):
    """(i, j) query and key indices of a (BLOCK_OUT, BLOCK_IN) tile."""
    if TRANSPOSED:  # outer lines are key columns
        i = offs_in[None, :]
        j = offs_out[:, None]
    else:
        i = offs_out[:, None]
        j = offs_in[None, :]
    return i, j


@triton.jit
def _log1p(x):
    """log(1 + x) to a few ulps for x in [0, 1] (Goldberg's correction; tl has no log1p)."""
    w = 1.0 + x
    return tl.where(w == 1.0, x, tl.log(w) * x / (w - 1.0))


@triton.jit
def _lse_kernel(out_ptr, a_ptr, b_ptr, row_index_ptr, row_groups_ptr, col_groups_ptr,
                n, m, dim, stride_a, stride_b, scale,
                TRANSPOSED: tl.constexpr, HAS_GROUPS: tl.constexpr, BLOCK_OUT: tl.constexpr,
                BLOCK_IN: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Log-sum-exp over allowed pairs of every outer line (a = queries, or keys if TRANSPOSED)."""
    if TRANSPOSED:
        n_out, n_in = m, n
    else:
        n_out, n_in = n, m
    offs_out = tl.program_id(0) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    a = _load_lines(a_ptr, offs_out, n_out, stride_a, dim, BLOCK_D)  # (BO, BD)
    peak = tl.full([BLOCK_OUT], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_OUT], tl.float32)  # sum exp(z - peak)
    for start in range(0, n_in, BLOCK_IN):
        offs_in = start + tl.arange(0, BLOCK_IN)
        b = _load_lines(b_ptr, offs_in, n_in, stride_b, dim, BLOCK_D)  # (BI, BD)
        z = tl.dot(a, tl.trans(b), input_precision=PRECISION) * scale  # (BO, BI) fp32
        i, j = _tile_indices(offs_out, offs_in, TRANSPOSED)
        inside, own, same = _pair_masks(i, j, n, m, row_index_ptr, row_groups_ptr, col_groups_ptr, HAS_GROUPS)
        z = tl.where(inside & (own | ~same), z, float("-inf"))
        new_peak = tl.maximum(peak, tl.max(z, 1))
        shift = tl.where(new_peak == float("-inf"), 0.0, new_peak)  # a line with nothing yet
        total = total * tl.exp(peak - shift) + tl.sum(tl.exp(z - shift[:, None]), 1)
        peak = new_peak
    shift = tl.where(peak == float("-inf"), 0.0, peak)
    tl.store(out_ptr + offs_out, tl.log(total) + shift, mask=offs_out < n_out)  # empty line: -inf


@triton.jit
def _sigmoid_kernel(positive_ptr, negative_ptr, a_ptr, b_ptr, bias_ptr, row_index_ptr, row_groups_ptr,
                    col_groups_ptr, n, m, dim, stride_a, stride_b, scale,
                    HAS_GROUPS: tl.constexpr, GROUPS_POSITIVE: tl.constexpr, BLOCK_OUT: tl.constexpr,
                    BLOCK_IN: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Per query row: sums of softplus(-y (z + t)) over its positive and its negative pairs."""
    offs_out = tl.program_id(0) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    a = _load_lines(a_ptr, offs_out, n, stride_a, dim, BLOCK_D)
    bias = tl.load(bias_ptr).to(tl.float32)
    positive_sum = tl.zeros([BLOCK_OUT], tl.float32)
    negative_sum = tl.zeros([BLOCK_OUT], tl.float32)
    for start in range(0, m, BLOCK_IN):
        offs_in = start + tl.arange(0, BLOCK_IN)
        b = _load_lines(b_ptr, offs_in, m, stride_b, dim, BLOCK_D)
        x = tl.dot(a, tl.trans(b), input_precision=PRECISION) * scale + bias
        i, j = _tile_indices(offs_out, offs_in, False)
        inside, own, same = _pair_masks(i, j, n, m, row_index_ptr, row_groups_ptr, col_groups_ptr, HAS_GROUPS)
        if GROUPS_POSITIVE:
            positive = own | same
        else:
            positive = own
        allowed = inside & (positive | ~same)
        u = tl.where(positive, -x, x)  # -y x
        loss = tl.maximum(u, 0.0) + _log1p(tl.exp(-tl.abs(u)))  # softplus(u) = -log sigmoid(y x)
        positive_sum += tl.sum(tl.where(allowed & positive, loss, 0.0), 1)
        negative_sum += tl.sum(tl.where(allowed & ~positive, loss, 0.0), 1)
    tl.store(positive_ptr + offs_out, positive_sum, mask=offs_out < n)
    tl.store(negative_ptr + offs_out, negative_sum, mask=offs_out < n)


@triton.jit
def _grad_kernel(out_ptr, bias_grad_ptr, a_ptr, b_ptr, row_index_ptr, row_groups_ptr, col_groups_ptr,
                 lse_rows_ptr, grad_rows_ptr, lse_cols_ptr, grad_cols_ptr, bias_ptr, sign_grads_ptr,
                 n, m, dim, stride_a, stride_b, stride_out, scale,
                 SIGMOID: tl.constexpr, TRANSPOSED: tl.constexpr, HAS_GROUPS: tl.constexpr,
                 GROUPS_POSITIVE: tl.constexpr, HAS_COLS: tl.constexpr, BLOCK_OUT: tl.constexpr,
                 BLOCK_IN: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """out[o] = sum over the other side of G * b (fp32), G = dLoss/dz of each pair.

    Log-sum-exp: G_ij = g_i exp(z_ij - lse_i) (+ h_j exp(z_ij - lse_j) with HAS_COLS).
    Sigmoid: G_ij = -g_pos sigmoid(-x_ij) at positives, g_neg sigmoid(x_ij) at negatives, and the
    row sums of G (the bias gradient) go to bias_grad_ptr (rows pass only).
    """
    if TRANSPOSED:
        n_out, n_in = m, n
    else:
        n_out, n_in = n, m
    offs_out = tl.program_id(0) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    a = _load_lines(a_ptr, offs_out, n_out, stride_a, dim, BLOCK_D)
    acc = tl.zeros([BLOCK_OUT, BLOCK_D], tl.float32)
    bias_acc = tl.zeros([BLOCK_OUT], tl.float32)
    if SIGMOID:
        bias = tl.load(bias_ptr).to(tl.float32)
        grad_positive = tl.load(sign_grads_ptr)
        grad_negative = tl.load(sign_grads_ptr + 1)
    for start in range(0, n_in, BLOCK_IN):
        offs_in = start + tl.arange(0, BLOCK_IN)
        b = _load_lines(b_ptr, offs_in, n_in, stride_b, dim, BLOCK_D)
        z = tl.dot(a, tl.trans(b), input_precision=PRECISION) * scale  # (BO, BI)
        i, j = _tile_indices(offs_out, offs_in, TRANSPOSED)
        inside, own, same = _pair_masks(i, j, n, m, row_index_ptr, row_groups_ptr, col_groups_ptr, HAS_GROUPS)
        if SIGMOID:
            if GROUPS_POSITIVE:
                positive = own | same
            else:
                positive = own
            allowed = inside & (positive | ~same)
            x = z + bias
            weight = tl.sigmoid(tl.where(positive, -x, x))  # d softplus(u) / du
            g = tl.where(positive, -grad_positive * weight, grad_negative * weight)
            g = tl.where(allowed, g, 0.0)
            bias_acc += tl.sum(g, 1)
        else:
            allowed = inside & (own | ~same)
            lse_i = tl.load(lse_rows_ptr + i, mask=i < n, other=float("inf"))  # padding: exp(-inf) = 0
            g_i = tl.load(grad_rows_ptr + i, mask=i < n, other=0.0)
            g = g_i * tl.exp(z - lse_i)
            if HAS_COLS:
                lse_j = tl.load(lse_cols_ptr + j, mask=j < m, other=float("inf"))
                h_j = tl.load(grad_cols_ptr + j, mask=j < m, other=0.0)
                g += h_j * tl.exp(z - lse_j)
            g = tl.where(allowed, g, 0.0)  # also drops inf * 0 of masked and fully empty lines
        if b.dtype == tl.float16:  # G ~ 1 / (2 N^2): below fp16's smallest subnormal (6e-8) from N ~ 3000
            acc += tl.dot(g, b.to(tl.float32), input_precision="ieee")  # (BO, BD)
        else:  # fp32, or bf16 (fp32's exponent range)
            acc += tl.dot(g.to(b.dtype), b, input_precision=PRECISION)
    d = tl.arange(0, BLOCK_D)
    rows = offs_out.to(tl.int64)
    mask = (offs_out[:, None] < n_out) & (d[None, :] < dim)
    tl.store(out_ptr + rows[:, None] * stride_out + d[None, :], acc, mask=mask)
    if SIGMOID:
        tl.store(bias_grad_ptr + offs_out, bias_acc, mask=offs_out < n_out)


# ------------------------------------------------------------------------------ launching

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SMALLEST_BLOCK = 16  # tl.dot's minimum: _launch shrinks BLOCK_OUT and BLOCK_IN down to it, never BLOCK_D
HOPPER_SHARED_MEMORY = 227 * 1024  # H100 / H200 opt-in shared memory a block, when torch does not say


def _check_inputs(queries: Tensor) -> None:
    """Refuse, with what to do instead, what the kernels would not compile or would get wrong."""
    if queries.dtype not in KERNEL_DTYPES:  # float64 makes the fp32 loop-carried sums fp64: no compile
        raise TypeError(f"the Triton tiled loss takes float32, bfloat16 or float16 embeddings, not {queries.dtype}: "
                        "cast them, or set ALIGN_TILED_BACKEND=torch (or auto, which keeps them on the torch kernels)")
    if INTERPRETED and queries.dtype == torch.bfloat16:  # the interpreter keeps bf16 as uint16 and multiplies the bits
        raise TypeError("Triton's interpreter (TRITON_INTERPRET=1) gets torch.bfloat16 dots wrong: check bfloat16 "
                        "embeddings on a GPU, or cast them to float32 for the interpreter")
    if not queries.is_cuda and not INTERPRETED:
        raise RuntimeError(
            "the Triton tiled loss needs CUDA tensors; on CPU set TRITON_INTERPRET=1 before "
            "align.losses.tiled_triton is imported (tests) or ALIGN_TILED_BACKEND=torch")


def _block_d(dim: int) -> int:
    return max(SMALLEST_BLOCK, triton.next_power_of_2(max(dim, 1)))


def shared_memory_needed(dim: int, dtype: torch.dtype) -> int:
    """Bytes of shared memory the neediest kernel takes at the smallest blocks (16 x 16) for rows
    of size ``dim``: what no block size brings down, since every tile holds whole rows.

    That is two 16-row tiles padded to BLOCK_D in the input dtype (for fp16 the gradient
    kernel's inner tile as the fp32 copy its second product takes) and at most 8 KiB of scratch,
    as Triton 3.8 compiles them for sm_90 (fp32 D = 1024: 129 KiB, D = 1280: 257 KiB; bf16
    D = 2048: 136 KiB; fp16 D = 2048: 193 KiB). An H100's 227 KiB a block thus takes fp32 rows
    up to 1024 and 16-bit rows up to 2048.
    """
    per_column = {torch.float32: 4 + 4, torch.float16: 2 + 4}.get(dtype, 2 + 2)
    return SMALLEST_BLOCK * _block_d(dim) * per_column + 8 * 1024


def _shared_memory_limit(device: torch.device) -> int:
    """Shared memory one block may use on ``device`` (bytes, the opt-in limit Triton checks)."""
    properties = torch.cuda.get_device_properties(device)
    return int(getattr(properties, "shared_memory_per_block_optin", HOPPER_SHARED_MEMORY))


def unsupported(queries: Tensor) -> Optional[str]:
    """Why the kernels cannot take these CUDA embeddings (None when they can): the auto backend
    keeps the torch kernels for them."""
    if queries.dtype not in KERNEL_DTYPES:
        return f"{queries.dtype} embeddings (the kernels take {', '.join(map(str, KERNEL_DTYPES))})"
    dim = queries.shape[-1]
    need, limit = shared_memory_needed(dim, queries.dtype), _shared_memory_limit(queries.device)
    if need > limit:
        return (f"D={dim} {queries.dtype} embeddings (whole rows padded to {_block_d(dim)} need about {need} bytes "
                f"of shared memory a block, this GPU has {limit})")
    return None


def _blocks(dim: int, dtype: torch.dtype, tile: int) -> Tuple[int, int, int, int, int]:
    """(BLOCK_OUT, BLOCK_IN, BLOCK_D, num_warps, num_stages) for embeddings of size ``dim``.

    The gradient accumulator (BLOCK_OUT, BLOCK_D) fp32 lives in registers (kept near 128 a
    thread with 8 warps) and the outer and inner tiles in shared memory, so wide embeddings get
    fewer lines per program; fp32 inputs halve BLOCK_OUT (twice the bytes). ``tile`` caps both
    block sizes (a power of two >= 16, tl.dot's minimum). Untuned guesses for H100-class GPUs;
    ``_launch`` halves BLOCK_OUT and BLOCK_IN, down to 16 x 16 with one stage, while the GPU
    lacks shared memory for them. BLOCK_D stays (every tile holds whole rows), so rows too wide
    for 16 x 16 blocks (``shared_memory_needed``) cannot run: auto keeps the torch kernels for
    them, and ``_launch`` turns the GPU's refusal into an error that says so.
    """
    block_d = _block_d(dim)
    size = 4 if dtype == torch.float32 else 2
    if block_d <= 256:
        out, inner, warps = 128, 64, 4 if block_d <= 64 else 8
    elif block_d <= 512:
        out, inner, warps = 64, 32, 8
    else:
        out, inner, warps = 32, 32, 8
    if size == 4:
        out //= 2
    cap = max(SMALLEST_BLOCK, 1 << (max(int(tile), 1).bit_length() - 1))
    out, inner = min(out, cap), min(inner, cap)
    stages = 2 if (out + 2 * inner) * block_d * size <= 160 * 1024 else 1
    return out, inner, block_d, warps, stages


def _launch(kernel, lines: int, queries: Tensor, tile: int, *args, **constants) -> None:
    """Run ``kernel`` over ``lines`` outer lines of embeddings like ``queries``, halving the
    blocks while the GPU lacks room; an error naming D and the dtype when even 16 x 16 lacks it."""
    _check_inputs(queries)
    dim, dtype = queries.shape[1], queries.dtype
    block_out, block_in, block_d, warps, stages = _blocks(dim, dtype, tile)
    while True:
        try:
            kernel[(triton.cdiv(lines, block_out),)](
                *args, BLOCK_OUT=block_out, BLOCK_IN=block_in, BLOCK_D=block_d, PRECISION=_precision(dtype),
                num_warps=warps, num_stages=stages, **constants)
            return
        except OutOfResources as error:  # raised when compiling, before anything is written
            if block_out == block_in == SMALLEST_BLOCK and stages == 1:
                raise RuntimeError(
                    f"the fused Triton loss kernels do not fit this GPU for D={dim} {dtype} embeddings: every "
                    f"tile holds whole rows (padded to {block_d}) and even {SMALLEST_BLOCK} x {SMALLEST_BLOCK} "
                    f"blocks ran out ({error}); set ALIGN_TILED_BACKEND=torch") from error
            block_out, block_in = max(SMALLEST_BLOCK, block_out // 2), max(SMALLEST_BLOCK, block_in // 2)
            stages = 1


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # ignored for bf16/fp16 operands


def _group_pointers(row_index: Tensor, row_groups: Optional[Tensor], col_groups: Optional[Tensor]):
    if row_groups is None:
        return row_index, row_index, False  # never read: HAS_GROUPS is off
    return row_groups.contiguous(), col_groups.contiguous(), True


def _lse(queries: Tensor, keys: Tensor, scale: float, row_index: Tensor, row_groups, col_groups,
         tile: int, transposed: bool) -> Tensor:
    n, m, dim = queries.shape[0], keys.shape[0], queries.shape[1]
    lines = m if transposed else n
    out = torch.full((lines,), float("-inf"), dtype=torch.float32, device=queries.device)
    if n == 0 or m == 0:
        return out
    a, b = (keys, queries) if transposed else (queries, keys)
    rows_g, cols_g, has_groups = _group_pointers(row_index, row_groups, col_groups)
    _launch(_lse_kernel, lines, queries, tile,
            out, a, b, row_index, rows_g, cols_g, n, m, dim, a.stride(0), b.stride(0), scale,
            TRANSPOSED=transposed, HAS_GROUPS=has_groups)
    return out


def _grads(queries: Tensor, keys: Tensor, scale: float, row_index: Tensor, row_groups, col_groups, tile: int,
           *, transposed: bool, lse_rows: Optional[Tensor] = None, grad_rows: Optional[Tensor] = None,
           lse_cols: Optional[Tensor] = None, grad_cols: Optional[Tensor] = None,
           bias: Optional[Tensor] = None, sign_grads: Optional[Tensor] = None,
           groups_positive: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    """fp32 (n, D) sum_j G_ij k_j (rows) or (M, D) sum_i G_ij q_i (``transposed``), and for the
    sigmoid rows pass the (n,) row sums of G."""
    n, m, dim = queries.shape[0], keys.shape[0], queries.shape[1]
    lines = m if transposed else n
    out = torch.zeros((lines, dim), dtype=torch.float32, device=queries.device)
    sigmoid = bias is not None
    bias_rows = torch.zeros(lines if sigmoid else 0, dtype=torch.float32, device=queries.device)
    if n == 0 or m == 0:
        return out, bias_rows
    a, b = (keys, queries) if transposed else (queries, keys)
    rows_g, cols_g, has_groups = _group_pointers(row_index, row_groups, col_groups)
    has_cols = lse_cols is not None and lse_cols.numel() > 0
    dummy = out  # stands in for pointers a variant never reads
    _launch(_grad_kernel, lines, queries, tile,
            out, bias_rows if sigmoid else dummy, a, b, row_index, rows_g, cols_g,
            lse_rows if lse_rows is not None else dummy, grad_rows if grad_rows is not None else dummy,
            lse_cols if has_cols else dummy, grad_cols if has_cols else dummy,
            bias if sigmoid else dummy, sign_grads if sigmoid else dummy,
            n, m, dim, a.stride(0), b.stride(0), out.stride(0), scale,
            SIGMOID=sigmoid, TRANSPOSED=transposed, HAS_GROUPS=has_groups, GROUPS_POSITIVE=groups_positive,
            HAS_COLS=has_cols)
    return out, bias_rows


def _prepare(queries: Tensor, keys: Tensor, row_index: Tensor, row_groups, col_groups):
    _check_inputs(queries)
    if queries.dtype != keys.dtype:
        raise TypeError(f"queries are {queries.dtype} but keys {keys.dtype}: cast one of them")
    groups = (None, None) if row_groups is None else (row_groups.long().contiguous(), col_groups.long().contiguous())
    return queries.contiguous(), keys.contiguous(), row_index.long().contiguous(), *groups


# ---------------------------------------------------------------------------- autograd

class TritonLogSumExp(torch.autograd.Function):
    """``tiled_logsumexp`` with fused Triton kernels; same arguments and outputs."""

    @staticmethod
    def forward(ctx, queries, keys, logit_scale, row_index, row_groups, col_groups, tile, both):
        q, k, index, row_g, col_g = _prepare(queries, keys, row_index, row_groups, col_groups)
        scale = float(logit_scale)
        lse_rows = _lse(q, k, scale, index, row_g, col_g, tile, transposed=False)
        if both:
            lse_cols = _lse(q, k, scale, index, row_g, col_g, tile, transposed=True)
        else:
            lse_cols = torch.zeros(0, dtype=torch.float32, device=queries.device)
        ctx.save_for_backward(q, k, logit_scale, index, row_g, col_g, lse_rows, lse_cols)
        ctx.tile, ctx.both, ctx.scale = tile, both, scale
        return lse_rows, lse_cols

    @staticmethod
    def backward(ctx, grad_rows, grad_cols):
        q, k, logit_scale, index, row_g, col_g, lse_rows, lse_cols = ctx.saved_tensors
        weights = dict(lse_rows=lse_rows, grad_rows=grad_rows.float().contiguous())
        if ctx.both:
            weights.update(lse_cols=lse_cols, grad_cols=grad_cols.float().contiguous())
        grad_q, _ = _grads(q, k, ctx.scale, index, row_g, col_g, ctx.tile, transposed=False, **weights)
        grad_k, _ = _grads(q, k, ctx.scale, index, row_g, col_g, ctx.tile, transposed=True, **weights)
        grad_scale, grad_q = _finish_query_grads(q, grad_q, logit_scale, ctx.scale)
        grad_k = grad_k.mul_(ctx.scale).to(k.dtype)
        return grad_q, grad_k, grad_scale, None, None, None, None, None


class TritonSigmoidPairs(torch.autograd.Function):
    """``tiled_sigmoid_pairs`` with fused Triton kernels; same arguments and outputs."""

    @staticmethod
    def forward(ctx, queries, keys, logit_scale, logit_bias, row_index, row_groups, col_groups,
                groups_positive, tile):
        q, k, index, row_g, col_g = _prepare(queries, keys, row_index, row_groups, col_groups)
        scale = float(logit_scale)
        positive, negative = _sigmoid_sums(q, k, scale, logit_bias, index, row_g, col_g, bool(groups_positive), tile)
        ctx.save_for_backward(q, k, logit_scale, logit_bias, index, row_g, col_g)
        ctx.tile, ctx.groups_positive, ctx.scale = tile, bool(groups_positive), scale
        return positive.float(), negative.float()

    @staticmethod
    def backward(ctx, grad_positive, grad_negative):
        q, k, logit_scale, logit_bias, index, row_g, col_g = ctx.saved_tensors
        grad_q, grad_k, grad_bias = _sigmoid_grads(q, k, ctx.scale, logit_bias, index, row_g, col_g,
                                                   ctx.groups_positive, ctx.tile, grad_positive, grad_negative)
        grad_scale, grad_q = _finish_query_grads(q, grad_q, logit_scale, ctx.scale)
        grad_bias = grad_bias.to(logit_bias.dtype).reshape(logit_bias.shape)
        return grad_q, grad_k.to(k.dtype), grad_scale, grad_bias, None, None, None, None, None


def _sigmoid_sums(q: Tensor, k: Tensor, scale: float, logit_bias: Tensor, index: Tensor, row_g: Optional[Tensor],
                  col_g: Optional[Tensor], groups_positive: bool, tile: int) -> Tuple[Tensor, Tensor]:
    """fp64 sums of softplus(-y (s q k^T + t)) over the positive and over the negative pairs of
    q (n, D) against k (m, D) (a whole batch, or one block of the ring): per-row fp32 sums from
    the kernel, summed over rows in fp64 (as the torch path sums its tiles)."""
    n, m, dim = q.shape[0], k.shape[0], q.shape[1]
    positive = torch.zeros(n, dtype=torch.float32, device=q.device)
    negative = torch.zeros(n, dtype=torch.float32, device=q.device)
    if n > 0 and m > 0:
        bias = logit_bias.detach().float().reshape(1)
        rows_g, cols_g, has_groups = _group_pointers(index, row_g, col_g)
        _launch(_sigmoid_kernel, n, q, tile,
                positive, negative, q, k, bias, index, rows_g, cols_g, n, m, dim, q.stride(0), k.stride(0),
                scale, HAS_GROUPS=has_groups, GROUPS_POSITIVE=groups_positive)
    return positive.sum(dtype=torch.float64), negative.sum(dtype=torch.float64)


def _sigmoid_grads(q: Tensor, k: Tensor, scale: float, logit_bias: Tensor, index: Tensor, row_g: Optional[Tensor],
                   col_g: Optional[Tensor], groups_positive: bool, tile: int, grad_positive: Tensor,
                   grad_negative: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """fp32 (n, D) sum_j G_ij k_j and (m, D) s sum_i G_ij q_i, and the fp64 sum of G (the bias
    gradient), G_ij = d(grad_positive * positive_sum + grad_negative * negative_sum) / dz_ij."""
    bias = logit_bias.detach().float().reshape(1)
    sign_grads = torch.stack([grad_positive.float().reshape(()), grad_negative.float().reshape(())])
    common = dict(bias=bias, sign_grads=sign_grads, groups_positive=groups_positive)
    grad_q, bias_rows = _grads(q, k, scale, index, row_g, col_g, tile, transposed=False, **common)
    grad_k, _ = _grads(q, k, scale, index, row_g, col_g, tile, transposed=True, **common)
    return grad_q, grad_k.mul_(scale), bias_rows.sum(dtype=torch.float64)
