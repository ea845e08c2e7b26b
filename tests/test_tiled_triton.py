"""The fused Triton loss kernels (align/losses/tiled_triton.py) against float64 references.

Triton decides at ``@triton.jit`` time (when the kernels' module is imported) whether to compile
or to interpret, from TRITON_INTERPRET. So the kernels run in one child process started with
TRITON_INTERPRET=1 and ALIGN_TILED_BACKEND=triton (Triton's interpreter on CPU tensors, and
nothing leaks into the other tests of this pytest process). The child runs every case, measures
each output's float32 error against float64 and the rounding bound that error must stay under,
and prints them as JSON; the parent asserts case by case.

Bounds (EPS32 = float32 unit roundoff, unit embeddings of size D, logit scale s, lines of L
logits in T tiles):
- log-sum-exp: a logit is off by logit_error(D, s) (lse is 1-Lipschitz in the logits); each exp
  argument z - shift rounds once (|z - shift| <= 2s), the rescales exp(peak_old - peak_new)
  compound over tiles (their arguments add up to <= 2s, plus one rounding each), the sum of L
  positive terms adds L + T roundings, the log and the shift's addition 2 of |lse| <= s + log L.
- gradients: each G_ij = w p_ij is off relatively by its argument's error (logit + lse error
  + one rounding of |z - lse| <= 2s + log L) and 3 roundings (exp, product, sum of the two
  directions); the dot sum_j G_ij k_j adds L + 1 roundings of sum_j |G_ij k_j|, the scaling one.
  These bounds are per entry, from the float64 |G| @ |k|.
- sigmoid: softplus and sigmoid are 1- and 1/4-Lipschitz, so a pair's term moves by the logit
  error plus the bias addition's rounding (scaled by 1/4 for the gradient weight), plus 5
  roundings of its value; the per-row fp32 sums add M + T roundings of their totals.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import EPS32, infonce_error, infonce_grad_error, logit_error, siglip_error, siglip_grad_error

ROOT = Path(__file__).resolve().parents[1]
TILE = 16

# name -> (kind, n, M, D, scale, row offset, groups, both / groups_positive)
KERNEL_CASES = {
    "lse-rows-offset": ("lse", 37, 53, 24, 10.0, 9, False, False),
    "lse-rows-offset-groups": ("lse", 37, 53, 24, 10.0, 9, True, False),
    "lse-both-groups": ("lse", 45, 45, 16, 14.0, 0, True, True),
    "lse-both-scale100": ("lse", 70, 70, 8, 100.0, 0, False, True),
    "lse-tiny": ("lse", 5, 7, 32, 10.0, 2, False, False),
    "sigmoid-offset": ("sigmoid", 37, 53, 24, 10.0, 9, False, False),
    "sigmoid-groups-ignore": ("sigmoid", 45, 45, 16, 10.0, 0, True, False),
    "sigmoid-groups-positive": ("sigmoid", 29, 61, 16, 10.0, 17, True, True),
}
LOSS_CASES = ["infonce-ignore", "infonce-positive", "siglip-ignore", "siglip-positive"]
LOSS_BATCH, LOSS_DIM, LOSS_SCALE, LOSS_BIAS = 53, 16, 1 / 0.07, -10.0


def unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def worst(error: torch.Tensor, bound: torch.Tensor) -> dict:
    """The entry where the error uses most of its bound: {"error", "bound"} (floats)."""
    error, bound = error.detach().double().abs().reshape(-1), bound.detach().double().reshape(-1)
    ratio = torch.where(error > 0, error / bound.clamp(min=1e-300), torch.zeros_like(error))
    at = int(ratio.argmax())
    return {"error": float(error[at]), "bound": float(bound[at])}


# ------------------------------------------------------------------ child: kernel checks

def _groups(n: int, m: int, offset: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    col_groups = torch.randint(-1, max(m // 4, 2), (m,), generator=g)
    row_groups = col_groups[offset:offset + n].clone()  # a rank's rows inside the gathered batch
    return row_groups, col_groups


def _allowed_and_positive(n, m, offset, row_groups, col_groups, groups_positive):
    """(n, M) float64-side masks with the kernels' rules, built densely."""
    own = torch.zeros(n, m, dtype=torch.bool)
    own[torch.arange(n), torch.arange(n) + offset] = True
    if row_groups is None:
        return torch.ones(n, m, dtype=torch.bool), own
    same = (row_groups[:, None] == col_groups[None, :]) & (row_groups[:, None] >= 0)
    positive = own | same if groups_positive else own
    return ~same | positive, positive


def _dot_bounds(q, k, g_abs, weight_err, scale, lines_in_rows, lines_in_cols):
    """Per-entry bounds on s * G k (rows), s * G^T q (columns) and on ds, from float64 |G| and the
    absolute error of each G entry (weight_err, (n, M))."""
    qa, ka = q.abs(), k.abs()
    acc_q_err = weight_err @ ka + (lines_in_rows + 3) * EPS32 * (g_abs @ ka)  # (n, D), unscaled
    acc_k_err = weight_err.T @ qa + (lines_in_cols + 3) * EPS32 * (g_abs.T @ qa)
    ds_err = (qa * acc_q_err).sum() + (q.shape[1] + 2) * EPS32 * (qa * (g_abs @ ka)).sum()
    return scale * acc_q_err, scale * acc_k_err, ds_err


def _lse_case(n, m, dim, scale, offset, groups, both):
    from align.losses.tiled import tiled_logsumexp

    q, k = unit(n, dim, seed=n + 1), unit(m, dim, seed=m + 2)
    row_index = torch.arange(n) + offset
    row_groups, col_groups = _groups(n, m, offset, seed=dim) if groups else (None, None)
    w_rows = torch.rand(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    w_cols = torch.rand(m, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    q32, k32 = q.clone().requires_grad_(), k.clone().requires_grad_()
    s32 = torch.tensor(scale, requires_grad=True)
    rows, cols = tiled_logsumexp(q32, k32, s32, row_index, row_groups, col_groups, tile=TILE, both=both)
    loss = (rows.double() * w_rows).sum() + ((cols.double() * w_cols).sum() if both else 0.0)
    loss.backward()

    q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
    s64 = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    allowed, _ = _allowed_and_positive(n, m, offset, row_groups, col_groups, False)
    z = (s64 * q64 @ k64.T).masked_fill(~allowed, float("-inf"))
    ref_rows = torch.logsumexp(z, 1)
    ref_cols = torch.logsumexp(z, 0)
    ref_loss = (ref_rows * w_rows).sum() + ((ref_cols * w_cols).sum() if both else 0.0)
    ref_loss.backward()

    lerr = logit_error(dim, scale)

    def lse_bound(length: int) -> float:
        tiles = math.ceil(length / TILE)
        return lerr + (2 * scale + (2 * scale + tiles) + (length + tiles) + 3 + (scale + 2 * math.log(length))) * EPS32

    checks = {"lse_rows": worst(rows - ref_rows, torch.full((n,), lse_bound(m), dtype=torch.float64))}
    if both:
        checks["lse_cols"] = worst(cols - ref_cols, torch.full((m,), lse_bound(n), dtype=torch.float64))
    with torch.no_grad():
        zd = z.detach()
        g_abs = w_rows[:, None] * torch.exp(zd - ref_rows.detach()[:, None])  # (n, M) G's row part
        if both:
            g_abs = g_abs + w_cols[None, :] * torch.exp(zd - ref_cols.detach()[None, :])
        longest = max(n, m)
        relative = lerr + lse_bound(longest) + (2 * scale + math.log(longest) + 4) * EPS32
        bound_q, bound_k, bound_s = _dot_bounds(q.double(), k.double(), g_abs, relative * g_abs, scale, m, n)
    checks["grad_q"] = worst(q32.grad - q64.grad, bound_q)
    checks["grad_k"] = worst(k32.grad - k64.grad, bound_k)
    checks["grad_scale"] = worst(s32.grad - s64.grad, bound_s.reshape(1))
    return {"grad_fn": type(rows.grad_fn).__name__, "checks": checks}


def _sigmoid_case(n, m, dim, scale, offset, groups, groups_positive):
    from align.losses.tiled import tiled_sigmoid_pairs

    bias = -4.0
    q, k = unit(n, dim, seed=n + 5), unit(m, dim, seed=m + 6)
    row_index = torch.arange(n) + offset
    row_groups, col_groups = _groups(n, m, offset, seed=dim + 1) if groups else (None, None)
    q32, k32 = q.clone().requires_grad_(), k.clone().requires_grad_()
    s32, t32 = torch.tensor(scale, requires_grad=True), torch.tensor(bias, requires_grad=True)
    positive, negative = tiled_sigmoid_pairs(q32, k32, s32, t32, row_index, row_groups, col_groups,
                                             groups_positive=groups_positive, tile=TILE)
    (positive.double() + 0.5 * negative.double()).backward()

    q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
    s64 = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    t64 = torch.tensor(bias, dtype=torch.float64, requires_grad=True)
    allowed, labels = _allowed_and_positive(n, m, offset, row_groups, col_groups, groups_positive)
    x = s64 * q64 @ k64.T + t64
    terms = F.softplus(torch.where(labels, -x, x))
    ref_positive = terms[allowed & labels].sum()
    ref_negative = terms[allowed & ~labels].sum()
    (ref_positive + 0.5 * ref_negative).backward()

    lerr = logit_error(dim, scale)
    tiles = math.ceil(m / TILE)
    with torch.no_grad():
        xd, td = x.detach(), terms.detach()
        term_err = (lerr + xd.abs() * EPS32 + 5 * (td + 1) * EPS32) * allowed  # (n, M)
        checks = {}
        for name, value, ref, mask in (("positive", positive, ref_positive, labels),
                                       ("negative", negative, ref_negative, ~labels)):
            chosen = allowed & mask
            bound = term_err[chosen].sum() + (m + tiles + 2) * EPS32 * td[chosen].sum()
            checks[name] = worst(value - ref, bound.reshape(1))
        upstream = torch.where(labels, 1.0, 0.5).double() * allowed  # |dLoss/dterm|
        g_abs = upstream * torch.sigmoid(torch.where(labels, -xd, xd))  # |G|
        weight_err = upstream * (lerr + xd.abs() * EPS32) / 4 + 4 * EPS32 * g_abs
        bound_q, bound_k, bound_s = _dot_bounds(q.double(), k.double(), g_abs, weight_err, scale, m, n)
        bound_t = weight_err.sum() + (m + n + 3) * EPS32 * g_abs.sum()
    checks["grad_q"] = worst(q32.grad - q64.grad, bound_q)
    checks["grad_k"] = worst(k32.grad - k64.grad, bound_k)
    checks["grad_scale"] = worst(s32.grad - s64.grad, bound_s.reshape(1))
    checks["grad_bias"] = worst(t32.grad - t64.grad, bound_t.reshape(1))
    return {"grad_fn": type(positive.grad_fn).__name__, "checks": checks}


def _loss_case(name: str):
    """The tiled loss modules through the dispatch, with valid rows, groups and hard negatives,
    against the plain losses in float64 (conftest's float32 bounds, as test_losses does)."""
    from align.losses import InfoNCE, InfoNCETiled, SigLIP, SigLIPTiled

    family, same_group = name.split("-")
    batch, dim = LOSS_BATCH, LOSS_DIM
    a = unit(batch, dim, seed=11)
    b = F.normalize(a + 0.7 * unit(batch, dim, seed=12), dim=-1)
    g = torch.Generator().manual_seed(18)
    kwargs = dict(valid=torch.rand(batch, generator=g) > 0.25,
                  groups=torch.randint(-1, batch // 3, (batch,), generator=g),
                  negatives=unit(batch, 3, dim, seed=20), negatives_mask=torch.rand(batch, 3, generator=g) > 0.3)
    plain_cls, tiled_cls = (InfoNCE, InfoNCETiled) if family == "infonce" else (SigLIP, SigLIPTiled)
    tiled = tiled_cls(same_group=same_group, tile_size=TILE)
    plain = plain_cls(same_group=same_group).double()

    def run(loss, dtype):
        a_, b_ = a.to(dtype).clone().requires_grad_(), b.to(dtype).clone().requires_grad_()
        s_ = torch.tensor(LOSS_SCALE, dtype=dtype, requires_grad=True)
        out = loss(a_, b_, logit_scale=s_, **{**kwargs, "negatives": kwargs["negatives"].to(dtype)})
        out["loss"].backward()
        return out, a_.grad, b_.grad, s_.grad

    out, ga, gb, gs = run(tiled, torch.float32)
    ref, ra, rb, rs = run(plain, torch.float64)
    logits = batch + 3 + 2 * math.ceil(batch / TILE)  # + a rescale (exp and product) per tile
    if family == "infonce":
        loss_bound = infonce_error(dim, logits, batch, LOSS_SCALE)
        grad_bound = infonce_grad_error(dim, logits, batch, LOSS_SCALE)
        scale_bound = infonce_grad_error(dim, logits, batch, LOSS_SCALE, wrt_scale=True)
    else:
        loss_bound = siglip_error(dim, logits, batch, LOSS_SCALE, LOSS_BIAS, ref["loss"].item())
        grad_bound = siglip_grad_error(dim, logits, batch, LOSS_SCALE)
        scale_bound = siglip_grad_error(dim, logits, batch, LOSS_SCALE, wrt_scale=True)
    checks = {key: worst(out[key] - ref[key], torch.tensor([loss_bound])) for key in ref}
    checks["grad_a"] = worst(ga - ra, torch.full_like(ra, grad_bound))
    checks["grad_b"] = worst(gb - rb, torch.full_like(rb, grad_bound))
    checks["grad_scale"] = worst(gs - rs, torch.tensor([scale_bound]))
    if family == "siglip":
        checks["grad_bias"] = worst(tiled.logit_bias.grad - plain.logit_bias.grad, torch.tensor([scale_bound]))
    return {"grad_fn": type(out["loss"].grad_fn).__name__, "checks": checks}


def _child() -> dict:
    from align.losses import tiled_triton
    from align.losses.tiled import tiled_backend

    assert tiled_triton.INTERPRETED, "the child must run with TRITON_INTERPRET=1"
    results = {"backend": tiled_backend(torch.zeros(1))}
    for name, (kind, n, m, dim, scale, offset, groups, flag) in KERNEL_CASES.items():
        case = _lse_case if kind == "lse" else _sigmoid_case
        results[name] = case(n, m, dim, scale, offset, groups, flag)
    for name in LOSS_CASES:
        results[name] = _loss_case(name)
    return results


# --------------------------------------------------------------------------- parent tests

@pytest.fixture(scope="module")
def interpreted() -> dict:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "ALIGN_TILED_BACKEND": "triton", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "tests.test_tiled_triton"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"interpreter run failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(KERNEL_CASES) + LOSS_CASES)
def test_triton_kernels_match_float64_within_float32_rounding(interpreted, case):
    assert interpreted["backend"] == "triton"
    result = interpreted[case]
    for name, check in result["checks"].items():
        assert check["error"] <= check["bound"], (
            f"{case}: {name} is off by {check['error']:.3g}, over its float32 bound {check['bound']:.3g}")


def test_the_triton_functions_ran(interpreted):
    """The dispatch sent every case to the Triton kernels, not to the torch reference."""
    functions = {interpreted[case]["grad_fn"] for case in KERNEL_CASES}
    assert functions == {"TritonLogSumExpBackward", "TritonSigmoidPairsBackward"}, functions


def test_auto_backend_keeps_cpu_tensors_on_the_torch_path(monkeypatch):
    from align.losses.tiled import tiled_backend

    monkeypatch.delenv("ALIGN_TILED_BACKEND", raising=False)
    assert tiled_backend(torch.zeros(2, 2)) == "torch"
    assert tiled_backend(torch.zeros(2, 2), "auto") == "torch"
    assert tiled_backend(torch.zeros(2, 2), "triton") == "triton"
    monkeypatch.setenv("ALIGN_TILED_BACKEND", "cuda")
    with pytest.raises(ValueError, match="ALIGN_TILED_BACKEND"):
        tiled_backend(torch.zeros(2, 2))


if __name__ == "__main__":
    print(json.dumps(_child()))
