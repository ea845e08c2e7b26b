"""The ring-exchange tiled InfoNCE (``exchange="ring"``) equals one process on the whole batch.

Two and three gloo processes (tests/dist_ring_worker.py) run ``infonce_tiled`` with the key
blocks passed round the ring instead of gathered, on batches split unequally, with a rank that
holds no valid row (and, on three ranks, one that holds no row at all), groups spanning ranks
and explicit hard negatives; one scenario takes the exact-maxima pass (logit scale 100, short
vectors). Three ranks make a block pass through a rank that neither owns nor ends it. The
reference is the plain ``infonce`` on the concatenated batch in float64; the float32 ring lies
within what float32 rounding allows of it (conftest's bounds).
"""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from align.losses import InfoNCETiled
from align.losses.ring import ring_logsumexp
from align.losses.tiled import SAFE_MARGIN
from tests.conftest import (RELAUNCH_ON, free_port, infonce_error, infonce_grad_error, launch_env,
                            launch_two_processes)
from tests.test_losses_distributed import max_error, scenario, single_process

WORKER = Path(__file__).with_name("dist_ring_worker.py")
TILE = 4  # several tiles per block, blocks of 0-14 rows
RING_CASES = [("ring", "infonce_tiled", {"tile_size": TILE, "exchange": "ring"}),
              ("ring_positive", "infonce_tiled", {"tile_size": TILE, "exchange": "ring", "same_group": "positive"})]


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
    return {"losses": RING_CASES, "scenarios": {"unequal": unequal, "empty_rank": empty, "exact": exact}}


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


def ring_bounds(inputs, scale, world):
    """(loss, embedding gradient, scale gradient) bounds on |float32 ring - exact|.

    The InfoNCE bounds over B + K logits, plus two roundings (an exp and a product) for each
    tile's rescale and two for each block's merge (logaddexp) on the way round the ring.
    """
    dim, k = inputs["a"].shape[1], inputs["negatives"].shape[1]
    rows = int(inputs["valid"].sum())
    logits = inputs["a"].shape[0] + k
    logits += 2 * math.ceil(logits / TILE) + 2 * world
    return (infonce_error(dim, logits, rows, scale), infonce_grad_error(dim, logits, rows, scale),
            infonce_grad_error(dim, logits, rows, scale, wrt_scale=True))


@pytest.mark.multiprocess
@pytest.mark.parametrize("scenario_name", ["unequal", "empty_rank", "exact"])
@pytest.mark.parametrize("key,same_group", [("ring", "ignore"), ("ring_positive", "positive")])
def test_ring_equals_one_process_in_float64(ring_results, scenario_name, key, same_group):
    world, data, results = ring_results
    inputs = data["scenarios"][scenario_name]
    ring = results[scenario_name][key]
    ref = single_process(float64(inputs), inputs["scale"], "infonce", {"same_group": same_group})
    loss_bound, grad_bound, scale_bound = ring_bounds(inputs, inputs["scale"], world)
    assert ring["loss"].item() == pytest.approx(ref["loss"].item(), abs=loss_bound)
    assert max_error(ring["a"], ref["a"]) <= grad_bound, "gradient of a"
    assert max_error(ring["b"], ref["b"]) <= grad_bound, "gradient of b"
    assert max_error(ring["params"], ref["params"]) <= scale_bound, "gradient of the logit scale"


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


def test_one_process_ring_is_the_plain_tiled_loss():
    """With one process ``exchange="ring"`` runs the plain tiled path: bit for bit the same."""
    gen = torch.Generator().manual_seed(7)
    a = F.normalize(torch.randn(10, 6, generator=gen), dim=1)
    b = F.normalize(a + 0.5 * torch.randn(10, 6, generator=gen), dim=1)
    inputs = dict(valid=torch.arange(10) != 3, groups=torch.tensor([0, 0, 1, -1, 1, 2, -1, 2, -1, -1]),
                  negatives=F.normalize(torch.randn(10, 2, 6, generator=gen), dim=-1))
    outs = []
    for exchange in ("gather", "ring"):
        a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
        out = InfoNCETiled(tile_size=4, exchange=exchange)(a_, b_, logit_scale=torch.tensor(10.0), **inputs)
        out["loss"].backward()
        outs.append((out["loss"], a_.grad, b_.grad))
    for plain, ring in zip(*outs):
        assert torch.equal(plain, ring)


def test_exchange_is_a_checked_parameter():
    assert InfoNCETiled.Config().exchange == "gather"
    assert InfoNCETiled.from_config(InfoNCETiled.Config(exchange="ring")).exchange == "ring"
    with pytest.raises(ValueError, match="exchange"):
        InfoNCETiled(exchange="all_to_all")


def test_empty_rows_give_empty_lse_and_zero_gradients():
    q = torch.zeros(0, 4, requires_grad=True)
    k = torch.zeros(0, 4, requires_grad=True)
    s = torch.tensor(10.0, requires_grad=True)
    rows, cols = ring_logsumexp(q, k, s, None)
    assert rows.shape == cols.shape == (0,)
    (rows.sum() + cols.sum()).backward()
    assert q.grad.shape == (0, 4) and float(s.grad) == 0.0
