"""Stopping and resuming without losing or repeating work, outside SLURM (tests/test_slurm_train.py
does the same on the local scheduler).

A run signalled mid-epoch saves after the current step and exits 75; ``train.resume=latest`` goes
on, reads the rest of the epoch exactly once, and ends with the weights of a run never stopped.
The signal may reach the launcher (which forwards SIGTERM to its workers) or only one worker:
the processes agree and stop after the same step. A run killed outright (SIGKILL, no chance to
save) resumes from its last whole checkpoint, and no half-written checkpoint is ever in view.
A resume that changes how the data is read mid-epoch keeps exactly-once or is refused.
"""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict

import pytest
import torch
from safetensors.torch import load_file

from align.config import load_config
from align.errors import ConfigError
from align.train.preempt import EXIT_STOPPED
from align.train.recipe import train
from tests.conftest import REPO, launch_env, two_process_command
from tests.test_train_e2e import tiny_overrides

pytestmark = pytest.mark.resume

TRAIN_PY = os.path.join(REPO, "train.py")
STEPS_PER_EPOCH = 10  # 160 training rows, 16 a step


def overrides(demo, out, *extra, batch_size=16):
    return tiny_overrides(demo, out, f"data.batch_size={batch_size}", "train.max_steps=25", "data.val=''",
                          "optim.warmup_steps=2", "train.record_ids=true", "train.keep_checkpoints=2", *extra)


def start(command, out):
    os.makedirs(out, exist_ok=True)
    log = open(os.path.join(out, "launch.log"), "a")
    return subprocess.Popen(command, cwd=REPO, env=launch_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(process, out, timeout=300):
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError(f"run did not end in {timeout} s:\n{read_log(out)}")
    return process.returncode


def read_log(out):
    with open(os.path.join(out, "launch.log")) as log:
        return log.read()[-4000:]


def steps_seen(out, rank=0):
    path = os.path.join(out, "seen", f"rank-{rank}.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as lines:
        return sum(1 for line in lines if line.endswith("\n"))


def wait_for_step(process, out, step, timeout=240):
    deadline = time.time() + timeout
    while steps_seen(out) < step:
        assert process.poll() is None, f"run ended before step {step}:\n{read_log(out)}"
        assert time.time() < deadline, f"no step {step} in {timeout} s:\n{read_log(out)}"
        time.sleep(0.02)


def train_ids(demo):
    with open(os.path.join(demo, "train.csv")) as rows:
        return sorted(row["id"] for row in csv.DictReader(rows))


def assert_exactly_once(out, demo, ranks, steps, steps_per_epoch=STEPS_PER_EPOCH):
    """Every step 1..steps recorded once on every rank; each whole epoch's ids are the training
    split, each once; the last, partial epoch repeats none."""
    by_epoch = defaultdict(list)
    for rank in range(ranks):
        with open(os.path.join(out, "seen", f"rank-{rank}.jsonl")) as lines:
            records = [json.loads(line) for line in lines]
        assert [r["step"] for r in records] == list(range(1, steps + 1)), rank
        for record in records:
            assert record["epoch"] == (record["step"] - 1) // steps_per_epoch, record["step"]
            by_epoch[record["epoch"]].extend(record["ids"])
    everything = train_ids(demo)
    for epoch, ids in by_epoch.items():
        if (epoch + 1) * steps_per_epoch <= steps:
            assert sorted(ids) == everything, epoch
        else:
            assert len(set(ids)) == len(ids), epoch


def assert_same_weights(run_a, run_b, step):
    a = load_file(os.path.join(run_a, "checkpoints", f"step-{step:08d}", "model.safetensors"))
    b = load_file(os.path.join(run_b, "checkpoints", f"step-{step:08d}", "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:  # the same float32 steps on the same kernels, in the same order: equal bits, in practice
        scale = a[key].double().norm().clamp_min(1e-30)
        assert (a[key].double() - b[key].double()).norm() <= 1e-6 * scale, key


def summary(out):
    with open(os.path.join(out, "summary.json")) as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def reference(small_demo, tmp_path_factory):
    """A run of 25 steps never stopped: one process, as launched by the tests below."""
    out = str(tmp_path_factory.mktemp("reference"))
    assert finish(start([sys.executable, TRAIN_PY, *overrides(small_demo, out)], out), out) == 0, read_log(out)
    return out


def stop(command, out, send, at_step=3, exit_code=EXIT_STOPPED):
    """Start ``command``, ``send(process)`` once ``at_step`` steps are recorded, expect the saved
    stop; the stopped checkpoint's trainer state."""
    process = start(command, out)
    wait_for_step(process, out, at_step)
    send(process)
    assert finish(process, out) == exit_code, read_log(out)
    stopped = json.load(open(os.path.join(out, "checkpoints", latest(out), "trainer_state.json")))
    assert stopped["segments"][-1]["ended"] == "stopped" and not os.path.exists(os.path.join(out, "summary.json"))
    return stopped


def stop_and_resume(command, out, send, at_step=3, resume=(), exit_code=EXIT_STOPPED):
    """``stop``, then the same command with train.resume=latest (and ``resume`` overrides) to the end."""
    stopped = stop(command, out, send, at_step, exit_code)
    assert finish(start(command + ["train.resume=latest", *resume], out), out) == 0, read_log(out)
    return stopped


def latest(out):
    return sorted(n for n in os.listdir(os.path.join(out, "checkpoints")) if n.startswith("step-") and "." not in n)[-1]


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_a_signalled_run_saves_stops_and_resumes_to_the_same_weights(small_demo, reference, tmp_path, signum):
    out = str(tmp_path / "run")
    stopped = stop_and_resume([sys.executable, TRAIN_PY, *overrides(small_demo, out)], out,
                              lambda process: process.send_signal(signum))
    assert 3 <= stopped["step"] < 25 and stopped["batch_in_epoch"] > 0  # mid-epoch
    assert stopped["segments"][-1]["signal"] == signal.Signals(signum).name
    done = summary(out)
    assert (done["steps"], done["preemptions"], done["resumes"]) == (25, 1, 1)
    assert [(s["start"], s["end"], s["ended"]) for s in done["segments"]] == \
        [(0, stopped["step"], "stopped"), (stopped["step"], 25, "finished")]
    assert_exactly_once(out, small_demo, ranks=1, steps=25)
    assert_same_weights(reference, out, 25)


@pytest.mark.multiprocess
def test_two_processes_stop_together_whichever_process_is_signalled(small_demo, tmp_path):
    """SIGTERM to the launcher (torchrun forwards it to both workers), then SIGUSR1 to one worker
    only (the other learns of it at the next step boundary): each time both save after one step."""
    reference = str(tmp_path / "reference")
    assert finish(start(two_process_command(TRAIN_PY, *overrides(small_demo, reference, batch_size=8)), reference),
                  reference) == 0, read_log(reference)

    out = str(tmp_path / "run")
    command = two_process_command(TRAIN_PY, *overrides(small_demo, out, batch_size=8))
    # torchrun forwards SIGTERM to the workers, waits for them, then exits 128 + SIGTERM itself
    first = stop(command, out, lambda launcher: launcher.send_signal(signal.SIGTERM), exit_code=143)

    def one_worker(launcher):
        workers = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2, workers
        os.kill(int(workers[-1]), signal.SIGUSR1)

    command = two_process_command(TRAIN_PY, *overrides(small_demo, out, batch_size=8))  # a fresh port
    # the workers exit 75, which torchrun reports as a failure of the launch (exit 1)
    second = stop(command + ["train.resume=latest"], out, one_worker, at_step=first["step"] + 3, exit_code=1)
    assert first["step"] < second["step"] < 25
    assert finish(start(command + ["train.resume=latest"], out), out) == 0, read_log(out)

    done = summary(out)
    assert (done["steps"], done["preemptions"], done["resumes"]) == (25, 2, 2)
    assert [s["signal"] for s in done["segments"]] == ["SIGTERM", "SIGUSR1", None]
    assert_exactly_once(out, small_demo, ranks=2, steps=25)
    assert_same_weights(reference, out, 25)


def test_a_killed_run_resumes_from_its_last_whole_checkpoint(small_demo, reference, tmp_path):
    """SIGKILL while a checkpoint is being written: the half-written one is never in view, the run
    resumes from the one before, and ends as if never killed."""
    out = str(tmp_path / "run")
    command = [sys.executable, TRAIN_PY, *overrides(small_demo, out, "train.save_every=1")]
    process = start(command, out)
    wait_for_step(process, out, 4)
    checkpoints = os.path.join(out, "checkpoints")
    deadline = time.time() + 120
    while not any(n.endswith(".tmp") for n in os.listdir(checkpoints)):  # caught mid-save
        assert process.poll() is None and time.time() < deadline, read_log(out)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    visible = [n for n in os.listdir(checkpoints) if not n.endswith((".tmp", ".old"))]
    assert visible, os.listdir(checkpoints)
    for name in visible:  # each one whole: every file there and readable
        folder = os.path.join(checkpoints, name)
        assert os.path.isfile(os.path.join(folder, "trainer_state.json")), name
        load_file(os.path.join(folder, "model.safetensors"))
        load_file(os.path.join(folder, "optimizer.safetensors"))
    last = json.load(open(os.path.join(checkpoints, latest(out), "trainer_state.json")))["step"]
    assert steps_seen(out) >= last  # steps after the checkpoint were lost, to be done again

    resumed = start(command + ["train.resume=latest"], out)
    assert finish(resumed, out) == 0, read_log(out)
    assert not [n for n in os.listdir(checkpoints) if n.endswith((".tmp", ".old"))]
    done = summary(out)
    assert [(s["start"], s["end"], s["ended"]) for s in done["segments"]] == \
        [(0, last, "interrupted"), (last, 25, "finished")]
    assert_exactly_once(out, small_demo, ranks=1, steps=25)
    assert_same_weights(reference, out, 25)


def test_other_workers_on_a_manifest_resume_exactly_once(small_demo, reference, tmp_path):
    """A manifest epoch's order and augmentations do not depend on the workers: a run stopped
    with no workers and resumed with two reads the rest of the epoch and ends the same."""
    out = str(tmp_path / "run")
    stopped = stop_and_resume([sys.executable, TRAIN_PY, *overrides(small_demo, out)], out,
                              lambda process: process.send_signal(signal.SIGUSR1), resume=["data.num_workers=2"])
    assert stopped["reading"]["num_workers"] == 0 and stopped["batch_in_epoch"] > 0
    assert summary(out)["segments"][-1]["start"] == stopped["step"]
    assert_exactly_once(out, small_demo, ranks=1, steps=25)
    assert_same_weights(reference, out, 25)


def test_a_resume_that_cannot_read_the_rest_of_the_epoch_once_is_refused(small_demo, tmp_path):
    """Mid-epoch: shards with other workers, or a manifest whose rows read so far do not end on a
    step of the new batch size, are refused before any work, naming the key; a batch size that
    divides them goes on where the first run stopped."""
    from data_prep.shards import main as prep_shards

    shards = tmp_path / "shards"
    assert prep_shards([os.path.join(small_demo, "train.csv"), "--out", str(shards), "--samples-per-shard", "40",
                        "--image-max-side", "32", "--image-format", "png", "--clip-seconds", "0.5",
                        "--workers", "1", "--col-text", "title"]) == 0
    spec = str(shards / "shards-{000000..000003}.tar")
    run = tmp_path / "shard-run"
    first = overrides(small_demo, run, f"data.train={spec}", "train.max_steps=2")
    train(load_config(None, first))  # stops after 2 of an epoch's 10 steps
    with pytest.raises(ConfigError, match=r"^data\.num_workers: .*stopped in epoch 0 after 2 batches"):
        train(load_config(None, first + ["train.max_steps=4", "data.num_workers=1", "train.resume=latest"]))
    assert latest(run) == "step-00000002"  # refused before anything was trained or written

    run = tmp_path / "manifest-run"
    first = overrides(small_demo, run, "train.max_steps=2")
    train(load_config(None, first))  # 2 steps x 16 rows = 32 rows of epoch 0 read
    with pytest.raises(ConfigError, match=r"^data\.batch_size: .* which does not divide 32"):
        train(load_config(None, first + ["train.max_steps=4", "data.batch_size=24", "train.resume=latest"]))
    assert latest(run) == "step-00000002"
    train(load_config(None, first + ["train.max_steps=4", "data.batch_size=32", "train.resume=latest"]))
    with open(run / "seen" / "rank-0.jsonl") as lines:
        records = [json.loads(line) for line in lines]
    assert [len(r["ids"]) for r in records] == [16, 16, 32, 32]
    read = [i for r in records for i in r["ids"]]
    assert len(set(read)) == len(read) == 96  # rows 32..95 of the epoch's order follow rows 0..31


def test_a_resumed_run_logs_to_the_same_wandb_run(small_demo, tmp_path):
    """The wandb run id is kept in the checkpoints: the run that resumes asks wandb for that run."""
    run = tmp_path / "run"
    first = overrides(small_demo, run, "train.max_steps=2", "train.wandb=offline")
    train(load_config(None, first))
    train(load_config(None, first + ["train.max_steps=4", "train.resume=latest"]))
    run_id = json.load(open(run / "checkpoints" / "step-00000004" / "trainer_state.json"))["run_id"]
    launches = sorted(n for n in os.listdir(run / "wandb") if n.startswith("offline-run-"))
    assert len(launches) == 2 and all(n.endswith(f"-{run_id}") for n in launches), launches
