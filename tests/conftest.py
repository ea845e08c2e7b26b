import math
import csv
import os
import socket
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import shutil  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CLIP = os.path.join(REPO, "configs", "models", "tiny-clip.json")


def pytest_sessionstart(session) -> None:
    """Processes the tests start (launches, SLURM jobs) make their temporary files in a folder of
    this session's, removed at its end: torchrun leaves a ``torchelastic_*`` log folder in the
    temporary folder at every launch. This process keeps its own (pytest's ``tmp_path`` included:
    it is cached before the switch)."""
    tempfile.gettempdir()
    session.config.launch_tmp = tempfile.mkdtemp(prefix="align-tests-")
    os.environ["TMPDIR"] = session.config.launch_tmp


def pytest_sessionfinish(session) -> None:
    shutil.rmtree(getattr(session.config, "launch_tmp", ""), ignore_errors=True)


def read_rows(manifest) -> list:
    """A CSV manifest's rows as dicts."""
    with open(manifest, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def write_rows(rows, manifest) -> str:
    """``rows`` (dicts with the same keys) as a CSV manifest; its path."""
    with open(manifest, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(manifest)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Failures outside the code under test, after which the same run is launched again: the free
# port taken by another process before torchrun binds it, and gloo aborting a rank while its
# threads are torn down at exit (seen on loaded machines after the workers had finished). A
# launch that hangs past ``timeout`` (seen rarely on a loaded 2-core machine) is retried too.
RELAUNCH_ON = ("EADDRINUSE", "terminate called without an active exception")


def launch_env() -> dict:
    """The environment of a launched run: this checkout importable, one thread per process."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
                OMP_NUM_THREADS="1")


def two_process_command(script: str, *args: str) -> list:
    """``accelerate launch`` of ``script`` on two CPU processes joined by gloo.

    accelerate 1.15 runs ``launch --cpu --num_processes 2`` as ONE process; ``--multi_gpu`` starts
    two through torchrun, and ``Accelerator(cpu=True)`` in the script makes the group gloo.
    """
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    return [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
            str(script), *map(str, args)]


def launch_two_processes(script: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """``two_process_command`` run to its end; output is captured."""
    env = launch_env()
    for _ in range(3):
        command = two_process_command(script, *args)
        try:
            done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as expired:  # a launch that hangs is tried again, then reported
            done = subprocess.CompletedProcess(command, returncode=-1, stdout=_text(expired.stdout),
                                               stderr=_text(expired.stderr) + f"\n(timed out after {timeout} s)")
            continue
        if done.returncode == 0 or not any(sign in done.stderr + done.stdout for sign in RELAUNCH_ON):
            break
    return done


def _text(output) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


# Float32 rounding. The losses compute in float32 whatever the input dtype, and which kernels
# (vectorised or not, which summation order) run depends on the CPU: a float32 result may differ
# from the exact one by what rounding allows, never more. Tests compare such results with a
# float64 reference within the bounds below (an error in the code moves them by far more).
EPS32 = 2.0 ** -24  # unit roundoff: one float32 operation is off by at most this, relatively


def logit_error(dim: int, scale: float) -> float:
    """Bound on |z32 - z| for a logit z = scale * <q, c> of unit vectors of size ``dim``: a dot
    product of dim terms rounds at most dim + 1 times values no bigger than scale * sum |q_k c_k|
    <= scale (Cauchy-Schwarz), and the scaling once more."""
    return (dim + 2) * scale * EPS32


def infonce_error(dim: int, logits: int, rows: int, scale: float) -> float:
    """Absolute bound on the float32 rounding of an InfoNCE-type loss, the mean over ``rows`` of
    lse(z_i) - mean(z_i positives) over ``logits`` logits of size at most scale.

    Each row's term moves by 2 logit errors; the logsumexp's exps, their sum over ``logits``
    terms and its log add (logits + 3) roundings of values <= 1 after the max shift, then a few of
    the row term (<= 2 scale + log(logits)); the mean over rows (and the two directions) adds
    rows + 2 roundings of that size.
    """
    term = 2 * scale + math.log(logits)
    return 2 * logit_error(dim, scale) + (logits + 3) * EPS32 + (rows + 6) * term * EPS32


def infonce_grad_error(dim: int, logits: int, rows: int, scale: float, wrt_scale: bool = False) -> float:
    """Absolute bound on every float32 gradient entry of an InfoNCE-type loss (both directions)
    with respect to the unit embeddings and to the logit scale.

    Per direction an entry is c * sum_j w_ij v_j with sum_j |w_ij| <= 2 (w = softmax p minus the
    positives' weights) and |v_j| <= 1 (an embedding entry, or a cosine for the scale), c =
    scale / rows for an embedding and an average over rows (c = 1) for the scale. Each p_ij is off
    by at most p_ij (2 |dz| + (logits + 3) eps); the sums over j, rows and the dot products add
    logits + rows + dim + 4 roundings of values <= 2.
    """
    weights = 2 * logit_error(dim, scale) + (logits + 3) * EPS32 + 2 * (logits + rows + dim + 4) * EPS32
    return 2 * (1.0 if wrt_scale else scale / rows) * weights


def siglip_error(dim: int, cols: int, rows: int, scale: float, bias: float, loss: float) -> float:
    """Absolute bound on the float32 rounding of a SigLIP loss, (1 / rows) times a sum of
    rows * cols terms softplus(-y (scale <a_i, b_j> + bias)) whose exact value is ``loss``.

    softplus is 1-Lipschitz, so a term moves by a logit error plus a few roundings of the bias
    and of its own value (<= scale + |bias| + 1); the sum of rows * cols non-negative terms adds
    rows * cols + 2 roundings of their total.
    """
    term = scale + abs(bias) + 1
    return cols * (logit_error(dim, scale) + 4 * term * EPS32) + (rows * cols + 2) * loss * EPS32


def siglip_grad_error(dim: int, cols: int, rows: int, scale: float, wrt_scale: bool = False) -> float:
    """Absolute bound on every float32 gradient entry of a SigLIP loss, with respect to the unit
    embeddings or to the logit scale and bias (``wrt_scale``).

    An embedding's entry is scale / rows times a sum over at most max(rows, cols) pairs of
    sigmoid weights in [-1, 1] (sigmoid is 1/4-Lipschitz: each off by a quarter logit error plus
    3 roundings) times unit-vector entries; the scale's and bias's sum all rows * cols pairs
    (times cosines) divided by rows. Each sum adds its length + dim + 3 roundings of values <= 1.
    """
    n = rows * cols if wrt_scale else max(rows, cols)
    weight = logit_error(dim, scale) / 4 + (n + dim + 6) * EPS32
    return (n / rows if wrt_scale else scale * n / rows) * weight


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    """A 160 + 40 item demo catalogue at 32 px, one per test module (a module may damage its copy)."""
    from align.data.demo_catalogue import build_demo_catalogue

    out = tmp_path_factory.mktemp("small_demo")
    build_demo_catalogue(str(out), seed=0, n_train=160, n_test=40, image_size=32, clip_seconds=0.5)
    return str(out)


def one_step_checkpoint(small_demo: str, run, *extra: str) -> str:
    """A text-image-audio tiny model trained for one step (or as ``extra`` overrides say) on the
    small demo catalogue and saved as training saves it: the checkpoint folder."""
    from align.config import load_config
    from align.train.recipe import train
    from tests.test_train_e2e import tiny_overrides

    config = load_config(None, tiny_overrides(small_demo, run, "train.max_steps=1", "data.val=''",
                                              "data.batch_size=32", *extra))
    return train(config)["checkpoint"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
