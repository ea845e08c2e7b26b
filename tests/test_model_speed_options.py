"""Speed and memory options of the model that must not change what is learned:
``towers.<m>.grad_checkpointing`` (recompute each block in the backward) gives the gradients of
the plain model, dropout included; ``train.compile`` trains and saves checkpoints that load into
an uncompiled model under the same parameter names."""
import os

import pytest
import torch

from align.config import load_config
from align.loading import load_model
from align.model import build_model
from align.objective import ContrastiveObjective, build_pair_losses
from align.train.recipe import train
from tests.test_train_e2e import tiny_overrides


def gradients(config, batch, seed=0):
    torch.manual_seed(seed)
    model = build_model(config.model).double()
    model.train()
    objective = ContrastiveObjective(model, build_pair_losses(model.modalities, config.loss))
    torch.manual_seed(1)  # the same dropout draws in both models
    objective(batch)["loss"].backward()
    return {name: p.grad for name, p in objective.named_parameters() if p.grad is not None}


def test_grad_checkpointing_gives_the_plain_gradients(small_demo, tmp_path):
    from align.data.loader import loader_from_config
    from align.data.transforms import SampleProcessor

    extra = ["model.towers.audio.dropout=0.1"]  # dropout in the recomputed blocks too
    plain = load_config(None, tiny_overrides(small_demo, tmp_path, "data.batch_size=8", *extra))
    recomputed = load_config(None, tiny_overrides(small_demo, tmp_path, "data.batch_size=8", *extra,
                                                  *(f"model.towers.{m}.grad_checkpointing=true"
                                                    for m in ("image", "text", "audio"))))
    model = build_model(plain.model)
    loader = loader_from_config(plain, SampleProcessor(model.preprocessors(train=True)))
    batch = next(iter(loader.iterate(0)))
    batch["inputs"]["audio"] = batch["inputs"]["audio"].double()  # images stay uint8: the tower converts them
    a, b = gradients(plain, batch), gradients(recomputed, batch)
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        # float64, the same operations on the same values: only the order in which autograd adds
        # a parameter's gradient contributions may differ (a few roundings of 1e-16)
        assert torch.allclose(a[name], b[name], rtol=1e-10, atol=1e-14), name


@pytest.mark.once  # the plumbing: finite losses and plain parameter names
def test_a_compiled_run_trains_and_saves_plain_checkpoints(small_demo, tmp_path):
    # aot_eager traces and compiles the graphs without generating kernels: the plumbing, fast.
    summary = train(load_config(None, tiny_overrides(small_demo, tmp_path / "run", "train.max_steps=2", "data.val=''",
                                                     "train.compile=true", "train.compile_backend=aot_eager")))
    assert summary["steps"] == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in summary["history"])
    model = load_model(os.path.join(summary["checkpoint"], "model"))
    assert not any("_orig_mod" in name for name in model.state_dict())
