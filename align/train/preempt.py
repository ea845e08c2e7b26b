"""Stopping a run on a signal without losing work.

A cluster tells a job to stop with a signal: SLURM sends the one named by ``--signal=USR1@N``
some seconds before a time limit or a preemption, and SIGTERM when it cancels or requeues a job
(then SIGKILL after ``KillWait``). A user stops a run the same way. While training, every process
catches SIGUSR1 and SIGTERM and only notes them; at each step boundary the processes agree
whether any of them was signalled, so all stop after the same step, whichever processes the
signal reached (a launcher forwards SIGTERM to its workers but not SIGUSR1; SLURM signals a step's
tasks, or with ``-b`` the batch shell only, which ``slurm/train.sbatch`` forwards).

The agreement costs nothing on the step's critical path: each boundary starts an all-reduce
(MAX) of this process's flag and reads the one started at the boundary before, so the decision
lags one step and no process ever waits on it. It runs on the CPU (gloo), in a group of its own
when the training group is NCCL, so reading it never waits for the GPU.

After the agreed stop the recipe saves a checkpoint (atomically, every process) and, inside a
SLURM batch job, the main process asks SLURM to requeue the job (``scontrol requeue``) only after
every process has saved: requeueing cancels the job's steps at once. The requeued job runs the
same command with ``train.resume=latest``.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from typing import Any, Dict, Optional

import torch

log = logging.getLogger("align.train")

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
# Exit status of a run that stopped on a signal and saved, but was not requeued: EX_TEMPFAIL
# (sysexits.h), "try again later": the same command with train.resume=latest goes on.
EXIT_STOPPED = 75


class Stopped(Exception):
    """The run saved and stopped on a signal; ``requeued`` names the SLURM job asked to requeue."""

    def __init__(self, signal_name: str, step: int, checkpoint: str, requeued: Optional[str]) -> None:
        after = f"SLURM job {requeued} requeued" if requeued else "run the same command with train.resume=latest to go on"
        super().__init__(f"stopped on {signal_name} after step {step}; saved {checkpoint}; {after}")
        self.signal_name, self.step, self.checkpoint, self.requeued = signal_name, step, checkpoint, requeued


class StopSignals:
    """Notes SIGUSR1/SIGTERM while installed (a context manager); restores the old handlers after.

    Only the main thread can install handlers; elsewhere (a run started from a worker thread)
    the signals keep their old meaning and a warning says so.
    """

    def __init__(self) -> None:
        self.received = 0  # the first signal's number, 0 while none came
        self._previous: Dict[int, Any] = {}

    def _note(self, signum: int, frame: Any) -> None:
        if not self.received:
            self.received = signum
            log.warning("caught %s: saving and stopping after the current step", signal.Signals(signum).name)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            log.warning("training outside the main thread: SIGUSR1/SIGTERM will not save before stopping")
            return self
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._note)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class StopAgreement:
    """Whether any process was signalled, decided alike on every process one step late (see the
    module docstring). Call ``poll()`` at every step boundary on every process, ``close()`` once."""

    def __init__(self, signals: StopSignals, num_processes: int) -> None:
        self.signals = signals
        self.group = None
        self._pending = None
        self._flag = torch.zeros(1, dtype=torch.int32)
        if num_processes > 1:
            import torch.distributed as dist

            # NCCL reduces GPU tensors only: the flag gets a CPU group of its own (a collective
            # call, made by every process at the same point of the recipe).
            if dist.get_backend() != "gloo":
                self.group = dist.new_group(backend="gloo")
            self._dist = dist
        else:
            self._dist = None

    def poll(self) -> int:
        """The agreed signal number (the largest any process caught by the previous boundary), or 0."""
        if self._dist is None:
            return self.signals.received
        decided = 0
        if self._pending is not None:
            self._pending.wait()
            decided = int(self._flag.item())
        if decided:
            self._pending = None
            return decided
        self._flag = torch.tensor([self.signals.received], dtype=torch.int32)
        self._pending = self._dist.all_reduce(self._flag, op=self._dist.ReduceOp.MAX, group=self.group,
                                              async_op=True)
        return 0

    def close(self) -> None:
        """Completes the last all-reduce (each process started the same number of them)."""
        if self._pending is not None:
            self._pending.wait()
            self._pending = None


def slurm_job() -> Optional[str]:
    """The SLURM job this process runs in, as ``scontrol requeue`` names it (array tasks
    ``<array job>_<task>``), or None outside SLURM."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def requeue(job: str) -> bool:
    """``scontrol requeue job``; False (with a warning saying why) when SLURM refuses, e.g. an
    interactive allocation, which cannot be requeued, or a job submitted with ``--no-requeue``."""
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        log.warning("could not ask SLURM to requeue job %s: %s", job, error)
        return False
    if done.returncode != 0:
        log.warning("SLURM did not requeue job %s: %s", job, (done.stderr or done.stdout).strip())
        return False
    return True
