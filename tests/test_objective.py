"""The objective: missing modalities are masked per pair, and the cached (GradCache) step
gives the same gradients as contrasting the whole batch at once, dropout included."""
import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from align.config import LossConfig, PairLossConfig
from align.data.sample import collate
from align.data.transforms import SampleProcessor
from align.model import AlignModel
from align.objective import ContrastiveObjective, build_pair_losses
from align.train.cached_step import cached_step
from align.registry import TOWERS
from align.towers.open_clip import OpenClipConfig, load_clip_halves
from tests.conftest import TINY_CLIP, infonce_error


def naive_infonce(a, b, scale):
    """Independent reference: symmetric cross-entropy over the (n, n) logits, in float64."""
    logits = scale.double() * a.double() @ b.double().T
    target = torch.arange(a.shape[0])
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def tiny_model(dropout=0.0):
    towers = {
        "text": TOWERS.get("open_clip_text")(OpenClipConfig(model=TINY_CLIP), 16),
        "image": TOWERS.get("open_clip_image")(OpenClipConfig(model=TINY_CLIP), 16),
    }
    if "audio_transformer" in TOWERS:
        audio_cls = TOWERS.get("audio_transformer")
        towers["audio"] = audio_cls(audio_cls.Config(width=32, layers=1, heads=2, dropout=dropout,
                                                     clip_seconds=0.25), 16)
    load_clip_halves.cache_clear()
    return AlignModel(towers)


def make_batch(model, n, missing_image=(), missing_audio=(), seed=0):
    rng = np.random.default_rng(seed)
    processor = SampleProcessor(model.preprocessors(train=False))
    samples = []
    for i in range(n):
        raw = {"id": str(i), "group": None, "text": f"item {i} {rng.integers(1000)}",
               "image": None if i in missing_image else Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")),
               "audio": None if i in missing_audio else (rng.standard_normal(4000).astype("float32"), 16000)}
        samples.append(processor(raw))
    return collate(samples)


def test_each_pair_uses_only_rows_that_have_both():
    model = tiny_model()
    objective = ContrastiveObjective(model, build_pair_losses(model.modalities, LossConfig()))
    batch = make_batch(model, 6, missing_image=(1, 4), missing_audio=(2,))
    terms = objective(batch)
    with torch.no_grad():
        text = model.encode("text", batch["inputs"]["text"])  # (6, D)
        image = model.encode("image", batch["inputs"]["image"])  # (4, D) rows 0, 2, 3, 5
        scale = model.logit_scale()
    expected = naive_infonce(text[[0, 2, 3, 5]], image, scale)
    # the float32 loss against float64: 4 rows and logits of unit vectors of size 16
    bound = infonce_error(16, 5, 5, scale.item())
    assert terms["text-image"].item() == pytest.approx(expected.item(), abs=bound)
    if "audio" in model.modalities:
        audio = model.encode("audio", batch["inputs"]["audio"])  # rows 0, 1, 3, 4, 5
        expected_ta = naive_infonce(text[[0, 1, 3, 4, 5]], audio, scale)
        assert terms["text-audio"].item() == pytest.approx(expected_ta.item(), abs=bound)
        assert "image-audio" in terms


def test_pair_weights_and_per_pair_losses():
    model = tiny_model()
    config = LossConfig(pairs={"image-text": PairLossConfig(weight=0.0), "audio-text": PairLossConfig(weight=2.0)})
    losses = build_pair_losses(model.modalities, config)
    assert ("text", "image") not in losses
    if "audio" in model.modalities:
        assert losses[("text", "audio")][1] == 2.0


def grads_of(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.skipif("audio_transformer" not in TOWERS, reason="needs the audio tower (dropout)")
def test_cached_step_equals_full_batch_gradient_with_dropout():
    torch.manual_seed(0)
    # Towers in float64: both ways feed the (float32) losses the same embeddings, so the losses
    # agree exactly and the gradients differ only by float64 summation order, on any CPU.
    model = tiny_model(dropout=0.3).train().double()
    objective = ContrastiveObjective(model, build_pair_losses(model.modalities, LossConfig()))
    micro = [make_batch(model, 4, missing_image=(1,), seed=s) for s in range(3)]
    for i, b in enumerate(micro):  # ids must be unique across the whole batch
        b["ids"] = [f"{i}-{x}" for x in b["ids"]]

    # Reference: encode the micro-batches one after another WITH graphs (the same RNG stream the
    # cached step's first pass consumes), contrast the concatenation once, back-propagate.
    torch.manual_seed(123)
    embedded = [objective(b, mode="embed") for b in micro]
    full = {k: torch.cat([e[k] for e in embedded]) for k in embedded[0]}
    from align.train.cached_step import concat_batches

    reference_terms = objective(concat_batches(micro), mode="loss_from_embeddings", embeddings=full)
    reference_terms["loss"].backward()
    reference = grads_of(objective)
    objective.zero_grad(set_to_none=True)

    torch.manual_seed(123)
    terms = cached_step(objective, micro, lambda loss: loss.backward(), contextlib.nullcontext)
    cached = grads_of(objective)
    assert terms["loss"].item() == pytest.approx(reference_terms["loss"].item(), rel=1e-6)
    assert cached.keys() == reference.keys()
    for name in reference:
        scale = reference[name].abs().max().clamp(min=1e-12)
        assert ((cached[name] - reference[name]).abs().max() / scale).item() <= 1e-12, name  # measured ~3e-16

    # Plain accumulation (each micro-batch contrasted alone) is a different gradient.
    objective.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    for b in micro:
        (objective(b)["loss"] / len(micro)).backward()
    plain = grads_of(objective)
    assert any(not torch.allclose(plain[n], reference[n], rtol=1e-3, atol=1e-6) for n in reference)


def test_empty_batch_and_missing_modality_still_give_a_differentiable_loss():
    from align.data.sample import empty_batch

    model = tiny_model()
    objective = ContrastiveObjective(model, build_pair_losses(model.modalities, LossConfig()))
    terms = objective(empty_batch())  # a rank whose exactly-once share ran out
    assert set(terms) >= {f"{a}-{b}" for a, b in build_pair_losses(model.modalities, LossConfig())}
    assert terms["loss"].item() == 0.0
    terms["loss"].backward()
    no_audio = make_batch(model, 4, missing_audio=(0, 1, 2, 3))
    assert "audio" not in no_audio["inputs"]
    terms = objective(no_audio)
    assert terms["text-image"].item() > 0
    terms["loss"].backward()


def test_batch_top1_counts_rows_whose_pair_scores_best():
    from align.objective import batch_top1

    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    b = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8]])
    # valid columns 0, 1, 3. Row 0 scores 1.0 / 0.8 / 0.6: its pair wins -> hit. Row 1 scores
    # 0 / 0.6 / 0.8: column 3 wins -> miss. Row 2 is invalid. Row 3 scores 0.6 / 0.96 / 1.0 -> hit.
    valid = torch.tensor([True, True, False, True])
    assert batch_top1(a, b, valid).item() == pytest.approx(2 / 3)
    assert batch_top1(a, b, torch.zeros(4, dtype=torch.bool)).item() == 0.0
