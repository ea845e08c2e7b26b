"""slurm/train.sbatch on a real scheduler (the local cluster of slurm/local_cluster.sh): a
two-process CPU training job of the demo config is signalled mid-epoch both ways SLURM signals
a job, each time saves, requeues itself and resumes; it finishes with the weights of a run never
stopped, having read every sample of each epoch exactly once, all in one appended log."""
import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, launch_env, two_process_command
from tests.slurm_cluster import cancel, job_state, release_requeued, require_cluster, submit, wait_for_state
from tests.test_preempt import assert_exactly_once, assert_same_weights, read_log, start, finish, steps_seen

pytestmark = pytest.mark.slurm

STEPS = 30  # 3 epochs of 10 steps: 160 rows, 2 processes x 8


def demo_overrides(demo, out):
    """configs/demo.yaml's model and recipe on the small demo catalogue, for a few steps."""
    return [f"data.train={demo}/train.csv", "data.val=''", "data.batch_size=8", "data.num_workers=1",
            f"train.max_steps={STEPS}", "optim.warmup_steps=2", "train.record_ids=true", "train.wandb=disabled",
            "train.progress=false", "train.log_every=1", "train.keep_checkpoints=2", f"train.output_dir={out}"]


def stopped_state(out):
    checkpoints = os.path.join(out, "checkpoints")
    name = sorted(n for n in os.listdir(checkpoints) if n.startswith("step-") and "." not in n)[-1]
    return json.load(open(os.path.join(checkpoints, name, "trainer_state.json")))


def wait_for_steps(job, out, steps, timeout=300):
    deadline = time.monotonic() + timeout
    while steps_seen(out) < steps:
        state = job_state(job)
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job} is {state} before step {steps}"
        assert time.monotonic() < deadline, f"job {job}: no step {steps} in {timeout} s"
        time.sleep(0.05)


def signal_and_requeue(job, out, scancel_args, after_steps):
    """Signal the job with ``scancel ARGS`` once it has done ``after_steps`` steps; wait for the
    requeue (the trainer asks for it after saving) and release the job from its BeginTime wait."""
    wait_for_steps(job, out, after_steps)
    subprocess.run(["scancel", *scancel_args, job], check=True, timeout=30)
    wait_for_state(job, ["PENDING"], timeout=180)
    release_requeued(job)
    state = stopped_state(out)
    assert state["segments"][-1]["ended"] == "stopped", state["segments"]
    return state


def test_a_signalled_job_requeues_resumes_and_ends_as_if_never_stopped(small_demo, tmp_path):
    require_cluster()
    reference = str(tmp_path / "reference")
    command = two_process_command(os.path.join(REPO, "train.py"), "--config", "configs/demo.yaml",
                                  *demo_overrides(small_demo, reference))
    assert finish(start(command, reference), reference, timeout=600) == 0, read_log(reference)

    out = str(tmp_path / "job")
    log = str(tmp_path / "slurm-%j.out")
    env = dict(launch_env(), PROCESSES_PER_NODE="2", VENV=os.path.dirname(os.path.dirname(sys.executable)))
    job = submit([f"--chdir={REPO}", f"--output={log}", "--cpus-per-task=2", "--job-name=align-test",
                  "slurm/train.sbatch", "configs/demo.yaml", *demo_overrides(small_demo, out)], env=env)
    try:
        # The batch shell (as --signal=B:USR1@N signals it), which passes it on to the step ...
        first = signal_and_requeue(job, out, ["-b", "--signal=USR1"], after_steps=3)
        # ... then the step's tasks directly (as --signal=USR1@N does).
        # Signalled at step 3 of an epoch: the stop, a step or two later, falls mid-epoch.
        second = signal_and_requeue(job, out, ["--signal=USR1"], after_steps=(first["step"] + 2) // 10 * 10 + 13)
        wait_for_state(job, ["COMPLETED"], timeout=600)
    finally:
        cancel(job)
    logged = open(log.replace("%j", job)).read()

    for state in (first, second):  # each stopped mid-epoch, at the same step on both processes
        assert state["batch_in_epoch"] % 10 != 0, (first, second)
    assert first["step"] < second["step"] < STEPS
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert (summary["steps"], summary["preemptions"], summary["resumes"]) == (STEPS, 2, 2)
    segments = summary["segments"]
    assert [(s["start"], s["end"], s["ended"]) for s in segments] == \
        [(0, first["step"], "stopped"), (first["step"], second["step"], "stopped"), (second["step"], STEPS, "finished")]
    assert [s["signal"] for s in segments] == ["SIGUSR1", "SIGUSR1", None]
    assert [s["slurm_restart"] for s in segments] == [0, 1, 2] and {s["slurm_job"] for s in segments} == {job}
    # One log, appended to by all three launches; each requeue asked for by the trainer.
    assert [f"(restart {n})" in logged for n in range(3)] == [True] * 3, logged[-3000:]
    assert logged.count("caught USR1: passing it to the training processes") == 1, logged[-3000:]
    assert logged.count(f"SLURM job {job} requeued") == 2, logged[-3000:]

    assert_exactly_once(out, small_demo, ranks=2, steps=STEPS)
    assert_same_weights(reference, out, STEPS)
