"""The README's launch commands, run as written (with a tiny model and a free port appended):
two processes on one machine do train as two processes, and the two-"node" rehearsal on one
machine (two launchers, machine ranks 0 and 1) trains the same model as one node with two."""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, free_port, launch_env
from tests.test_train_e2e import tiny_overrides

pytestmark = [pytest.mark.multiprocess, pytest.mark.once]


def readme_commands():
    """The ``accelerate launch`` lines of the README's "Run on a SLURM cluster" section, in order."""
    with open(os.path.join(REPO, "README.md")) as readme:
        text = readme.read()
    section = text[text.index("## Run on a SLURM cluster"):]
    section = section[:section.index("\n## ", 1)]
    return [line.rstrip(" &") for line in section.splitlines() if line.startswith("accelerate launch ")]


def as_run(line, demo, out, port):
    """The README line with the venv's launcher, a free port and tiny-run overrides after its own."""
    words = shlex.split(re.sub(r"--main_process_port \d+", f"--main_process_port {port}", line))
    words[0] = os.path.join(os.path.dirname(sys.executable), "accelerate")
    return words + tiny_overrides(demo, out, "data.batch_size=16", "train.max_steps=3", "data.val=''",
                                  "optim.warmup_steps=1")


def run_all(commands, timeout=300):
    env = dict(launch_env(), PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    processes = [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for c in commands]
    outputs = []
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            raise
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
    return outputs


def test_readme_cpu_launch_trains_two_processes_and_the_two_node_rehearsal_matches_it(small_demo, tmp_path):
    commands = readme_commands()
    assert len(commands) == 4, commands  # two on one machine, then the two-launcher rehearsal
    one_node, rehearsal = commands[0], commands[2:]
    assert "--num_processes 2" in one_node and "--multi_gpu" in one_node

    out = str(tmp_path / "one-node")
    (log,) = run_all([as_run(one_node, small_demo, out, free_port())])
    assert "steps per epoch on each of 2 processes" in log
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["steps"] == 3 and summary["samples"] == 3 * 2 * 16  # two processes' batches a step
    assert summary["segments"][0]["processes"] == 2
    assert sorted(n for n in os.listdir(summary["checkpoint"]) if n.startswith("rng-")) == \
        ["rng-0.safetensors", "rng-1.safetensors"]  # each process saved its own random state

    two = str(tmp_path / "two-nodes")
    port = free_port()
    logs = run_all([as_run(line, small_demo, two, port) for line in rehearsal])
    assert "steps per epoch on each of 2 processes" in logs[0]
    a = load_file(os.path.join(summary["checkpoint"], "model.safetensors"))
    b = load_file(os.path.join(two, "checkpoints", "step-00000003", "model.safetensors"))
    for key in a:  # the same two ranks on the same kernels, only launched differently: equal bits
        assert torch.equal(a[key], b[key]), key
