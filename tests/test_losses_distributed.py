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
from tests.conftest import launch_two_processes
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


def rel(x, y):
    return float((x - y).abs().max() / y.abs().max().clamp(min=1e-12))


@pytest.mark.multiprocess
@pytest.mark.parametrize("scenario_name", ["unequal", "empty_rank"])
@pytest.mark.parametrize("key,name,kwargs", LOSS_CASES, ids=[case[0] for case in LOSS_CASES])
def test_two_ranks_equal_one_process(two_process_results, scenario_name, key, name, kwargs):
    data, results = two_process_results
    inputs = data["scenarios"][scenario_name]
    dist, ref = results[scenario_name][key], single_process(inputs, data["scale"], name, kwargs)
    assert dist["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-5)
    assert rel(dist["a"], ref["a"]) < 1e-5, "gradient of a"
    assert rel(dist["b"], ref["b"]) < 1e-5, "gradient of b"
    assert rel(dist["params"], ref["params"]) < 1e-5, "gradient of logit scale / bias"
