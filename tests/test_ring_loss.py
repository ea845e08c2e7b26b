"""The ring-exchange tiled InfoNCE and SigLIP (``exchange="ring"``) equal one process on the
whole batch.

Two and three gloo processes (tests/dist_ring_worker.py) run ``infonce_tiled`` and
``siglip_tiled`` with the key blocks passed round the ring instead of gathered, on batches split
unequally, with a rank that holds no valid row (and, on three ranks, one that holds no row at
all), groups spanning ranks ("ignore" and "positive") and explicit hard negatives, and one batch
with neither groups nor negatives; one scenario takes InfoNCE's exact-maxima pass (logit scale
100, short vectors). Three ranks make a block pass through a rank that neither owns nor ends it.
The reference is the plain ``infonce`` / ``siglip`` on the concatenated batch in float64; the
float32 ring lies within what float32 rounding allows of it (conftest's bounds).
"""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from align.losses import InfoNCETiled, SigLIPTiled
from align.losses.ring import ring_logsumexp, ring_sigmoid_pairs
from align.losses.tiled import SAFE_MARGIN
from tests.conftest import (RELAUNCH_ON, free_port, infonce_error, infonce_grad_error, launch_env,
                            launch_two_processes, siglip_error, siglip_grad_error)
from tests.test_losses_distributed import max_error, scenario, single_process

WORKER = Path(__file__).with_name("dist_ring_worker.py")
TILE = 4  # several tiles per block, blocks of 0-14 rows
BIAS = -10.0  # siglip_tiled's initial logit bias, the reference's too
RING_CASES = [("ring", "infonce_tiled", {"tile_size": TILE, "exchange": "ring"}),
              ("ring_positive", "infonce_tiled", {"tile_size": TILE, "exchange": "ring", "same_group": "positive"}),
              ("siglip_ring", "siglip_tiled", {"tile_size": TILE, "exchange": "ring"}),
              ("siglip_ring_positive", "siglip_tiled", {"tile_size": TILE, "exchange": "ring",
                                                        "same_group": "positive"})]


def ring_batch():
    gen = torch.Generator().manual_seed(4321)
    batch, dim, k = 24, 8, 2
    unequal = scenario(gen, batch, dim, k, invalid=[1, 3, 4, 15], split=10)
    unequal.update(scale=1 / 0.07, splits_by_world={2: [10], 3: [5, 14]})
    # two ranks: rank 0 holds rows 0-5, none valid; three ranks: rank 1 holds no row at all
    empty = scenario(gen, batch, dim, k, invalid=[0, 1, 2, 3, 4, 5, 17], split=6)
    empty.update(scale=1 / 0.07, splits_by_world={2: [6], 3: [6, 6]})
    # short queries at logit scale 100: some lse lies > SAFE_MARGIN below the shared shift
    exact = scenario(gen, batch, dim, k, invalid=[2, 20], split=13)
    exact["a"][::3] *= 0.05
    exact.update(scale=100.0, splits_by_world={2: [13], 3: [7, 16]})
    # no group and no explicit negative anywhere: the blocks travel without group ids
    plain = scenario(gen, batch, dim, 0, invalid=[7, 19], split=9)
    plain["groups"] = torch.full((batch,), -1, dtype=torch.long)
    plain.update(scale=1 / 0.07, splits_by_world={2: [9], 3: [8, 17]})
    return {"losses": RING_CASES,
            "scenarios": {"unequal": unequal, "empty_rank": empty, "exact": exact, "plain": plain}}


def launch(processes: int, *args: str, **env: str) -> subprocess.CompletedProcess:
    """The worker on ``processes`` gloo processes: accelerate's launch for two (as every other
    multi-process test), torchrun (which it wraps, and which starts faster) for three or with
    ``env`` added to the workers' environment."""
    if processes == 2 and not env:
        return launch_two_processes(str(WORKER), *args, timeout=120)
    for _ in range(3):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", str(free_port()), str(WORKER), *args]
        try:
            done = subprocess.run(command, cwd=WORKER.parent.parent, env={**launch_env(), **env},
                                  capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:  # a hung launch on a loaded machine: try again
            done = subprocess.CompletedProcess(command, -1, "", "(timed out after 120 s)")
            continue
        if done.returncode == 0 or not any(sign in done.stderr + done.stdout for sign in RELAUNCH_ON):
            break
    return done


# Triton's kernels run in its CPU interpreter (TRITON_INTERPRET=1, read when Triton compiles them)
TRITON = {"TRITON_INTERPRET": "1", "ALIGN_TILED_BACKEND": "triton", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module", params=[(2, "torch"), (3, "torch"), (2, "triton")],
                ids=["2ranks", "3ranks", "2ranks_triton"])
def ring_results(request, tmp_path_factory):
    """(world, inputs, results) of one launch of the worker on ``world`` processes, each block's
    tiles computed by ``tiled``'s torch kernels or by the Triton kernels (interpreted)."""
    processes, backend = request.param
    if backend == "triton":
        pytest.importorskip("triton")
    tmp = tmp_path_factory.mktemp(f"ring_{processes}_{backend}")
    data = ring_batch()
    torch.save(data, tmp / "inputs.pt")
    done = launch(processes, str(tmp / "inputs.pt"), str(tmp / "results.pt"), **(TRITON if backend == "triton" else {}))
    assert done.returncode == 0, done.stderr[-4000:]
    return processes, data, torch.load(tmp / "results.pt")


def float64(inputs):
    return {key: value.double() if value.is_floating_point() else value
            for key, value in inputs.items() if isinstance(value, torch.Tensor)}


def ring_bounds(loss, inputs, scale, world, value):
    """(loss, embedding gradient, scale (and bias) gradient) bounds on |float32 ring - exact|
    for ``loss`` ("infonce" or "siglip") whose exact value is ``value``.

    The loss's bounds over B + K logits a row, plus two roundings (an exp and a product) for each
    tile's rescale and two for each block's merge on the way round the ring (InfoNCE: logaddexp;
    SigLIP: a block's sums added to the row's, a key's gradient added to its running sum).
    """
    dim, k = inputs["a"].shape[1], inputs["negatives"].shape[1]
    rows = int(inputs["valid"].sum())
    logits = inputs["a"].shape[0] + k
    logits += 2 * math.ceil(logits / TILE) + 2 * world
    if loss == "siglip":
        return (siglip_error(dim, logits, rows, scale, BIAS, value), siglip_grad_error(dim, logits, rows, scale),
                siglip_grad_error(dim, logits, rows, scale, wrt_scale=True))
    return (infonce_error(dim, logits, rows, scale), infonce_grad_error(dim, logits, rows, scale),
            infonce_grad_error(dim, logits, rows, scale, wrt_scale=True))


@pytest.mark.multiprocess
@pytest.mark.parametrize("scenario_name", ["unequal", "empty_rank", "exact", "plain"])
@pytest.mark.parametrize("key,loss,same_group", [
    ("ring", "infonce", "ignore"), ("ring_positive", "infonce", "positive"),
    ("siglip_ring", "siglip", "ignore"), ("siglip_ring_positive", "siglip", "positive")])
def test_ring_equals_one_process_in_float64(ring_results, scenario_name, key, loss, same_group):
    world, data, results = ring_results
    inputs = data["scenarios"][scenario_name]
    ring = results[scenario_name][key]
    ref = single_process(float64(inputs), inputs["scale"], loss, {"same_group": same_group})
    loss_bound, grad_bound, scale_bound = ring_bounds(loss, inputs, inputs["scale"], world, ref["loss"].item())
    assert ring["loss"].item() == pytest.approx(ref["loss"].item(), abs=loss_bound)
    assert max_error(ring["a"], ref["a"]) <= grad_bound, "gradient of a"
    assert max_error(ring["b"], ref["b"]) <= grad_bound, "gradient of b"
    # the logit scale's, and SigLIP's bias's
    assert ring["params"].shape == ref["params"].shape
    assert max_error(ring["params"], ref["params"]) <= scale_bound, "gradient of the logit scale / bias"


def brute_force_lse(q, k, scale, groups):
    """float64 (n,) row and (n,) column lse of scale q k^T, same-group pairs other than i == j left out."""
    z = scale * q @ k.T
    same = (groups[:, None] == groups[None, :]) & (groups[:, None] >= 0)
    same.fill_diagonal_(False)
    z = z.masked_fill(same, float("-inf"))
    return torch.logsumexp(z, dim=1), torch.logsumexp(z, dim=0)


@pytest.mark.parametrize("path", ["shared_shift", "exact"])
def test_one_process_ring_logsumexp_matches_brute_force(path):
    """No process group: one block, the tiles of ``tiled`` walked by the ring's own backward."""
    n, dim = 13, 8
    gen = torch.Generator().manual_seed(5)
    q = F.normalize(torch.randn(n, dim, generator=gen), dim=1)
    k = F.normalize(q + 0.8 * torch.randn(n, dim, generator=gen), dim=1)
    scale_value = 1 / 0.07
    if path == "exact":  # short queries at scale 100: lse far below the shared shift
        q[::3] *= 0.05
        scale_value = 100.0
    groups = torch.tensor([0, 0, 1, -1, -1, 1, 2, 2, 2, -1, 4, -1, 4])
    weights_rows, weights_cols = torch.rand(n, generator=gen) * 2 - 1, torch.rand(n, generator=gen) * 2 - 1

    def run(dtype, lse):
        q_, k_ = q.to(dtype).clone().requires_grad_(), k.to(dtype).clone().requires_grad_()
        s_ = torch.tensor(scale_value, dtype=dtype, requires_grad=True)
        rows, cols = lse(q_, k_, s_)
        value = (rows.to(dtype) @ weights_rows.to(dtype) + cols.to(dtype) @ weights_cols.to(dtype)) / n
        value.backward()  # a mean over rows of weighted lse: the shape conftest's bounds assume
        return rows, cols, q_.grad, k_.grad, s_.grad

    rows, cols, gq, gk, gs = run(torch.float32, lambda q_, k_, s_: ring_logsumexp(q_, k_, s_, groups, tile=TILE))
    rows64, cols64, gq64, gk64, gs64 = run(torch.float64, lambda q_, k_, s_: brute_force_lse(q_, k_, s_, groups))
    if path == "exact":  # the scenario does take the exact pass
        assert bool((rows64 < scale_value * 1.0 * k.norm(dim=1).max() - SAFE_MARGIN).any())
    logits = n + 2 * math.ceil(n / TILE)
    rows, cols, rows64, cols64 = rows.detach(), cols.detach(), rows64.detach(), cols64.detach()
    assert max_error(rows, rows64) <= infonce_error(dim, logits, 1, scale_value)
    assert max_error(cols, cols64) <= infonce_error(dim, logits, 1, scale_value)
    assert max_error(gq, gq64) <= infonce_grad_error(dim, logits, n, scale_value)
    assert max_error(gk, gk64) <= infonce_grad_error(dim, logits, n, scale_value)
    assert max_error(gs, gs64) <= infonce_grad_error(dim, logits, n, scale_value, wrt_scale=True)


def brute_force_sigmoid_pairs(q, k, scale, bias, groups, groups_positive):
    """float64 sums of softplus(-y (scale q k^T + bias)) over the positive and the negative pairs:
    the own pair (i == j) positive, same-group pairs positive or left out."""
    x = scale * q @ k.T + bias
    own = torch.eye(q.shape[0], dtype=torch.bool)
    same = (groups[:, None] == groups[None, :]) & (groups[:, None] >= 0)
    positive = own | same if groups_positive else own
    negative = ~own & ~same
    losses = F.softplus(torch.where(positive, -x, x))
    return (losses * positive).sum(), (losses * negative).sum()


@pytest.mark.parametrize("groups_positive", [False, True], ids=["ignore", "positive"])
def test_one_process_ring_sigmoid_pairs_match_brute_force(groups_positive):
    """No process group: one block through the ring's sums and its backward's per-block gradients."""
    n, dim, scale_value, bias_value = 13, 8, 1 / 0.07, -4.0
    gen = torch.Generator().manual_seed(6)
    q = F.normalize(torch.randn(n, dim, generator=gen), dim=1)
    k = F.normalize(q + 0.8 * torch.randn(n, dim, generator=gen), dim=1)
    groups = torch.tensor([0, 0, 1, -1, -1, 1, 2, 2, 2, -1, 4, -1, 4])

    def run(dtype, pairs):
        q_, k_ = q.to(dtype).clone().requires_grad_(), k.to(dtype).clone().requires_grad_()
        s_ = torch.tensor(scale_value, dtype=dtype, requires_grad=True)
        t_ = torch.tensor(bias_value, dtype=dtype, requires_grad=True)
        positive, negative = pairs(q_, k_, s_, t_)
        # a mean over rows (the shape conftest's bounds assume); unequal weights tell the sums apart
        ((0.5 * positive.to(dtype) + negative.to(dtype)) / n).backward()
        return positive.detach() / n, negative.detach() / n, q_.grad, k_.grad, torch.stack([s_.grad, t_.grad])

    ring = run(torch.float32, lambda q_, k_, s_, t_: ring_sigmoid_pairs(
        q_, k_, s_, t_, groups, groups_positive=groups_positive, tile=TILE))
    exact = run(torch.float64, lambda q_, k_, s_, t_: brute_force_sigmoid_pairs(
        q_, k_, s_, t_, groups, groups_positive))
    cols = n + 2 * math.ceil(n / TILE)
    for name, got, want in zip(("positive", "negative"), ring[:2], exact[:2]):
        assert max_error(got, want) <= siglip_error(dim, cols, n, scale_value, bias_value, float(want)), name
    assert max_error(ring[2], exact[2]) <= siglip_grad_error(dim, cols, n, scale_value), "gradient of q"
    assert max_error(ring[3], exact[3]) <= siglip_grad_error(dim, cols, n, scale_value), "gradient of k"
    assert max_error(ring[4], exact[4]) <= siglip_grad_error(dim, cols, n, scale_value, wrt_scale=True)


@pytest.mark.parametrize("loss_cls", [InfoNCETiled, SigLIPTiled])
def test_one_process_ring_is_the_plain_tiled_loss(loss_cls):
    """With one process ``exchange="ring"`` runs the plain tiled path: bit for bit the same."""
    gen = torch.Generator().manual_seed(7)
    a = F.normalize(torch.randn(10, 6, generator=gen), dim=1)
    b = F.normalize(a + 0.5 * torch.randn(10, 6, generator=gen), dim=1)
    inputs = dict(valid=torch.arange(10) != 3, groups=torch.tensor([0, 0, 1, -1, 1, 2, -1, 2, -1, -1]),
                  negatives=F.normalize(torch.randn(10, 2, 6, generator=gen), dim=-1))
    outs = []
    for exchange in ("gather", "ring"):
        a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
        loss = loss_cls(tile_size=4, exchange=exchange)
        out = loss(a_, b_, logit_scale=torch.tensor(10.0), **inputs)
        out["loss"].backward()
        outs.append((out["loss"], a_.grad, b_.grad, *(p.grad for p in loss.parameters())))
    for plain, ring in zip(*outs):
        assert torch.equal(plain, ring)


@pytest.mark.parametrize("loss_cls", [InfoNCETiled, SigLIPTiled])
def test_exchange_is_a_checked_parameter(loss_cls):
    assert loss_cls.Config().exchange == "gather"
    assert loss_cls.from_config(loss_cls.Config(exchange="ring")).exchange == "ring"
    with pytest.raises(ValueError, match="exchange"):
        loss_cls(exchange="all_to_all")


def test_empty_rows_give_empty_lse_and_zero_gradients():
    q = torch.zeros(0, 4, requires_grad=True)
    k = torch.zeros(0, 4, requires_grad=True)
    s = torch.tensor(10.0, requires_grad=True)
    rows, cols = ring_logsumexp(q, k, s, None)
    assert rows.shape == cols.shape == (0,)
    (rows.sum() + cols.sum()).backward()
    assert q.grad.shape == (0, 4) and float(s.grad) == 0.0


def test_empty_rows_give_zero_sigmoid_sums_and_gradients():
    q = torch.zeros(0, 4, requires_grad=True)
    k = torch.zeros(0, 4, requires_grad=True)
    s, t = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    positive, negative = ring_sigmoid_pairs(q, k, s, t)
    assert positive.item() == negative.item() == 0.0
    (positive + negative).backward()
    assert q.grad.shape == k.grad.shape == (0, 4) and float(s.grad) == float(t.grad) == 0.0
