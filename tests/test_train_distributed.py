"""The recipe itself under DDP: `accelerate launch train.py` on two processes trains the same model
as one process given the same global batch.

In manifest mode a global step takes the next ``world_size * batch_size`` rows of the epoch's
order and rank r takes its r-th slice, augmentations are seeded per sample, and the losses gather
features across ranks with gradients; so two ranks of 16 and one process of 32 see the same rows
and the same negatives, and differ only by floating-point summation order.
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from align.config import load_config
from align.train.recipe import train
from tests.conftest import REPO, launch_two_processes
from tests.test_train_e2e import tiny_overrides


def overrides(demo, out, batch_size):
    return tiny_overrides(demo, out, f"data.batch_size={batch_size}", "train.max_steps=3", "optim.warmup_steps=1",
                          "optim.grad_clip=1.0", "train.save_every=0", "train.keep_checkpoints=1")


@pytest.mark.multiprocess
def test_two_processes_train_the_same_model_as_one(small_demo, tmp_path):
    single = train(load_config(None, overrides(small_demo, tmp_path / "one", 32)))

    launched = launch_two_processes(os.path.join(REPO, "train.py"), *overrides(small_demo, tmp_path / "two", 16),
                                    timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "3 steps of 32 samples" in launched.stdout  # the global batch is logged, not the per-rank one

    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["samples"] == 3 * 32
    ones = [h["loss"] for h in single["history"]]
    twos = [h["loss"] for h in summary["history"]]
    assert twos == pytest.approx(ones, rel=1e-4)  # the logged loss is the global one, not rank 0's share

    a = load_file(os.path.join(single["checkpoint"], "model.safetensors"))
    b = load_file(os.path.join(summary["checkpoint"], "model.safetensors"))
    assert a.keys() == b.keys()
    # Measured: at most 2.3e-6 apart (summation order) after three AdamW steps. Adam divides by
    # the gradient's size, so a float32 rounding of relative size r in a gradient moves a step of
    # lr = 2e-3 by about lr * r; only a weight whose gradient is itself below rounding could move
    # by up to lr, and none here has one.
    for key in a:
        assert torch.allclose(a[key], b[key], atol=2e-5), (key, (a[key] - b[key]).abs().max())

    # Rank 0 evaluated the held-out split while the other waited, and got the single run's figures.
    for pair, metrics in single["eval"].items():
        assert summary["eval"][pair]["n_queries"] == metrics["n_queries"]
        assert summary["eval"][pair]["mAP"] == pytest.approx(metrics["mAP"], abs=0.02), pair
