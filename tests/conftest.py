import os
import socket
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CLIP = os.path.join(REPO, "configs", "models", "tiny-clip.json")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two_processes(script: str, *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    """``accelerate launch`` ``script`` on two CPU processes joined by gloo; output is captured.

    accelerate 1.15 runs ``launch --cpu --num_processes 2`` as ONE process; ``--multi_gpu`` starts
    two through torchrun, and ``Accelerator(cpu=True)`` in the script makes the group gloo.
    """
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    for _ in range(2):  # the free port can be taken by another process before torchrun binds it
        command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                   str(script), *map(str, args)]
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode == 0 or "EADDRINUSE" not in done.stderr + done.stdout:
            break
    return done


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
