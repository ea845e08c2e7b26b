"""The tiled losses' kernels (align/losses/tiled.py, tiled_triton.py) with each embedding dtype
and width: fp16 keeps a large batch's small gradient weights, the fused Triton kernels refuse
float64 (and, in Triton's interpreter, bf16), and rows too wide for a GPU's shared memory stay
on the torch kernels (auto) or fail with an error that says why (triton).

The Triton cases run in one child process started with TRITON_INTERPRET=1 (Triton reads it when
the kernels' module is imported, see tests/test_tiled_triton.py). No GPU here: the backend
choice is checked on a CPU tensor that says it is on CUDA, with an H100's shared memory limit.

fp16 inputs are rows of +-1/4 in D = 16 (unit vectors) and noisy copies: fp16 holds them and
every partial sum of their dot products (multiples of 1/16 up to 1) exactly, so whatever the
CPU does with an fp16 product, the logits are exact before the fp32 scaling, and the gradients
lie within float32 rounding of float64 (plus the fp16 rounding of the returned gradients).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from tests.conftest import EPS32, logit_error
from tests.test_tiled_triton import worst

ROOT = Path(__file__).resolve().parents[1]
EPS16 = 2.0 ** -11  # fp16 unit roundoff
HALF_SUBNORMAL16 = 2.0 ** -25  # the largest absolute rounding error of an fp16 subnormal
SCALE = 1 / 0.07
H100_SHARED_MEMORY = 232448  # cudaDevAttrMaxSharedMemoryPerBlockOptin on an H100 / H200


def sign_rows(n: int, seed: int):
    """(n, 16) float64 rows of +-1/4 and a copy with a quarter of the signs flipped (the pairs)."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n, 16), generator=g) * 2 - 1
    flips = torch.where(torch.rand(n, 16, generator=g) < 0.25, -1, 1)
    return signs.double() / 4, (signs * flips).double() / 4


def fp16_lse_checks(backend: str, n: int, tile: int, seed: int = 0) -> dict:
    """``tiled_logsumexp`` of n fp16 rows against their n pairs, both directions, weighted as
    InfoNCE weighs them (1 / 2n each): worst gradient errors against float64 and their bounds.

    Bounds: a G_ij = w exp(z_ij - lse) is off relatively by 2 logit errors and the roundings of
    the exps, their arguments (|z - shift| <= 2s, on either path), the row sum of n terms over
    T <= n / 16 tiles, its log and shift (|lse| <= s + log n) and the products:
    2 logit_error + (7s + 3 log n + n + 2T + 8) EPS32. The products G k and G^T q add n + T + 3
    roundings of |G| |k|, the returned fp16 gradient one fp16 rounding (EPS16 relative, or
    2^-25 for a subnormal); ds = sum_i <q_i, (G k)_i> adds D + 2 roundings of |q| |G k|.
    """
    from align.losses.tiled import tiled_logsumexp

    a, b = sign_rows(n, seed)
    weight = 1.0 / (2 * n)
    q, k = a.half().requires_grad_(), b.half().requires_grad_()
    s = torch.tensor(SCALE, requires_grad=True)
    rows, cols = tiled_logsumexp(q, k, s, torch.arange(n), tile=tile, both=True, backend=backend)
    ((rows.double().sum() + cols.double().sum()) * weight).backward()

    # float64 reference, 1024 rows at a time: G = w (softmax over keys + softmax over queries)
    chunks = [slice(i, min(i + 1024, n)) for i in range(0, n, 1024)]
    lse_rows = torch.empty(n, dtype=torch.float64)
    lse_cols = torch.full((n,), float("-inf"), dtype=torch.float64)
    for chunk in chunks:
        z = SCALE * a[chunk] @ b.T  # (1024, n)
        lse_rows[chunk] = torch.logsumexp(z, 1)
        lse_cols = torch.logaddexp(lse_cols, torch.logsumexp(z, 0))
    g_k, g_q = torch.zeros(n, 16, dtype=torch.float64), torch.zeros(n, 16, dtype=torch.float64)
    g_abs_k, g_abs_q = torch.zeros_like(g_k), torch.zeros_like(g_q)  # |G| |k|, |G|^T |q|
    for chunk in chunks:
        z = SCALE * a[chunk] @ b.T
        weights = weight * (torch.exp(z - lse_rows[chunk, None]) + torch.exp(z - lse_cols[None, :]))  # G >= 0
        g_k[chunk] = weights @ b
        g_abs_k[chunk] = weights @ b.abs()
        g_q += weights.T @ a[chunk]
        g_abs_q += weights.T @ a[chunk].abs()
    ref_q, ref_k, ref_s = SCALE * g_k, SCALE * g_q, (a * g_k).sum()

    tiles = math.ceil(n / 16)
    weight_error = 2 * logit_error(16, SCALE) + (7 * SCALE + 3 * math.log(n) + n + 2 * tiles + 8) * EPS32
    relative = weight_error + (n + tiles + 3) * EPS32  # of |G| |k|, |G|^T |q|
    fp32_q, fp32_k = SCALE * relative * g_abs_k, SCALE * relative * g_abs_q
    bound_q = fp32_q + EPS16 * (ref_q.abs() + fp32_q) + HALF_SUBNORMAL16
    bound_k = fp32_k + EPS16 * (ref_k.abs() + fp32_k) + HALF_SUBNORMAL16
    bound_s = ((a.abs() * relative * g_abs_k).sum() + 18 * EPS32 * (a.abs() * g_abs_k).sum()
               + EPS32 * ref_s.abs())
    checks = {"grad_q": worst(q.grad - ref_q, bound_q), "grad_k": worst(k.grad - ref_k, bound_k),
              "grad_scale": worst(s.grad - ref_s, bound_s.reshape(1))}
    return {"grad_fn": type(rows.grad_fn).__name__, "checks": checks}


def assert_within(result: dict) -> None:
    for name, check in result["checks"].items():
        assert check["error"] <= check["bound"], (
            f"{name} is off by {check['error']:.3g}, over its float32 bound {check['bound']:.3g}")


def test_fp16_gradients_keep_a_large_batchs_small_weights():
    """At B = 8192 most of InfoNCE's gradient weights ~ 1 / (2 B^2) lie below fp16's smallest
    subnormal (6e-8): multiplied as fp16 they vanish (the logit scale's gradient drops ~4%)."""
    result = fp16_lse_checks("torch", 8192, tile=2048)
    assert result["grad_fn"] == "_TiledLogSumExpBackward"
    assert_within(result)


# ------------------------------------------------------------------ Triton's interpreter

def _refusal(function, *args, **kwargs) -> dict:
    try:
        function(*args, **kwargs)
    except (TypeError, ValueError) as error:
        return {"type": type(error).__name__, "message": str(error)}
    return {"type": None, "message": "ran"}


def _child() -> dict:
    from align.losses import tiled_triton
    from align.losses.tiled import tiled_logsumexp, tiled_sigmoid_pairs

    assert tiled_triton.INTERPRETED, "the child must run with TRITON_INTERPRET=1"
    # B = 1024 at logit scale 1/0.07: the logits' spread puts most weights below 6e-8 already
    results = {"fp16": fp16_lse_checks("triton", 1024, tile=128)}
    a, b = sign_rows(20, seed=1)
    index, scale = torch.arange(20), torch.tensor(SCALE)
    for dtype in (torch.float64, torch.bfloat16):
        q, k = a.to(dtype), b.to(dtype)
        results[str(dtype)] = {
            "lse": _refusal(tiled_logsumexp, q, k, scale, index, tile=16, backend="triton"),
            "sigmoid": _refusal(tiled_sigmoid_pairs, q, k, scale, torch.tensor(-10.0), index, tile=16,
                                backend="triton"),
        }
    return results


@pytest.fixture(scope="module")
def interpreted() -> dict:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "tests.test_tiled_dtypes"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"interpreter run failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_triton_fp16_gradients_keep_a_batchs_small_weights(interpreted):
    assert interpreted["fp16"]["grad_fn"] == "TritonLogSumExpBackward"
    assert_within(interpreted["fp16"])


@pytest.mark.parametrize("dtype,why", [("torch.float64", "float64"), ("torch.bfloat16", "interpreter")])
def test_triton_backend_refuses_what_its_kernels_cannot_compute(interpreted, dtype, why):
    """float64 makes the kernels' fp32 loop-carried sums fp64, which no GPU compiles (the
    interpreter runs it); the interpreter keeps bf16 as integers and multiplies their bits."""
    for function, refusal in interpreted[dtype].items():
        assert refusal["type"] == "TypeError", f"{function} with {dtype}: {refusal['message']}"
        assert dtype in refusal["message"] and why in refusal["message"], refusal["message"]


# ------------------------------------------------------------------ choosing the kernels

class _OnCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA: all ``tiled_backend`` and ``_launch`` read of one."""

    is_cuda = True


def cuda_like(dim: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(4, dim, dtype=dtype).as_subclass(_OnCuda)


@pytest.fixture
def h100(monkeypatch):
    """tiled_triton with an H100's shared memory a block, and no warning given yet."""
    pytest.importorskip("triton")
    from align.losses import tiled, tiled_triton

    monkeypatch.setattr(tiled_triton, "_shared_memory_limit", lambda device: H100_SHARED_MEMORY)
    monkeypatch.setattr(tiled, "_triton_importable", lambda: True)
    tiled._warn_once.cache_clear()
    yield tiled_triton
    tiled._warn_once.cache_clear()


# sm_90 shared memory of the neediest kernel (the gradient's) at 16 x 16 blocks, 8 warps, one
# stage, as Triton 3.8 compiles it (triton.compile(..., target=GPUTarget("cuda", 90, 32))):
# (dtype, BLOCK_D) -> bytes
COMPILED_SHARED_MEMORY = {
    (torch.float32, 512): 66560, (torch.float32, 1024): 132096, (torch.float32, 2048): 263168,
    (torch.bfloat16, 1024): 73728, (torch.bfloat16, 2048): 139264, (torch.bfloat16, 4096): 270336,
    (torch.float16, 1024): 99328, (torch.float16, 2048): 197632,
}


def name(value) -> str:
    return str(value).replace("torch.", "")


@pytest.mark.parametrize("dtype,block_d", list(COMPILED_SHARED_MEMORY), ids=name)
def test_shared_memory_estimate_covers_the_compiled_kernels(dtype, block_d):
    pytest.importorskip("triton")
    from align.losses.tiled_triton import shared_memory_needed

    compiled = COMPILED_SHARED_MEMORY[dtype, block_d]
    assert compiled <= shared_memory_needed(block_d, dtype) <= compiled + 8 * 1024
    assert shared_memory_needed(block_d // 2 + 1, dtype) == shared_memory_needed(block_d, dtype)  # padded rows


@pytest.mark.parametrize("dtype,widest", [(torch.float32, 1024), (torch.bfloat16, 2048), (torch.float16, 2048)],
                         ids=name)
def test_auto_backend_takes_the_triton_kernels_only_for_rows_that_fit(h100, dtype, widest):
    from align.losses.tiled import tiled_backend

    for dim in (16, 512, widest):
        assert tiled_backend(cuda_like(dim, dtype), "auto") == "triton", dim
    with pytest.warns(UserWarning, match=f"D={widest + 1} {dtype}") as caught:
        assert tiled_backend(cuda_like(widest + 1, dtype), "auto") == "torch"
        assert tiled_backend(cuda_like(widest + 1, dtype), "auto") == "torch"
    assert len(caught) == 1  # once, not every step
    assert tiled_backend(cuda_like(widest + 1, dtype), "triton") == "triton"  # asked for: it tries


def test_auto_backend_keeps_float64_on_the_torch_kernels(h100):
    from align.losses.tiled import tiled_backend

    with pytest.warns(UserWarning, match="float64"):
        assert tiled_backend(cuda_like(64, torch.float64), "auto") == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tiled_backend(torch.zeros(4, 64, dtype=torch.float64), "auto") == "torch"  # CPU: no warning


def test_triton_backend_names_width_and_dtype_when_even_16x16_blocks_do_not_fit(h100, monkeypatch):
    """The GPU refuses every block size (OutOfResources, as an H100 does for fp32 D = 1280): the
    launch halves the blocks down to 16 x 16, then says what to do instead."""
    from triton.runtime.errors import OutOfResources

    from align.losses.tiled import tiled_logsumexp

    tried = []

    class NoRoom:
        def __getitem__(self, grid):
            def launch(*args, BLOCK_OUT, BLOCK_IN, num_stages, **constants):
                tried.append((BLOCK_OUT, BLOCK_IN, num_stages))
                raise OutOfResources(263168, H100_SHARED_MEMORY, "shared memory")
            return launch

    monkeypatch.setattr(h100, "_lse_kernel", NoRoom())
    queries, keys = cuda_like(1280, torch.float32), cuda_like(1280, torch.float32)
    with pytest.raises(RuntimeError, match=r"D=1280 torch\.float32.*ALIGN_TILED_BACKEND=torch"):
        tiled_logsumexp(queries, keys, torch.tensor(SCALE), torch.arange(4), backend="triton")
    block_out, block_in, _, _, stages = h100._blocks(1280, torch.float32, 2048)
    assert tried[0] == (block_out, block_in, stages) and tried[-1] == (16, 16, 1)


if __name__ == "__main__":
    print(json.dumps(_child()))
