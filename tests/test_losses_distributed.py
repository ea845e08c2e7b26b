"""Two gloo processes give the same loss and gradients as one process on the whole batch.

One ``accelerate launch`` runs every loss (tests/dist_loss_worker.py) on two batches: ranks
holding unequal numbers of rows and of valid rows, and one rank holding no valid row at all.
Groups span both ranks and rows carry explicit negatives (which stay local).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F


from align.registry import LOSSES
from tests.conftest import (EPS32, infonce_error, infonce_grad_error, launch_two_processes, logit_error,
                            siglip_error, siglip_grad_error)
from tests.dist_loss_worker import scalar_grads

WORKER = Path(__file__).with_name("dist_loss_worker.py")
LOSS_CASES = [
    ("infonce", "infonce", {}),
    ("infonce_positive", "infonce", {"same_group": "positive"}),
    ("siglip", "siglip", {}),
    ("siglip_positive", "siglip", {"same_group": "positive"}),
    ("hcl", "hcl", {"beta": 1.0, "tau_plus": 0.1}),
    ("vsepp", "vsepp", {}),
    ("vsepp_infonce", "vsepp", {"infonce_weight": 0.5}),
    ("infonce_tiled", "infonce_tiled", {"tile_size": 4}),
    ("infonce_tiled_positive", "infonce_tiled", {"tile_size": 4, "same_group": "positive"}),
    ("siglip_tiled", "siglip_tiled", {"tile_size": 4}),
]


def scenario(gen, batch, dim, k, invalid, split):
    """One batch: b_i a noisy copy of a_i, invalid rows zeroed, groups spanning both ranks."""
    a = F.normalize(torch.randn(batch, dim, generator=gen), dim=1)
    b = F.normalize(a + 0.8 * torch.randn(batch, dim, generator=gen), dim=1)
    valid = torch.ones(batch, dtype=torch.bool)
    valid[invalid] = False
    a, b = a * valid[:, None], b * valid[:, None]
    groups = torch.full((batch,), -1, dtype=torch.long)
    groups[[0, 12, 20]] = 7  # a group across both ranks
    groups[[5, 6]] = 3
    groups[[9, 10]] = 11  # straddles the split
    negatives = F.normalize(a[:, None, :] + 0.5 * torch.randn(batch, k, dim, generator=gen), dim=-1)
    negatives_mask = torch.rand(batch, k, generator=gen) > 0.3
    return {"a": a, "b": b, "valid": valid, "groups": groups, "negatives": negatives,
            "negatives_mask": negatives_mask, "splits": [split]}


def fixed_batch():
    gen = torch.Generator().manual_seed(1234)
    batch, dim, k = 24, 8, 2
    return {
        "scale": 1 / 0.07,
        "losses": LOSS_CASES,
        "scenarios": {
            # rank 0 holds rows 0-9 (7 valid), rank 1 rows 10-23 (13 valid): unequal B and N
            "unequal": scenario(gen, batch, dim, k, invalid=[1, 3, 4, 15], split=10),
            # rank 0 holds rows 0-5, none valid: it must still take part in every gather
            "empty_rank": scenario(gen, batch, dim, k, invalid=[0, 1, 2, 3, 4, 5, 17], split=6),
        },
    }


def single_process(data, scale_value, name, kwargs):
    loss = LOSSES.get(name)(gather=True, **kwargs)
    a, b = data["a"].clone().requires_grad_(), data["b"].clone().requires_grad_()
    scale = torch.tensor(scale_value, requires_grad=True)
    out = loss(a, b, logit_scale=scale, valid=data["valid"], groups=data["groups"],
               negatives=data["negatives"], negatives_mask=data["negatives_mask"])
    out["loss"].backward()
    params = scalar_grads(scale, loss)
    return {"loss": out["loss"].detach(), "a": a.grad, "b": b.grad, "params": params}


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist_losses")
    data = fixed_batch()
    torch.save(data, tmp / "inputs.pt")
    done = launch_two_processes(str(WORKER), str(tmp / "inputs.pt"), str(tmp / "results.pt"), timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    return data, torch.load(tmp / "results.pt")


def max_error(x, y):
    return float((x.double() - y.double()).abs().max())


def rounding_bounds(name, kwargs, inputs, scale, loss):
    """(loss, embedding gradient, scalar gradient) bounds on |float32 - exact| for one process.

    Two processes and one compute the same float32 quantities in different orders (the gather
    concatenates; its backward adds the ranks' shares, one more rounding; halving is exact), so
    each lies within these bounds of the exact value and the two within twice them of each other.
    """
    dim, k = inputs["a"].shape[1], inputs["negatives"].shape[1]
    rows = int(inputs["valid"].sum())
    logits = inputs["a"].shape[0] + k
    if name.endswith("tiled"):
        logits += 2 * -(-logits // kwargs["tile_size"])  # each tile's rescale: an exp and a product
    if name.startswith("siglip"):
        return (siglip_error(dim, logits, rows, scale, -10.0, loss), siglip_grad_error(dim, logits, rows, scale),
                siglip_grad_error(dim, logits, rows, scale, wrt_scale=True))
    if name == "hcl":  # three logsumexps at up to (1 + beta) scale; debiasing scales by 1 / (1 - tau_plus)
        factor, scale = 3 / (1 - kwargs["tau_plus"]), (1 + kwargs["beta"]) * scale
        return (factor * infonce_error(dim, logits, rows, scale), factor * infonce_grad_error(dim, logits, rows, scale),
                factor * infonce_grad_error(dim, logits, rows, scale, wrt_scale=True))
    bounds = [0.0, 0.0, 0.0]
    if name == "vsepp":  # hinges of two cosines each (logit errors at scale 1), means over rows;
        # a gradient entry sums at most rows + 2 terms +-b_jk / rows (|.| <= 2 in all)
        bounds = [2 * (2 * logit_error(dim, 1.0) + (rows + 3) * 2.2 * EPS32), 2 * (rows + 4) * EPS32, 0.0]
        weight = kwargs.get("infonce_weight", 0.0)
    else:
        weight = 1.0
    if weight:
        bounds[0] += weight * infonce_error(dim, logits, rows, scale)
        bounds[1] += weight * infonce_grad_error(dim, logits, rows, scale)
        bounds[2] += weight * infonce_grad_error(dim, logits, rows, scale, wrt_scale=True)
    return tuple(bounds)


@pytest.mark.multiprocess
@pytest.mark.parametrize("scenario_name", ["unequal", "empty_rank"])
@pytest.mark.parametrize("key,name,kwargs", LOSS_CASES, ids=[case[0] for case in LOSS_CASES])
def test_two_ranks_equal_one_process(two_process_results, scenario_name, key, name, kwargs):
    data, results = two_process_results
    inputs = data["scenarios"][scenario_name]
    dist, ref = results[scenario_name][key], single_process(inputs, data["scale"], name, kwargs)
    loss_bound, grad_bound, param_bound = (2 * bound for bound in rounding_bounds(
        name, kwargs, inputs, data["scale"], ref["loss"].item()))
    assert dist["loss"].item() == pytest.approx(ref["loss"].item(), abs=loss_bound)
    assert max_error(dist["a"], ref["a"]) <= grad_bound, "gradient of a"
    assert max_error(dist["b"], ref["b"]) <= grad_bound, "gradient of b"
    assert max_error(dist["params"], ref["params"]) <= param_bound, "gradient of logit scale / bias"
