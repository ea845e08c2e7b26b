"""End to end on the demo catalogue: a short run lowers the loss and beats chance retrieval;
resuming from a checkpoint continues with identical state; `align eval` reproduces the numbers."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from align.cli import main as align_main
from align.config import load_config
from align.train.recipe import train
from tests.conftest import REPO, TINY_CLIP


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from align.data.demo_catalogue import build_demo_catalogue

    out = tmp_path_factory.mktemp("demo")
    build_demo_catalogue(str(out), seed=0, n_train=640, n_test=160, image_size=32, clip_seconds=0.5)
    return str(out)


def tiny_overrides(demo, out, *extra):
    return [
        "model.embed_dim=32",
        "model.towers.image.type=open_clip_image", f"model.towers.image.model={TINY_CLIP}",
        "model.towers.text.type=open_clip_text", f"model.towers.text.model={TINY_CLIP}",
        "model.towers.audio.type=audio_transformer", "model.towers.audio.width=32", "model.towers.audio.layers=1",
        "model.towers.audio.heads=2", "model.towers.audio.clip_seconds=0.5", "model.towers.audio.n_mels=32",
        f"data.train={demo}/train.csv", f"data.val={demo}/test.csv", "data.columns.text=[title]",
        "data.batch_size=64", "data.num_workers=0", "optim.lr=2e-3", "optim.warmup_steps=5",
        f"train.output_dir={out}", "train.wandb=disabled", "train.progress=false", "train.log_every=1",
        *extra,
    ]


def test_short_run_lowers_loss_and_beats_chance(demo, tmp_path):
    config = load_config(None, tiny_overrides(demo, tmp_path / "run", "train.epochs=4"))
    summary = train(config)
    losses = [h["loss"] for h in summary["history"]]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    results = json.load(open(tmp_path / "run" / "eval.json"))
    assert {"text->image", "image->text", "text->audio", "audio->text", "image->audio", "audio->image"} <= set(results)
    t2i = results["text->image"]
    # Chance R@1: about (items per combination) / (test items with an image).
    chance = 5 / t2i["n_queries"]
    assert t2i["R@1"] > 3 * chance, t2i
    assert os.path.exists(tmp_path / "run" / "config.yaml")

    # `align eval` on the final checkpoint gives the same figures.
    out = tmp_path / "again.json"
    assert align_main(["eval", "--checkpoint", summary["checkpoint"], "--output", str(out)]) == 0
    again = json.load(open(out))
    # R@1 is a count over n_queries, and both evaluations run the same kernels on the same weights
    assert again["text->image"]["R@1"] == pytest.approx(t2i["R@1"], abs=1e-6)


def test_resume_continues_with_identical_state(demo, tmp_path):
    full = tmp_path / "full"
    config = load_config(None, tiny_overrides(demo, full, "train.max_steps=6", "train.save_every=3",
                                              "train.keep_checkpoints=3", "data.val=''"))
    train(config)
    # A second run starts from the step-3 checkpoint of the first and must end where it ended.
    resumed = tmp_path / "resumed"
    os.makedirs(resumed / "checkpoints")
    shutil.copytree(full / "checkpoints" / "step-00000003", resumed / "checkpoints" / "step-00000003")
    config = load_config(None, tiny_overrides(demo, resumed, "train.max_steps=6", "train.save_every=3",
                                              "train.keep_checkpoints=3", "data.val=''", "train.resume=latest"))
    train(config)
    a = load_file(str(full / "checkpoints" / "step-00000006" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "step-00000006" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:  # the resumed run repeats the same float32 steps on the same kernels: equal bits
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    optimizer_a = torch.load(full / "checkpoints" / "step-00000006" / "optimizer.bin", weights_only=True)
    optimizer_b = torch.load(resumed / "checkpoints" / "step-00000006" / "optimizer.bin", weights_only=True)
    assert optimizer_a["state"].keys() == optimizer_b["state"].keys()
    for index in optimizer_a["state"]:
        assert torch.allclose(optimizer_a["state"][index]["exp_avg"], optimizer_b["state"][index]["exp_avg"], atol=1e-7)


def test_bad_config_is_refused_before_anything_is_built(tmp_path, capsys):
    code = align_main(["train", "--config", os.path.join(REPO, "configs", "demo.yaml"), "optim.lrr=1",
                       f"train.output_dir={tmp_path}/x"])
    assert code == 2
    assert "optim.lrr" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")
