"""AdamW groups, kernel choice and the warmup + cosine schedule."""
import math

import pytest
import torch
from torch import nn

from align.config import OptimConfig
from align.train.optim import build_optimizer, build_scheduler, lr_factor, param_groups


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.towers = nn.ModuleDict({"text": nn.Sequential(nn.Embedding(50, 8), nn.LayerNorm(8)),
                                     "image": nn.Linear(12, 8)})
        self.log_logit_scale = nn.Parameter(torch.tensor(2.0))


def run_steps(implementation: str, steps: int = 5) -> nn.Module:
    torch.manual_seed(0)
    model = Toy().double()  # float64: the kernels agree to rounding (~1e-16) on any CPU
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.1, implementation=implementation),
                                {"image": 0.5})
    for _ in range(steps):
        tokens, pixels = torch.randint(0, 50, (6,)), torch.randn(6, 12).double()
        loss = (model.towers["text"](tokens) * model.towers["image"](pixels)).sum() * model.log_logit_scale.exp()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


def test_auto_picks_the_fused_kernel_on_cpu():
    optimizer = build_optimizer(Toy(), OptimConfig(), {})
    assert optimizer.defaults["fused"] is True


@pytest.mark.parametrize("implementation", ["fused", "foreach", "auto"])
def test_every_kernel_gives_the_python_loops_update(implementation):
    reference, other = run_steps("loop"), run_steps(implementation)
    for (name, a), (_, b) in zip(reference.named_parameters(), other.named_parameters()):
        # in float64 two correct kernels agree to ~1e-15; five AdamW steps of lr 1e-2 move weights by ~1e-2
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-10), name


def test_groups_split_decay_and_tower_scale():
    groups = param_groups(Toy(), OptimConfig(lr=1.0, weight_decay=0.3), {"image": 0.5})
    by_key = {(g["weight_decay"], g["lr"]): sorted(g["names"]) for g in groups}
    assert by_key[(0.3, 0.5)] == ["towers.image.weight"]
    assert by_key[(0.0, 0.5)] == ["towers.image.bias"]
    assert (0.3, 1.0) not in by_key  # the token table (an nn.Embedding) is not decayed
    assert by_key[(0.0, 1.0)] == ["log_logit_scale", "towers.text.0.weight", "towers.text.1.bias",
                                  "towers.text.1.weight"]


def test_a_parameter_with_its_own_lr_gets_its_group_on_the_same_schedule():
    model = Toy()
    groups = param_groups(model, OptimConfig(lr=0.25, weight_decay=0.3), {"image": 0.5}, {"log_logit_scale": 0.01})
    own = [g for g in groups if "log_logit_scale" in g["names"]]
    assert len(own) == 1 and own[0]["names"] == ["log_logit_scale"] and own[0]["lr"] == pytest.approx(0.01)
    optimizer = build_optimizer(model, OptimConfig(lr=0.25, warmup_steps=2), {}, {"log_logit_scale": 0.01})
    scheduler = build_scheduler(optimizer, 10, OptimConfig(lr=0.25, warmup_steps=2))
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    factor = lr_factor(4, 10, OptimConfig(lr=0.25, warmup_steps=2))
    assert 0 < factor < 1  # past the warmup, on the way down
    assert sorted(g["lr"] for g in optimizer.param_groups) == pytest.approx([0.01 * factor] + [0.25 * factor] * 2)


def test_warmup_then_cosine_to_the_floor():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(optimizer, 10, OptimConfig(lr=1.0, warmup_steps=2, min_lr_ratio=0.1))
    lrs = []
    for _ in range(10):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[:2] == [0.5, 1.0]
    assert lrs[2] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_warmup_then_cosine_multiplier_by_hand():
    from align.schedule import warmup_cosine

    # warm-up 4 of 14 steps: 1/4, 2/4, 3/4, 4/4; then cos over the 10 remaining steps
    assert [warmup_cosine(s, 14, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmup_cosine(4, 14, 4) == 1.0  # progress 0
    assert warmup_cosine(9, 14, 4) == pytest.approx(0.5, abs=1e-15)  # half way: (1 + cos(pi/2)) / 2
    assert warmup_cosine(14, 14, 4) == pytest.approx(0.0, abs=1e-15)
    assert warmup_cosine(14, 14, 4, min_ratio=0.1) == pytest.approx(0.1, abs=1e-15)
    assert warmup_cosine(9, 14, 4, decay=False) == 1.0
