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
    # training health, every logged step: temperature, learning rate, gradient norms per tower,
    # and the share of rows whose pair is the top-1 in the batch (it rises as the model learns)
    health = {"logit_scale", "lr", "grad_norm", "grad_norm/text", "grad_norm/image", "grad_norm/audio",
              "text-image/top1", "text-audio/top1", "image-audio/top1"}
    assert all(health <= set(h) for h in summary["history"])
    top1 = [h["text-image/top1"] for h in summary["history"]]
    assert sum(top1[-5:]) / 5 > sum(top1[:5]) / 5
    saved = json.load(open(tmp_path / "run" / "summary.json"))
    assert saved["history"][-1]["grad_norm/text"] == summary["history"][-1]["grad_norm/text"] > 0
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
    done_a, done_b = full / "checkpoints" / "step-00000006", resumed / "checkpoints" / "step-00000006"
    for name in ("model.safetensors", "model/model.safetensors", "optimizer.safetensors"):
        a, b = load_file(str(done_a / name)), load_file(str(done_b / name))
        assert a.keys() == b.keys(), name
        for key in a:  # the resumed run repeats the same float32 steps on the same kernels: equal bits
            assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), (name, key)
    assert any(key.endswith(".exp_avg") for key in load_file(str(done_a / "optimizer.safetensors")))
    for name in ("optimizer.json", "scheduler.json"):
        assert json.load(open(done_a / name)) == json.load(open(done_b / name)), name
    state_a, state_b = (json.load(open(done / "trainer_state.json")) for done in (done_a, done_b))
    # The same position and wandb run; the resumed run is two segments: the first run, seen
    # last at its step-3 checkpoint (killed, as far as the second can tell), then steps 3 to 6.
    segments = [(s["start"], s["end"], s["ended"]) for s in state_b.pop("segments")]
    assert segments == [(0, 3, "interrupted"), (3, 6, "finished")]
    del state_a["segments"]
    assert state_a == state_b


def test_resume_restores_rng_and_scheduler_state(demo, tmp_path):
    """Resuming sets every random stream and the schedule to where the saving run left them."""
    import random

    import numpy as np

    from align.train.checkpoint import restore_rng

    run = tmp_path / "run"
    train(load_config(None, tiny_overrides(demo, run, "train.max_steps=3", "data.val=''")))
    saved = run / "checkpoints" / "step-00000003"
    tensors, metadata = load_file(str(saved / "rng-0.safetensors")), safe_metadata(saved / "rng-0.safetensors")
    restore_rng(tensors, metadata)
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])

    resumed = train(load_config(None, tiny_overrides(demo, run, "train.max_steps=3", "data.val=''",
                                                     "train.resume=latest")))
    assert resumed["steps"] == 3 and not resumed["history"]  # nothing left to train: state as loaded
    # The final save of the resumed run wrote the RNG and schedule it restored (without restoring,
    # they would be those of a fresh start: seeded, model built, schedule at step 0).
    again = load_file(str(saved / "rng-0.safetensors"))
    restore_rng(again, safe_metadata(saved / "rng-0.safetensors"))
    assert torch.equal(torch.rand(4), expected[0])
    assert np.array_equal(np.random.rand(4), expected[1])
    assert [random.random() for _ in range(4)] == expected[2]
    scheduler = json.load(open(saved / "scheduler.json"))
    assert scheduler["last_epoch"] == 3 and scheduler["_step_count"] == 4


def safe_metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


def test_bad_config_is_refused_before_anything_is_built(tmp_path, capsys):
    code = align_main(["train", "--config", os.path.join(REPO, "configs", "demo.yaml"), "optim.lrr=1",
                       f"train.output_dir={tmp_path}/x"])
    assert code == 2
    assert "optim.lrr" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")
