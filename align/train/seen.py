"""Which samples each step trained on (``train.record_ids``): one JSON line per optimiser step in
``<output_dir>/seen/rank-<r>.jsonl``, ``{"step", "epoch", "ids"}``, the ids of this process's
batches of that step.

It is an audit of the data a run consumed, e.g. to check that a run stopped and resumed read
every sample of an epoch exactly once. Lines are flushed as steps end, so a run killed between
checkpoints leaves lines for steps it will do again: a resumed run first drops every line after
the step it resumes from, so the file always describes the steps that count.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional, TextIO

from align.errors import atomic_open


def seen_file(output_dir: str, rank: int) -> str:
    return os.path.join(output_dir, "seen", f"rank-{rank}.jsonl")


class SeenLog:
    """Appends this process's step lines; on opening keeps only the lines of steps <= ``after_step``."""

    def __init__(self, output_dir: str, rank: int, after_step: int) -> None:
        self.path = seen_file(output_dir, rank)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        kept: List[str] = []
        if after_step > 0 and os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as old:
                kept = [line for line in old if line.strip() and _step_of(line) is not None
                        and _step_of(line) <= after_step]
        with atomic_open(self.path) as fresh:  # a fresh run (after_step 0) starts an empty file
            fresh.writelines(kept)
        self._file: Optional[TextIO] = open(self.path, "a", encoding="utf-8")

    def write(self, step: int, epoch: int, ids: List[str]) -> None:
        if self._file is not None:
            self._file.write(json.dumps({"step": step, "epoch": epoch, "ids": ids}) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _step_of(line: str) -> Optional[int]:
    """The step of one line; None for a line cut off by a kill mid-write."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None
