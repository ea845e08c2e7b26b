"""Under DDP the cached (GradCache) step synchronises gradients once per optimiser step."""
import json
import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_cached_step_all_reduces_once(tmp_path):
    out = tmp_path / "result.json"
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    # accelerate 1.15 runs `--cpu --num_processes 2` as ONE process; --multi_gpu uses torchrun, and
    # Accelerator(cpu=True) in the worker makes the group gloo.
    subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                    os.path.join(REPO, "tests", "dist_cached_worker.py"), str(out)],
                   check=True, cwd=REPO, env=env, timeout=180)
    result = json.loads(out.read_text())
    assert result["plain_calls"] > 0
    # Three micro-batches plus the loss pass, but one all-reduce of the buckets, as in a plain step.
    assert result["cached_calls"] == result["plain_calls"]
    assert result["grads_equal_across_ranks"]
    assert result["grad_norm"] > 0
