"""The training loop's step and schedule: a resume at another batch size trains every epoch once
on a schedule that goes on where it was; a step whose loss or gradient is not finite stops the
run before it reaches the weights or a checkpoint; an all-bad batch trains under a fixed
temperature; a resume takes a changed tower ``lr_scale``; the logged lr is the one each step used."""
import csv
import json
import math
import os
import signal
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from align.config import load_config
from align.errors import RunError
from align.train import recipe
from align.train.preempt import Stopped
from align.train.recipe import train
from tests.conftest import TINY_CLIP

# Steps, samples, folders and schedule values: nothing here depends on which float kernels run.
pytestmark = pytest.mark.once

LR = 1e-3


def overrides(demo, out, *extra):
    """A text-image tiny model on the small demo's 160 training rows, 16 a step, no evaluation."""
    return ["model.embed_dim=32", "model.towers.image.type=open_clip_image", f"model.towers.image.model={TINY_CLIP}",
            "model.towers.text.type=open_clip_text", f"model.towers.text.model={TINY_CLIP}",
            f"data.train={demo}/train.csv", "data.val=''", "data.columns.text=[title]", "data.columns.audio=null",
            "data.batch_size=16", "data.num_workers=0", f"optim.lr={LR}", "optim.warmup_steps=0",
            f"train.output_dir={out}", "train.wandb=disabled", "train.progress=false", "train.log_every=1", *extra]


def stop_after(monkeypatch, step):
    """The stop signal arrives during ``step``: the run saves after it and raises ``Stopped``."""
    polls = {"n": 0}

    def poll(self):
        polls["n"] += 1
        return signal.SIGUSR1 if polls["n"] == step else 0

    monkeypatch.setattr(recipe.StopAgreement, "poll", poll)


def cosine(samples, warmup, total):
    """The hand-written schedule measured in samples read before a step (past the warm-up)."""
    return 0.5 * (1 + math.cos(math.pi * (samples - warmup) / (total - warmup)))


@pytest.mark.parametrize("stop_at", [4, 10], ids=["mid-epoch", "end-of-epoch"])
def test_a_resume_at_another_batch_size_trains_every_epoch_once_on_a_smooth_schedule(
        small_demo, tmp_path, monkeypatch, stop_at):
    """Stopped after ``stop_at`` steps of 16 (10 an epoch, 2 epochs), resumed at 32 a step: every
    row is trained once in each epoch and the run ends after the second. The step count of 16s
    ended it early (after step 10 the resumed run trained nothing), and the schedule's length
    in 32s made its lr jump (0.90 -> 0.65 at step 4). Reference: cosine in samples, by hand."""
    out = tmp_path / "run"
    extra = ("train.epochs=2", "train.record_ids=true", "train.requeue=false", "optim.warmup_steps=2")
    stop_after(monkeypatch, stop_at)
    with pytest.raises(Stopped):
        train(load_config(None, overrides(small_demo, out, *extra)))
    monkeypatch.undo()
    resumed = train(load_config(None, overrides(small_demo, out, *extra, "data.batch_size=32",
                                                "train.resume=latest")))
    assert resumed["samples"] == 2 * 160
    assert resumed["steps"] == stop_at + (320 - 16 * stop_at) // 32  # the rest, at 32 a step
    seen = [json.loads(line) for line in open(out / "seen" / "rank-0.jsonl", encoding="utf-8")]
    for epoch in (0, 1):
        ids = Counter(i for line in seen if line["epoch"] == epoch for i in line["ids"])
        assert len(ids) == 160 and set(ids.values()) == {1}, epoch
    # Each resumed step's lr is the schedule at the samples read before it: warm-up 2 steps of the
    # first launch's 16 (32 samples), cosine to 0 over the run's 320; the first goes on from the
    # 16-row steps without a jump.
    read_before = [16 * stop_at + 32 * k for k in range(len(resumed["history"]))]
    assert [h["lr"] / LR for h in resumed["history"]] == pytest.approx(
        [cosine(s, 32, 320) for s in read_before], abs=1e-12)
    before_stop = cosine(16 * (stop_at - 1), 32, 320)  # the lr of the stopped launch's last step
    one_step = cosine(16 * stop_at, 32, 320) - cosine(16 * stop_at + 32, 32, 320)
    assert 0 <= before_stop - resumed["history"][0]["lr"] / LR <= one_step


def test_a_step_whose_loss_is_not_finite_stops_the_run_and_keeps_the_finite_checkpoints(
        small_demo, tmp_path, monkeypatch):
    """The loss turns NaN at step 5 (as a diverged run's does): the run stops there with a
    ``RunError`` naming the step and the last checkpoint; nothing NaN reaches the weights or a
    checkpoint, so the finite ones that keep_checkpoints=2 keeps are not pruned (they were, by
    NaN checkpoints 6 and 8)."""
    original, calls = recipe.ContrastiveObjective.loss_from_embeddings, {"n": 0}

    def diverging(self, *args, **kwargs):
        terms = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= 5:  # one call a step (no accumulation)
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(recipe.ContrastiveObjective, "loss_from_embeddings", diverging)
    out = tmp_path / "run"
    with pytest.raises(RunError, match=r"step 5: the loss is not finite.*step-00000004"):
        train(load_config(None, overrides(small_demo, out, "train.max_steps=8", "train.save_every=2",
                                          "train.keep_checkpoints=2")))
    assert sorted(os.listdir(out / "checkpoints")) == ["step-00000002", "step-00000004"]
    for name in ("model.safetensors", "optimizer.safetensors"):
        tensors = load_file(str(out / "checkpoints" / "step-00000004" / name))
        assert all(torch.isfinite(t).all() for t in tensors.values()), name


class TwoProcesses:
    """An accelerator of one process among two: ``reduce`` adds the other's flags."""

    def __init__(self, other_flags, scaler=None):
        self.num_processes, self.scaler, self.other = 2, scaler, torch.tensor(other_flags)

    def reduce(self, tensor, reduction):
        assert reduction == "sum"
        return tensor + self.other


@pytest.mark.parametrize("loss, grad_norm, other, scaler, stops", [
    (1.0, float("inf"), [0.0, 0.0], None, True),  # an infinite gradient here
    (1.0, 2.0, [1.0, 0.0], None, True),  # a NaN loss on the other process: both stop
    (1.0, 2.0, [0.0, 0.0], None, False),
    (1.0, float("inf"), [0.0, 0.0], object(), False),  # fp16: the GradScaler skips the step
    (float("nan"), 2.0, [0.0, 0.0], object(), True),  # ... but never a NaN loss
])
def test_every_process_agrees_whether_a_step_is_finite(loss, grad_norm, other, scaler, stops):
    terms = {"loss": torch.tensor(loss), "grad_norm": torch.tensor(grad_norm)}
    if stops:
        with pytest.raises(recipe.NonFiniteStep, match="not finite on some process"):
            recipe.check_finite(TwoProcesses(other, scaler), terms)
    else:
        recipe.check_finite(TwoProcesses(other, scaler), terms)


def half_bad_manifest(demo):
    """The demo's first 40 rows, every other one with a missing image: some batches of 2 are all bad."""
    rows = list(csv.DictReader(open(os.path.join(demo, "train.csv"), encoding="utf-8")))[:40]
    for row in rows[1::2]:
        row["image"] = "images/missing.png"
    manifest = os.path.join(demo, "half_bad.csv")  # beside the images its paths name
    with open(manifest, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def test_a_fixed_temperature_trains_through_an_all_bad_batch(small_demo, tmp_path):
    """model.learn_temperature=false: an empty batch's zero rows hung on the temperature, which
    has no graph then, and the backward failed ('element 0 of tensors does not require grad')."""
    out = tmp_path / "run"
    summary = train(load_config(None, overrides(
        small_demo, out, f"data.train={half_bad_manifest(small_demo)}", "data.batch_size=2",
        "data.max_bad_fraction=0.9", "model.learn_temperature=false", "train.record_ids=true")))
    steps = [json.loads(line) for line in open(out / "seen" / "rank-0.jsonl", encoding="utf-8")]
    assert any(not step["ids"] for step in steps)  # a step whose batch lost every sample
    assert summary["steps"] == len(steps) == 20 and summary["bad_samples"] == {"missing_file": 20}


def test_a_resume_takes_a_changed_tower_lr_scale(small_demo, tmp_path):
    """text lr_scale 0.5 -> 1.0: the groups were keyed by value, so the text tower's merged with
    the image tower's and the resume was refused, blaming the freeze settings."""
    out = tmp_path / "run"
    extra = ("optim.schedule=constant", "train.save_every=2")
    train(load_config(None, overrides(small_demo, out, *extra, "train.max_steps=2", "model.towers.text.lr_scale=0.5")))
    resumed = train(load_config(None, overrides(small_demo, out, *extra, "train.max_steps=4", "train.resume=latest",
                                                "model.towers.text.lr_scale=1.0")))
    assert resumed["steps"] == 4
    saved = out / "checkpoints" / "step-00000004"
    groups = json.loads((saved / "optimizer.json").read_text())["param_groups"]
    text = [g for g in groups if g["param_names"][0].startswith("model.towers.text.")]
    assert text and all(g["lr"] == LR and g["lr_scale"] == 1.0 for g in text)
    # every parameter went on with its own moments: four AdamW steps each, not two
    steps = {k: v for k, v in load_file(str(saved / "optimizer.safetensors")).items() if k.endswith(".step")}
    assert len(steps) == sum(len(g["params"]) for g in groups) and all(v.item() == 4 for v in steps.values())


def test_the_logged_lr_is_the_one_each_step_used(small_demo, tmp_path, monkeypatch):
    """Warm-up 2 of 4 steps: it logged the next step's lr (ending at 0)."""
    used, real_step = [], recipe.optimizer_step

    def spy(accelerator, objective, optimizer, micro, config):
        used.append(optimizer.param_groups[0]["lr"])
        return real_step(accelerator, objective, optimizer, micro, config)

    monkeypatch.setattr(recipe, "optimizer_step", spy)
    summary = train(load_config(None, overrides(small_demo, tmp_path / "run", "optim.warmup_steps=2",
                                                "train.max_steps=4")))
    logged = [h["lr"] for h in summary["history"]]
    assert logged == used
    assert logged == pytest.approx([LR / 2, LR, LR, LR / 2], rel=1e-12)  # 1/2, 1, then cos(0), cos(pi/2)


def moments_by_name(checkpoint):
    """{(parameter name, state key): tensor} of a checkpoint that records the names."""
    groups = json.loads((checkpoint / "optimizer.json").read_text())["param_groups"]
    tensors = load_file(str(checkpoint / "optimizer.safetensors"))
    index = {i: name for g in groups for i, name in zip(g["params"], g["param_names"])}
    return {(index[int(key.split(".")[0])], key.split(".", 1)[1]): value for key, value in tensors.items()}


def test_a_checkpoint_from_before_the_names_resumes_with_a_changed_lr_scale(small_demo, tmp_path):
    """A checkpoint written before optimiser groups followed the structure (keyed by (decay,
    lr scale) values, no parameter names) resumes too, with text lr_scale 1.0 -> 0.5, each
    parameter finding its own moments (from the groups rebuilt from the config it saved: there
    both towers' parameters shared the two groups, in another order than now)."""
    from align.model import build_model

    out = tmp_path / "run"
    extra = ("optim.schedule=constant", "train.max_steps=2")
    config = load_config(None, overrides(small_demo, out, *extra))
    train(config)
    saved = out / "checkpoints" / "step-00000002"
    expected = moments_by_name(saved)
    # the old layout, by hand: groups by (decay, scale) in order of first appearance, state by index
    groups = json.loads((saved / "optimizer.json").read_text())["param_groups"]
    decays = {name: g["weight_decay"] > 0 for g in groups for name in g["param_names"]}
    objective = recipe.build_objective(build_model(config.model), config)
    order = [name for name, parameter in objective.named_parameters() if parameter.requires_grad]
    old = {}
    for name in order:
        old.setdefault((decays[name], 1.0), []).append(name)
    names = [name for members in old.values() for name in members]
    hyper = {k: v for k, v in groups[0].items() if k not in ("params", "param_names", "lr", "lr_scale", "weight_decay")}
    old_groups, start = [], 0
    for (decay, scale), members in old.items():
        old_groups.append(dict(hyper, params=list(range(start, start + len(members))), lr=LR * scale, lr_scale=scale,
                               weight_decay=0.2 if decay else 0.0))
        start += len(members)
    data = json.loads((saved / "optimizer.json").read_text())
    data["param_groups"] = old_groups
    (saved / "optimizer.json").write_text(json.dumps(data))
    from align.loading import write_tensors

    write_tensors({f"{names.index(name)}.{key}": value for (name, key), value in expected.items()},
                  str(saved / "optimizer.safetensors"), metadata={"format": "align"})

    train(load_config(None, overrides(small_demo, out, *extra, "train.resume=latest",
                                      "model.towers.text.lr_scale=0.5")))  # no step left: saves what it loaded
    assert moments_by_name(saved).keys() == expected.keys()
    assert all(torch.equal(moments_by_name(saved)[key], value) for key, value in expected.items())
    groups = json.loads((saved / "optimizer.json").read_text())["param_groups"]
    assert {g["lr"] for g in groups if g["param_names"][0].startswith("model.towers.text.")} == {LR * 0.5}


def test_the_other_processes_wait_for_the_main_ones_evaluation_on_a_long_gloo_barrier(monkeypatch):
    """Training evaluates on the main process while the others wait. Accelerate's barrier is, on
    NCCL, a collective its watchdog ends after 10 minutes (an evaluation over a large catalogue
    outlasts that); the wait is a barrier of a gloo group with BARRIER_TIMEOUT, made once."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from align.encoding import BARRIER_TIMEOUT
    from align.train import recipe

    made, waited = [], []
    monkeypatch.setattr(dist, "new_group", lambda **kwargs: made.append(kwargs) or "gloo-group")
    monkeypatch.setattr(dist, "barrier", lambda group=None: waited.append(group))
    monkeypatch.setattr(recipe, "_LONG_WAITS", {})
    accelerator = SimpleNamespace(num_processes=2, wait_for_everyone=lambda: waited.append("accelerate"))
    recipe.wait_for_main_process(accelerator)
    recipe.wait_for_main_process(accelerator)
    assert made == [{"backend": "gloo", "timeout": BARRIER_TIMEOUT}] and waited == ["gloo-group", "gloo-group"]
    recipe.wait_for_main_process(SimpleNamespace(num_processes=1))  # one process: nothing to wait for
    assert len(waited) == 2
