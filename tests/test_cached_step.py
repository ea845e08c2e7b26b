"""The cached (GradCache) step when a micro-batch lost every sample: loaders then hand out an
empty batch (no rows, no negatives), and the step must still give the loss and gradients of
the samples that are left."""
import contextlib

import numpy as np
import pytest
import torch
from PIL import Image

from align.config import LossConfig
from align.data.sample import empty_batch
from align.data.sample import collate
from align.data.transforms import SampleProcessor
from align.model import AlignModel
from align.objective import ContrastiveObjective, build_pair_losses
from align.train.cached_step import cached_step
from tests.test_objective import grads_of, tiny_model


def objective_with_negatives():
    model = AlignModel(dict(tiny_model().towers), embed_dim=16)  # embed_dim: the width of an empty batch's rows
    objective = ContrastiveObjective(model, build_pair_losses(model.modalities, LossConfig()))
    return objective, SampleProcessor(model.preprocessors(train=False), max_negatives=2)


def samples(processor, n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        raw = {"id": f"{seed}-{i}", "group": None, "text": f"item {seed} {i} {rng.integers(1000)}",
               "negatives": [f"not item {rng.integers(1000)}"] * (i % 3),  # 0, 1 or 2 of K=2
               "image": Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")),
               "audio": (rng.standard_normal(4000).astype("float32"), 16000) if i % 2 else None}
        out.append(processor(raw))
    return out


@pytest.mark.parametrize("empty_at", [0, 1, 2])
def test_an_all_bad_micro_batch_with_negatives_changes_nothing(empty_at):
    torch.manual_seed(0)
    objective, processor = objective_with_negatives()
    first, second = samples(processor, 4, seed=1), samples(processor, 3, seed=2)
    # Reference: the surviving samples as one plain batch, contrasted at once.
    reference_terms = objective(collate(first + second))
    reference_terms["loss"].backward()
    reference = grads_of(objective)
    objective.zero_grad(set_to_none=True)

    micro = [collate(first), collate(second)]
    micro.insert(empty_at, empty_batch())
    terms = cached_step(objective, micro, lambda loss: loss.backward(), contextlib.nullcontext)
    cached = grads_of(objective)
    assert terms["loss"].item() == pytest.approx(reference_terms["loss"].item(), rel=1e-5)
    assert cached.keys() == reference.keys()
    for name in reference:
        scale = reference[name].abs().max().clamp(min=1e-12)
        assert ((cached[name] - reference[name]).abs().max() / scale).item() <= 1e-4, name


def test_an_empty_batch_embeds_on_a_graph():
    """Under DDP a micro-batch's re-encoding pass must reach the reducer's hooks through
    backward, even when that micro-batch lost every sample."""
    objective, _ = objective_with_negatives()
    embedded = objective(empty_batch(), mode="embed")
    assert all(e.requires_grad and e.shape == (0, 16) for e in embedded.values())
