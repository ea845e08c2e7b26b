"""Tests on a real SLURM cluster (marker ``slurm``): the one-node cluster of
slurm/local_cluster.sh, or any other one these commands reach. There is no accounting storage
(``sacct`` answers nothing), so job states come from ``scontrol show job``, which keeps a finished
job for MinJobAge (600 s in the local cluster's slurm.conf).

Without a usable cluster a test skips, except in CI (``CI=true``), where a cluster is part of the
machine and its absence is a failure."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from functools import lru_cache
from typing import Collection, Dict, List, Optional, Sequence

import pytest

START = "start one with `bash slurm/local_cluster.sh start`"
USABLE = ("idle", "mixed", "allocated", "completing")  # sinfo node states that take jobs
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE")


def _run(args: Sequence[str], env: Optional[Dict[str, str]] = None, timeout: float = 30) -> str:
    """stdout of a SLURM command; a ``RuntimeError`` with its stderr when it fails."""
    done = subprocess.run(list(args), capture_output=True, text=True, env=env, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(args)}` exited {done.returncode}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


@lru_cache(maxsize=None)  # asked once a session: sinfo takes ~10 s to give up on a stopped controller
def _unusable_reason() -> Optional[str]:
    """Why no job could run here, or None when a node takes jobs."""
    if shutil.which("sinfo") is None:
        return "sinfo not found: SLURM is not installed"
    try:
        states = _run(["sinfo", "-h", "-o", "%T"], timeout=10).split()
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        return f"the SLURM controller does not answer ({error})"
    if not any(state in USABLE for state in states):
        return f"no SLURM node takes jobs (sinfo states: {', '.join(states) or 'none'})"
    return None


def require_cluster() -> None:
    """Skip the calling test without a usable cluster (fail it under ``CI=true``)."""
    reason = _unusable_reason()
    if reason is None:
        return
    message = f"{reason}; {START}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def submit(args: Sequence[str], env: Optional[Dict[str, str]] = None) -> str:
    """``sbatch --parsable ARGS``: the job id (an array's base id). ``env``: the environment sbatch
    runs in, which the job inherits (sbatch exports it by default)."""
    out = _run(["sbatch", "--parsable", *args], env=env).strip()
    return out.split(";")[0]  # "<id>;<cluster>" on a federated setup


def _job_records(job_id: str) -> List[Dict[str, str]]:
    """``scontrol show job -o`` of a job (one record per array task), as key -> value."""
    records = []
    for line in _run(["scontrol", "show", "job", "-o", job_id]).splitlines():
        fields = (token.partition("=") for token in line.split(" ") if "=" in token)
        records.append({key: value for key, _, value in fields})
    return records


def job_state(job_id: str) -> str:
    """The state of a job (``RUNNING``, ``PENDING``, ``COMPLETED``, ...); of an array, the state
    its tasks share, or the tasks' states joined by commas while they differ."""
    states = sorted({record["JobState"] for record in _job_records(job_id)})
    return ",".join(states)


def wait_for_state(job_id: str, states: Collection[str], timeout: float) -> str:
    """Wait until every task of the job is in one of ``states``; returns the state. A job that
    finishes in another state, or the timeout, is an ``AssertionError`` showing the job."""
    deadline = time.monotonic() + timeout
    while True:
        records = _job_records(job_id)
        current = {record["JobState"] for record in records}
        if current <= set(states):
            return ",".join(sorted(current))
        if all(state in FINISHED for state in current) or time.monotonic() > deadline:
            shown = "\n".join(" ".join(f"{k}={r.get(k)}" for k in ("JobId", "JobState", "Reason", "ExitCode",
                                                                     "StdOut")) for r in records)
            raise AssertionError(f"job {job_id} is {','.join(sorted(current))}, waited for {sorted(states)}"
                                 f"{'' if all(s in FINISHED for s in current) else f' for {timeout:.0f} s'}:\n{shown}")
        time.sleep(0.5)


def release_requeued(job_id: str, timeout: float = 30) -> None:
    """Let a requeued job start now: SLURM holds it back ~2 minutes (BeginTime). The update is
    refused while the job is still completing, so it is retried until the job is pending."""
    deadline = time.monotonic() + timeout
    while True:
        record = _job_records(job_id)[0]
        if record["JobState"] == "PENDING" and record.get("StartTime") not in (None, "Unknown"):
            try:
                _run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])
                return
            except RuntimeError:
                pass  # it left PENDING meanwhile; look again
        if time.monotonic() > deadline:
            raise AssertionError(f"requeued job {job_id} is still {record['JobState']} (reason {record.get('Reason')}) "
                                 f"after {timeout:.0f} s; cannot release it")
        time.sleep(0.5)


def cancel(job_id: str) -> None:
    """``scancel`` the job (all its array tasks); a job SLURM no longer knows is left alone."""
    subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
