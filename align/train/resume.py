"""Resuming a run where it stopped: what a checkpoint records about how the data was read, the
check that the rest of an interrupted epoch can still be read exactly once, and the run's
segments (one per launch: how each ended, the signal, the SLURM job and restart).
"""
from __future__ import annotations

import os
from typing import Any, Dict

from align.config import Config
from align.data.manifest import is_manifest
from align.errors import ConfigError
from align.train.checkpoint import TrainState
from align.train.preempt import slurm_job


def reading_of(config: Config, processes: int) -> Dict[str, Any]:
    """What decides which samples each step of an epoch reads; saved with every checkpoint."""
    data = config.data
    # search-log rows are read as manifest rows are (align/searchlog/pairs.py)
    by_rows = bool(data.search_log.log) or is_manifest(data.train)
    return {"kind": "manifest" if by_rows else "shards", "processes": processes,
            "batch_size": data.batch_size, "num_workers": data.num_workers, "seed": config.train.seed,
            "shuffle_buffer": data.shuffle_buffer, "resampled": data.resampled, "epoch_samples": data.epoch_samples}


# How each reading setting is named in a refusal.
_READING_KEYS = {"processes": "the number of processes (accelerate launch --num_processes x --num_machines)",
                 "batch_size": "data.batch_size", "num_workers": "data.num_workers", "seed": "train.seed",
                 "shuffle_buffer": "data.shuffle_buffer", "resampled": "data.resampled",
                 "epoch_samples": "data.epoch_samples", "kind": "data.train"}


def resume_position(saved: TrainState, reading: Dict[str, Any], path: str) -> int:
    """The loader batches of ``saved.epoch`` this run skips, so that it reads the rest of the
    epoch exactly once; ``ConfigError`` naming the key when a changed setting makes that impossible.

    At an epoch boundary anything may change. Mid-epoch, a manifest epoch is one row order drawn
    from (seed, epoch) and each global step takes the next ``processes x batch_size`` rows, with
    every sample's augmentation seeded by itself: the number of workers does not matter, and other
    processes or batch sizes can go on where the rows read so far end on a step of theirs. A shard
    epoch's plan depends on all of them (align/data/shards.py): they must stay as they were.
    """
    old = saved.reading
    if saved.batch_in_epoch == 0 or not old:  # an epoch boundary, or a checkpoint from before the record
        return saved.batch_in_epoch
    where = (f"the checkpoint {path} stopped in epoch {saved.epoch} after {saved.batch_in_epoch} batches per process")
    fixed = ["kind", "seed"] if reading["kind"] == "manifest" and old.get("kind") == "manifest" else list(_READING_KEYS)
    for key in fixed:
        if key in old and old[key] != reading[key]:
            raise ConfigError(f"{_READING_KEYS[key]}: {where}, reading {old.get('kind')} with {key} = {old[key]!r}; "
                              f"this run has {reading[key]!r}, so the rest of the epoch would not be read exactly "
                              f"once. Resume with {old[key]!r} (it may change at an epoch boundary), or start "
                              "afresh (train.resume='')")
    rows = saved.batch_in_epoch * old["batch_size"] * old["processes"]
    per_step = reading["batch_size"] * reading["processes"]
    if rows % per_step:
        key = "data.batch_size" if old["batch_size"] != reading["batch_size"] else _READING_KEYS["processes"]
        raise ConfigError(f"{key}: {where} ({rows} rows of the epoch's order); this run reads {per_step} rows a "
                          f"step ({reading['processes']} process(es) x data.batch_size {reading['batch_size']}), "
                          f"which does not divide {rows}: the rest of the epoch cannot be read exactly once. Resume "
                          f"with {old['processes']} process(es) x data.batch_size {old['batch_size']}, or start "
                          "afresh (train.resume='')")
    return rows // per_step


def begin_segment(state: TrainState, reading: Dict[str, Any]) -> None:
    """Opens this launch's segment; a previous one still "running" ended unseen (killed) at its
    last checkpoint, the steps it took after that being done again now."""
    if state.segments and state.segments[-1].get("ended") == "running":
        state.segments[-1].update(ended="interrupted", end=state.step)
    state.reading = reading
    state.segments.append({"start": state.step, "end": state.step, "ended": "running", "signal": None,
                           "processes": reading["processes"], "slurm_job": slurm_job(),
                           "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", 0))})
