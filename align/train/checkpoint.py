"""Checkpoints as safetensors and JSON only: nothing written here is a pickle, and resuming never
unpickles (Accelerate's ``save_state``/``load_state`` write ``*.pkl``/``*.bin`` files read with
``pickle``/``torch.load``, which run code planted in them). Accelerate still owns the process
group, DDP and mixed precision; the state is written and read here. The layout::

    step-XXXXXXXX/
      trainer_state.json        step, epoch, batch_in_epoch, samples; how the data was read
                                (reading); the run's segments (one per launch) and wandb run id
      config.yaml               the run's resolved config
      model.safetensors         the objective's weights: the model + learnable loss parameters
      model/                    what align.load_model takes (see save_model): loads on its own
        model.safetensors       the model's weights
        config.yaml             the config, towers pointing at the files beside it
        <modality>/, open_clip/ tower sources: HF config + tokenizer, open_clip model JSON
      optimizer.safetensors     optimiser state tensors, "<param index>.<name>" (exp_avg, step, ...)
      optimizer.json            param_groups (hyperparameters, param_names) and non-tensor state entries
      scheduler.json            the LR scheduler's state (a LambdaLR: its lambdas are code, not state)
      grad_scaler.json          the fp16 GradScaler's state (mixed_precision fp16 only)
      rng-<rank>.safetensors    each process's RNG: torch CPU and CUDA generators, numpy and
                                python ``random`` (tensors + JSON in the safetensors metadata)

Each checkpoint is written to ``step-XXXXXXXX.tmp`` and renamed when whole, so a crash mid-save
never leaves a checkpoint that looks complete; an old checkpoint is renamed to
``step-XXXXXXXX.old`` before it is deleted, so a crash mid-prune never leaves half of one under
its name either. Leftover ``.tmp``/``.old`` folders are removed when the next run starts. A disk full (any ``OSError``) while writing is a
``RunError`` naming the checkpoint, on every process. Reading refuses a file that is not valid
safetensors or JSON with a ``RunError`` naming it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

from align.config import Config, load_config, save_config
from align.data.bad_samples import BadSampleTally
from align.errors import ConfigError, RunError, replace_folder, write_json_atomic
from align.loading import read_json, read_tensors, write_tensors
from align.train.optim import groups_by_value

log = logging.getLogger("align.train")

STEP_DIR = re.compile(r"^step-(\d+)$")
MODEL_SUBDIR = "model"
# In each rng-<rank>.safetensors' metadata: that process's skipped samples so far (BadSampleTally.state),
# so a resumed run's count and its data.max_bad_fraction check go on from the checkpoint's
BAD_SAMPLES_KEY = "bad_samples"


def checkpoint_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, "checkpoints", f"step-{step:08d}")


def list_checkpoints(output_dir: str) -> list:
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, name)) for name in os.listdir(root) if (m := STEP_DIR.match(name))]
    return [path for _, path in sorted(found)]


def resolve_resume(output_dir: str, resume: str) -> Optional[str]:
    """"" -> None; "latest" -> newest complete checkpoint or None; a path must exist."""
    if not resume:
        return None
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    if not os.path.isfile(os.path.join(resume, "trainer_state.json")):
        raise ConfigError(f"train.resume: {resume} is not a complete checkpoint (no trainer_state.json); "
                          "give a checkpoint folder, 'latest' or ''")
    step = read_train_state(resume).step
    later = [path for path in list_checkpoints(output_dir) if read_train_state(path).step > step]
    if later:  # pruning by step would delete the new run's checkpoints, and 'latest' would pick the old ones
        raise ConfigError(f"train.resume: {resume} is at step {step}, but train.output_dir {output_dir} holds later "
                          f"checkpoints ({', '.join(os.path.basename(p) for p in later)}) that a run from it would "
                          "be mixed with; give another train.output_dir, or move those checkpoints away")
    return resume


@dataclass
class TrainState:
    """Where a run stands; saved as ``trainer_state.json`` in every checkpoint, read on resume."""

    step: int = 0  # optimiser steps taken
    epoch: int = 0  # the epoch being read
    batch_in_epoch: int = 0  # loader batches of that epoch consumed (resume skips them)
    samples: int = 0  # samples trained on, all processes
    run_id: str = ""  # the wandb run's id: a resumed run goes on logging to the same run
    # How the training data was read (processes, batch size, workers, ...): a resume mid-epoch
    # checks that the rest of the epoch can still be read exactly once (align/train/recipe.py).
    reading: Dict[str, Any] = field(default_factory=dict)
    # One entry per launch: {"start", "end" steps, "ended": running | stopped | interrupted |
    # finished, "signal", "processes", "slurm_job", "slurm_restart"}.
    segments: List[Dict[str, Any]] = field(default_factory=list)
    # train.best_metric's record: {"metric", "value", "step", "since", "counted_step"} (align/train/best.py)
    best: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainState":
        """Checkpoints from before ``run_id``/``reading``/``segments``/``best`` load with their defaults."""
        counters = {name: int(values[name]) for name in ("step", "epoch", "batch_in_epoch", "samples")}
        segments = values.get("segments", [])
        if not isinstance(segments, list) or not all(isinstance(s, dict) for s in segments):
            raise ValueError(f"segments must be a list of objects, got {segments!r:.80}")
        reading = values.get("reading", {})
        if not isinstance(reading, dict):
            raise ValueError(f"reading must be an object, got {reading!r:.80}")
        best = values.get("best", {})
        if not isinstance(best, dict):
            raise ValueError(f"best must be an object, got {best!r:.80}")
        return cls(**counters, run_id=str(values.get("run_id", "")), reading=dict(reading),
                   segments=[dict(s) for s in segments], best=dict(best))


def read_train_state(path: str) -> TrainState:
    """The ``trainer_state.json`` of checkpoint folder ``path``; ``RunError`` naming it if unreadable."""
    state_file = os.path.join(path, "trainer_state.json")
    try:
        return TrainState.from_dict(read_json(state_file))
    except (KeyError, TypeError, ValueError) as error:
        raise RunError(f"{state_file}: not a trainer state ({error!r})") from None


def remove_leftovers(output_dir: str) -> List[str]:
    """Delete ``step-*.tmp`` / ``step-*.old`` folders a crashed run left behind; their names."""
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    gone = [name for name in os.listdir(root)
            if STEP_DIR.match(name.rsplit(".", 1)[0]) and name.rsplit(".", 1)[-1] in ("tmp", "old")]
    for name in gone:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return gone


# ------------------------------------------------------------------ safe files


# ------------------------------------------------------------------ state <-> files


def optimizer_files(state: Dict[str, Any]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """A torch optimiser ``state_dict`` -> (tensors "<index>.<name>", JSON: param_groups + scalars)."""
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_state(tensors: Dict[str, torch.Tensor], data: Dict[str, Any]) -> Dict[str, Any]:
    """The inverse of ``optimizer_files``: a ``state_dict`` that ``Optimizer.load_state_dict`` takes."""
    state: Dict[int, Dict[str, Any]] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = value
    for index, entries in data.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(entries)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in group.items()} for group in data["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_files() -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """This process's RNG states: tensors, plus the non-tensor parts as JSON metadata strings."""
    version, python_state, gauss_next = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    tensors = {"torch_cpu": torch.get_rng_state(), "python": torch.tensor(python_state, dtype=torch.int64),
               "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        for device, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{device}"] = cuda_state
    metadata = {"python": json.dumps({"version": version, "gauss_next": gauss_next}),
                "numpy": json.dumps({"kind": kind, "position": int(position), "has_gauss": int(has_gauss),
                                     "cached_gaussian": float(cached)})}
    return tensors, metadata


def restore_rng(tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> None:
    python, numpy_rest = json.loads(metadata["python"]), json.loads(metadata["numpy"])
    random.setstate((python["version"], tuple(tensors["python"].tolist()), python["gauss_next"]))
    np.random.set_state((numpy_rest["kind"], tensors["numpy_keys"].numpy().astype(np.uint32), numpy_rest["position"],
                         numpy_rest["has_gauss"], numpy_rest["cached_gaussian"]))
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        for device in range(torch.cuda.device_count()):
            if f"cuda_{device}" in tensors:
                torch.cuda.set_rng_state(tensors[f"cuda_{device}"], device)


# ------------------------------------------------------------------ save / load


def save_checkpoint(accelerator, objective, optimizer, scheduler, config: Config, output_dir: str,
                    state: TrainState, keep: int, bad: Optional[BadSampleTally] = None) -> str:
    """Write the checkpoint for ``state.step`` atomically; prune to ``keep`` newest.

    Every process calls this (each writes its RNG file, with its count of skipped samples ``bad``);
    the main process writes the rest.
    """
    final = checkpoint_dir(output_dir, state.step)
    tmp = final + ".tmp"
    if accelerator.is_main_process and os.path.exists(tmp):
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    failure = None
    try:
        os.makedirs(tmp, exist_ok=True)
        rng, rng_json = rng_files()
        if bad is not None:
            rng_json[BAD_SAMPLES_KEY] = json.dumps(bad.state())
        write_tensors(rng, os.path.join(tmp, f"rng-{accelerator.process_index}.safetensors"), metadata=rng_json)
        if accelerator.is_main_process:
            _write_main_state(accelerator, objective, optimizer, scheduler, config, tmp, state)
    except OSError as error:
        failure = error
    _raise_if_any_failed(accelerator, failure, f"writing checkpoint {tmp}")
    if accelerator.is_main_process:
        try:
            replace_folder(tmp, final)  # a checkpoint saved again at the same step is swapped whole
        except OSError as error:
            failure = error
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            try:  # out of the way first: a crash mid-delete must not leave half a checkpoint in view
                os.replace(old, old + ".old")
                shutil.rmtree(old + ".old", ignore_errors=True)
            except OSError as error:
                log.warning("could not remove the old checkpoint %s: %s", old, error)
    _raise_if_any_failed(accelerator, failure, f"renaming checkpoint {tmp} to {final}")
    return final


def _write_main_state(accelerator, objective, optimizer, scheduler, config: Config, folder: str,
                      state: TrainState) -> None:
    unwrapped = accelerator.unwrap_model(objective)
    save_model(unwrapped.model, config, os.path.join(folder, MODEL_SUBDIR))
    write_tensors(unwrapped.state_dict(), os.path.join(folder, "model.safetensors"), metadata={"format": "align"})
    tensors, groups = optimizer_files(optimizer.state_dict())
    write_tensors(tensors, os.path.join(folder, "optimizer.safetensors"), metadata={"format": "align"})
    write_json_atomic(groups, os.path.join(folder, "optimizer.json"))
    # A LambdaLR's state holds its lambdas as None: they are code, rebuilt from the config.
    write_json_atomic(scheduler.state_dict(), os.path.join(folder, "scheduler.json"))
    if getattr(accelerator, "scaler", None) is not None:
        write_json_atomic(accelerator.scaler.state_dict(), os.path.join(folder, "grad_scaler.json"))
    save_config(config, os.path.join(folder, "config.yaml"))
    write_json_atomic(state.to_dict(), os.path.join(folder, "trainer_state.json"))


def _raise_if_any_failed(accelerator, failure: Optional[OSError], doing: str) -> None:
    """All processes learn whether any failed (one all-reduce, which also acts as the barrier), so
    none waits forever for a process that gave up; each raises ``RunError``."""
    flag = torch.tensor([1.0 if failure is not None else 0.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, reduction="sum")
    if failure is not None:
        raise RunError(f"{doing}: {failure} (is the disk full?)") from failure
    if flag.item() > 0:
        raise RunError(f"{doing}: another process failed (see its error)")


def load_checkpoint(path: str, accelerator, objective, optimizer, scheduler,
                    bad: Optional[BadSampleTally] = None, schedule_step: Optional[int] = None) -> TrainState:
    """Restore a checkpoint written by ``save_checkpoint`` into the prepared training objects (and
    this process's count of skipped samples into ``bad``); returns the trainer state. Only
    safetensors and JSON are read; ``*.pkl``/``*.bin`` files that Accelerate would have written are
    never opened. ``schedule_step``: the schedule's place in this launch's steps
    (``align.train.optim.plan_schedule``), in place of the saved one."""
    state = read_train_state(path)
    weights, _ = read_tensors(os.path.join(path, "model.safetensors"))
    try:
        accelerator.unwrap_model(objective).load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise RunError(f"{path}: the checkpoint's weights do not fit this run's model: {error}") from None
    configured = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    tensors, _ = read_tensors(os.path.join(path, "optimizer.safetensors"))
    saved = optimizer_state(tensors, read_json(os.path.join(path, "optimizer.json")))
    try:
        unwrapped = accelerator.unwrap_model(objective)
        optimizer.load_state_dict(state_by_name(saved, optimizer.state_dict(), path, unwrapped))
    except ValueError as error:  # other parameters train: a tower frozen or thawed since
        raise RunError(f"{path}: the checkpoint's optimizer state does not fit this run's parameter groups ({error}); "
                       "resume with the model.towers.<m>.freeze settings it was saved with, or start a new run "
                       "from its weights (model.init_from)") from None
    scheduler.load_state_dict(read_json(os.path.join(path, "scheduler.json")))
    if schedule_step is not None:
        scheduler.last_epoch = schedule_step
    use_configured_hyperparameters(optimizer, scheduler, configured)
    scaler_file = os.path.join(path, "grad_scaler.json")
    if getattr(accelerator, "scaler", None) is not None and os.path.isfile(scaler_file):
        accelerator.scaler.load_state_dict(read_json(scaler_file))
    rng_file = os.path.join(path, f"rng-{accelerator.process_index}.safetensors")
    if os.path.isfile(rng_file):
        rng, metadata = read_tensors(rng_file)
        restore_rng(rng, metadata)
        if bad is not None and BAD_SAMPLES_KEY in metadata:
            bad.restore(json.loads(metadata[BAD_SAMPLES_KEY]))
    else:  # a different number of processes than the run that saved it
        log.warning("%s: no RNG state or bad-sample count for process %d; its random streams and count start "
                    "afresh", path, accelerator.process_index)
    return state


def state_by_name(saved: Dict[str, Any], current: Dict[str, Any], path: str, objective) -> Dict[str, Any]:
    """The saved optimiser state (``optimizer_state``) laid out on this run's parameter groups
    (``current``: the optimiser's own ``state_dict``), each parameter's moments found by its name:
    a resume whose groups are made otherwise (another grouping, a tower's changed ``lr_scale``)
    still gives every parameter its own moments. ``ValueError`` when other parameters train.

    Checkpoints record the names (``param_names``); for one from before, they are rebuilt as its
    groups were then made (``groups_by_value``, from the config it saved)."""
    names = [name for group in current["param_groups"] for name in group["param_names"]]
    saved_names = [name for group in saved["param_groups"] for name in group.get("param_names", [])]
    if not saved_names:
        saved_names = _names_by_value(saved, path, objective)
    saved_index = dict(zip(saved_names, (i for group in saved["param_groups"] for i in group["params"])))
    if sorted(saved_names) != sorted(names) or len(saved_index) != len(names):
        missing, extra = sorted(set(names) - set(saved_index)), sorted(set(saved_index) - set(names))
        raise ValueError(f"trained here, not saved: {missing[:3] or 'none'}; saved, not trained here: "
                         f"{extra[:3] or 'none'}")
    indices = [i for group in current["param_groups"] for i in group["params"]]
    state = {i: saved["state"][saved_index[name]] for i, name in zip(indices, names)
             if saved_index[name] in saved["state"]}
    return {"state": state, "param_groups": current["param_groups"]}


def _names_by_value(saved: Dict[str, Any], path: str, objective) -> List[str]:
    """The parameter names of an optimiser state saved before checkpoints recorded them, in its
    order: its groups were keyed by (decay, lr scale) values of the config it was saved with."""
    try:
        config = load_config(os.path.join(path, "config.yaml"))  # a ConfigError is a ValueError: refused as ever
    except OSError as error:
        raise ValueError(f"it records no parameter names, and its config.yaml cannot be read ({error})") from None
    tower_scale = {m: t.lr_scale for m, t in config.model.towers.items()}
    groups = groups_by_value(objective, config.optim, tower_scale, objective.own_lr())
    if [len(g) for g in groups] != [len(g["params"]) for g in saved["param_groups"]]:
        raise ValueError("its parameter groups hold other parameters than this run trains")
    return [name for group in groups for name in group]


def use_configured_hyperparameters(optimizer, scheduler, configured: List[Dict[str, Any]]) -> None:
    """Each parameter group's settings from this run's config (``configured``: the groups as built
    before the checkpoint was loaded), not the saved run's: a resume with another ``optim.lr``,
    ``optim.weight_decay`` or tower ``lr_scale`` trains with it (it silently kept the old ones).
    The moments and the schedule's position stay the checkpoint's, and a resume with an unchanged
    config computes the very same values."""
    for group, values in zip(optimizer.param_groups, configured):
        group.update(values)
    scheduler.base_lrs = [values["initial_lr"] for values in configured]
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)  # what the scheduler's last step set, at the new base
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports


def save_model(model: torch.nn.Module, config: Config, folder: str) -> None:
    """A self-contained model folder: weights (safetensors), every tower's sources (configs,
    tokenizer files, model JSON) and the config pointing the towers at them, relative to
    ``folder``. ``align.load_model(folder)`` needs nothing else."""
    import copy

    os.makedirs(folder, exist_ok=True)
    saved = copy.deepcopy(config)
    for modality, tower in model.towers.items():
        saved.model.towers[modality].params = tower.save_sources(folder)
    write_tensors(model.state_dict(), os.path.join(folder, "model.safetensors"), metadata={"format": "align"})
    save_config(saved, os.path.join(folder, "config.yaml"))
