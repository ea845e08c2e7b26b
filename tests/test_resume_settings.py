"""What a resume keeps from the checkpoint and what it takes from the config: the moments and the
schedule's position come from the checkpoint, the learning rate and weight decay from this run's
config (they were silently the saved run's); the count of skipped samples goes on; a resume from
a checkpoint older than others in the output folder is refused (pruning by step deleted the new
run's checkpoints, and 'latest' then picked the abandoned ones)."""
import json
import os
import shutil

import pytest

from align.config import load_config
from align.errors import ConfigError, RunError
from align.train.recipe import train
from tests.conftest import read_rows, write_rows
from tests.test_train_e2e import tiny_overrides

# Settings, folders and counts: nothing here depends on which float kernels run.
pytestmark = pytest.mark.once


def overrides(small_demo, out, *extra):
    return tiny_overrides(small_demo, out, "data.val=''", "data.batch_size=16", "optim.schedule=constant",
                          "optim.warmup_steps=0", *extra)


def test_a_resume_trains_with_the_configs_learning_rate_and_weight_decay(small_demo, tmp_path):
    out = tmp_path / "run"
    first = train(load_config(None, overrides(small_demo, out, "train.max_steps=3", "optim.lr=2e-3")))
    assert {h["lr"] for h in first["history"]} == {2e-3}
    resumed = train(load_config(None, overrides(small_demo, out, "train.max_steps=6", "optim.lr=1e-5",
                                                "optim.weight_decay=0.0", "train.resume=latest")))
    assert [h["lr"] for h in resumed["history"]] == [1e-5] * 3
    groups = json.loads((out / "checkpoints" / "step-00000006" / "optimizer.json").read_text())["param_groups"]
    assert {(g["lr"], g["weight_decay"]) for g in groups} >= {(1e-5, 0.0)}
    assert all(g["weight_decay"] == 0.0 for g in groups)
    # a tower frozen since: other parameter groups, refused naming the checkpoint (it was torch's ValueError)
    with pytest.raises(RunError, match="step-00000006.*parameter groups"):
        train(load_config(None, overrides(small_demo, out, "train.max_steps=8", "train.resume=latest",
                                          "model.towers.text.freeze=true")))


def test_a_resume_from_a_checkpoint_older_than_others_in_the_folder_is_refused(small_demo, tmp_path):
    out = tmp_path / "run"
    train(load_config(None, overrides(small_demo, out, "train.max_steps=4", "train.save_every=2",
                                      "train.keep_checkpoints=2")))
    older = out / "checkpoints" / "step-00000002"
    before = sorted(os.listdir(out / "checkpoints"))
    with pytest.raises(ConfigError, match="step 2.*step-00000004"):  # before any work
        train(load_config(None, overrides(small_demo, out, "train.max_steps=3", f"train.resume={older}")))
    assert sorted(os.listdir(out / "checkpoints")) == before == ["step-00000002", "step-00000004"]
    # from another folder it goes on
    elsewhere = tmp_path / "branch"
    summary = train(load_config(None, overrides(small_demo, elsewhere, "train.max_steps=3",
                                                f"train.resume={older}")))
    assert summary["steps"] == 3 and summary["resumes"] == 1


def odd_manifest(small_demo):
    """The demo's training rows with ten bad images (missing or broken), spread over the epoch."""
    rows = read_rows(os.path.join(small_demo, "train.csv"))
    with open(os.path.join(small_demo, "images", "broken.png"), "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\nnot an image")
    for row in rows[::16]:  # ten rows, spread over the epoch: some read before the checkpoint, some after
        row["image"] = "images/missing.png" if int(row["id"]) % 2 else "images/broken.png"
    return write_rows(rows, os.path.join(small_demo, "odd.csv"))  # beside the images its paths name


def bad_samples_at(checkpoint):
    from align.loading import read_tensors

    _, metadata = read_tensors(str(checkpoint / "rng-0.safetensors"))
    return json.loads(metadata["bad_samples"])


def test_skipped_samples_are_counted_over_the_whole_run_across_a_resume(small_demo, tmp_path):
    manifest = odd_manifest(small_demo)
    extra = ("train.max_steps=10", "train.save_every=5", "train.keep_checkpoints=5", f"data.train={manifest}",
             "data.max_bad_fraction=0.2")
    whole = train(load_config(None, overrides(small_demo, tmp_path / "whole", *extra)))
    assert sum(whole["bad_samples"].values()) == 10  # one epoch: every row read once
    checkpoint = tmp_path / "whole" / "checkpoints" / "step-00000005"
    at_checkpoint = bad_samples_at(checkpoint)
    assert 0 < at_checkpoint["total"] < 10 and at_checkpoint["seen"] == 5 * 16
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(checkpoint, resumed_dir / "checkpoints" / checkpoint.name)
    resumed = train(load_config(None, overrides(small_demo, resumed_dir, *extra, "train.resume=latest")))
    assert resumed["resumes"] == 1 and resumed["samples"] == whole["samples"]
    assert resumed["bad_samples"] == whole["bad_samples"]  # it counted only the second half's


def test_a_stopped_run_and_a_read_ahead_count_only_the_batches_trained_on(small_demo, tmp_path, monkeypatch):
    """The checkpoint a stop signal writes keeps the count of skipped samples (it was left out, so
    every preempted run counted from zero again), and a loader read ahead of training (CUDA copies
    the next batch while a step computes) counts only the batches used: a resume reads the next
    one again, which was counted twice."""
    import signal

    from align.train import recipe
    from align.train.preempt import Stopped

    real_prefetch, polls = recipe.prefetch_to_device, {"n": 0}

    def read_ahead(batches, device):  # as the CUDA branch: batch k + 1 is taken before k is handed over
        source = iter(batches)
        upcoming = next(source, None)
        while upcoming is not None:
            batch, upcoming = upcoming, next(source, None)
            yield from real_prefetch([batch], device)

    def poll(self):  # the stop signal arrives during step 5
        polls["n"] += 1
        return signal.SIGUSR1 if polls["n"] == 5 else 0

    monkeypatch.setattr(recipe, "prefetch_to_device", read_ahead)
    monkeypatch.setattr(recipe.StopAgreement, "poll", poll)
    manifest = odd_manifest(small_demo)
    out = tmp_path / "stopped"
    with pytest.raises(Stopped):
        train(load_config(None, overrides(small_demo, out, "train.max_steps=10", f"data.train={manifest}",
                                          "data.max_bad_fraction=0.2", "train.requeue=false")))
    at_stop = bad_samples_at(out / "checkpoints" / "step-00000005")
    assert at_stop["seen"] == 5 * 16  # the five batches trained on, not the sixth read ahead
    with open(manifest, encoding="utf-8") as handle:  # the first 80 rows of the epoch's order are not known
        bad_rows = sum("missing.png" in line or "broken.png" in line for line in handle)
    assert 0 < at_stop["total"] < bad_rows
