"""The training recipe: config -> Accelerator -> data -> objective -> optimiser -> prepare ->
resume -> loop -> evaluate -> save. ``train(config)`` is what ``align train`` and ``train.py`` run.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Dict, List, Optional

import torch

from align.config import Config, save_config, to_dict
from align.data.transforms import SampleProcessor
from align.model import build_model
from align.objective import ContrastiveObjective, build_pair_losses, cached_step
from align.train import checkpoint
from align.train.optim import build_optimizer, build_scheduler

log = logging.getLogger("align.train")


def to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def make_accelerator(config: Config):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    # Some steps leave parameters unused on a rank: a batch with no audio, an empty tail batch
    # of an exactly-once epoch, the loss-only and encode-only passes of the cached step.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    return Accelerator(
        # Without CUDA, Accelerate only forms a (gloo) process group when told it runs on CPU.
        cpu=not torch.cuda.is_available(),
        mixed_precision=config.train.mixed_precision,
        log_with=None if config.train.wandb == "disabled" else "wandb",
        project_config=ProjectConfiguration(project_dir=config.train.output_dir),
        kwargs_handlers=[ddp],
    )


def build_train_loader(config: Config, processor: SampleProcessor, rank: int, world_size: int, train: bool = True,
                       spec: Optional[str] = None, pin_memory: bool = False):
    from align.data.loader import build_loader
    from align.data.manifest import ColumnMap

    data = config.data
    columns = ColumnMap(id=data.columns.id, text=tuple(data.columns.text), text_separator=data.columns.text_separator,
                        image=data.columns.image, audio=data.columns.audio, group=data.columns.group,
                        category=data.columns.category, negatives=data.columns.negatives)
    return build_loader(
        spec or data.train, processor, batch_size=data.batch_size if train else config.eval.batch_size,
        num_workers=data.num_workers, train=train, seed=config.train.seed, rank=rank, world_size=world_size,
        columns=columns, root=data.root, shuffle_buffer=data.shuffle_buffer, resampled=data.resampled and train,
        epoch_samples=data.epoch_samples or None, weights=data.weights or None,
        max_bad_fraction=data.max_bad_fraction, drop_last=train, pin_memory=pin_memory,
    )


def train(config: Config) -> Dict[str, Any]:
    """Train as configured; returns the final evaluation (and the run's figures)."""
    from accelerate.utils import set_seed

    from align.preflight import check_run_inputs

    check_run_inputs(config)  # a wrong path or model name is refused before anything is built or written
    accelerator = make_accelerator(config)
    out_dir = config.train.output_dir
    set_seed(config.train.seed)
    if accelerator.is_main_process:
        save_config(config, os.path.join(out_dir, "config.yaml"))

    model = build_model(config.model)
    objective = ContrastiveObjective(model, build_pair_losses(model.modalities, config.loss))
    processor = SampleProcessor(model.preprocessors(train=True), max_negatives=config.data.max_negatives)
    loader = build_train_loader(config, processor, accelerator.process_index, accelerator.num_processes,
                                pin_memory=accelerator.device.type == "cuda")
    accum = config.train.accum_steps
    steps_per_epoch = len(loader) // accum
    if steps_per_epoch == 0:
        raise ValueError(f"data.train={config.data.train}: fewer than {accum} batches of "
                         f"{config.data.batch_size} per process; lower data.batch_size or train.accum_steps")
    total_steps = config.train.max_steps or config.train.epochs * steps_per_epoch

    tower_scale = {m: t.lr_scale for m, t in config.model.towers.items()}
    objective.to(accelerator.device)  # before the optimiser, whose kernel choice follows the device
    optimizer = build_optimizer(objective, config.optim, tower_scale)
    scheduler = build_scheduler(optimizer, total_steps, config.optim)
    # The scheduler is not prepared: Accelerate would step it once per process per call.
    objective, optimizer = accelerator.prepare(objective, optimizer)

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "samples": 0}
    resume_from = checkpoint.resolve_resume(out_dir, config.train.resume)
    if resume_from:  # safetensors + JSON only (align/train/checkpoint.py): resuming unpickles nothing
        state = checkpoint.load_checkpoint(resume_from, accelerator, objective, optimizer, scheduler)
        accelerator.print(f"resumed from {resume_from} at step {state['step']}")

    accelerator.init_trackers(config.train.wandb_project, config=to_dict(config),
                              init_kwargs={"wandb": {"mode": config.train.wandb, "dir": out_dir}})
    global_batch = config.data.batch_size * accum * accelerator.num_processes
    accelerator.print(f"{total_steps} steps of {global_batch} samples (the number of negatives); "
                      f"{steps_per_epoch} steps per epoch on each of {accelerator.num_processes} processes")

    progress = _progress(accelerator, config, total_steps, state["step"])
    eval_model = accelerator.unwrap_model(objective).model
    history: List[Dict[str, float]] = []
    started, window_samples, window_start = time.time(), 0, time.time()

    def off_the_clock(work, *args):
        """Run evaluation or checkpointing without charging it to samples/s (which, as in
        open_clip's log, measures training: data wait + step)."""
        nonlocal window_start
        paused = time.time()
        result = work(*args)
        window_start += time.time() - paused
        return result

    while state["step"] < total_steps:
        micro: List[dict] = []
        for batch in loader.iterate(state["epoch"], skip_batches=state["batch_in_epoch"]):
            state["batch_in_epoch"] += 1
            micro.append(to_device(batch, accelerator.device))
            if len(micro) < accum:
                continue
            terms = _step(accelerator, objective, optimizer, micro, config)
            scheduler.step()
            n = sum(len(b["ids"]) for b in micro) * accelerator.num_processes
            micro = []
            state["step"] += 1
            state["samples"] += n
            window_samples += n
            if state["step"] % config.train.log_every == 0 or state["step"] == total_steps:
                sps = window_samples / max(time.time() - window_start, 1e-9)
                window_samples, window_start = 0, time.time()
                record = mean_over_processes(accelerator, terms)
                record.update(lr=scheduler.get_last_lr()[0], samples_per_s=sps, bad_samples=loader.bad.total)
                history.append({"step": state["step"], **record})
                accelerator.log({f"train/{k}": v for k, v in record.items()}, step=state["step"])
                if progress is not None:
                    progress.set_postfix(loss=f"{record['loss']:.3f}", sps=f"{sps:.0f}", bad=loader.bad.total)
            if progress is not None:
                progress.update(1)
            if config.train.eval_every and state["step"] % config.train.eval_every == 0:
                off_the_clock(_evaluate, accelerator, eval_model, config, state["step"])
            if config.train.save_every and state["step"] % config.train.save_every == 0:
                off_the_clock(checkpoint.save_checkpoint, accelerator, objective, optimizer, scheduler, config,
                              out_dir, state, config.train.keep_checkpoints)
            if state["step"] >= total_steps:
                break
        else:  # the epoch ran out
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
            if not config.train.eval_every and state["step"] < total_steps:
                off_the_clock(_evaluate, accelerator, eval_model, config, state["step"])
            if not config.train.save_every:
                off_the_clock(checkpoint.save_checkpoint, accelerator, objective, optimizer, scheduler, config,
                              out_dir, state, config.train.keep_checkpoints)
    if progress is not None:
        progress.close()
    final = checkpoint.save_checkpoint(accelerator, objective, optimizer, scheduler, config, out_dir, state,
                                       config.train.keep_checkpoints)
    results = _evaluate(accelerator, eval_model, config, state["step"], final=True)
    summary = {"steps": state["step"], "samples": state["samples"], "seconds": time.time() - started,
               "bad_samples": dict(loader.bad.counts), "checkpoint": final, "history": history, "eval": results}
    if accelerator.is_main_process:
        with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2)
        if loader.bad.total:
            accelerator.print(f"skipped {loader.bad.total} bad samples: {dict(loader.bad.counts)}")
    accelerator.end_training()
    return summary


def _step(accelerator, objective, optimizer, micro: List[dict], config: Config) -> Dict[str, torch.Tensor]:
    """One optimiser step over ``micro`` (one batch, or accum_steps batches contrasted together)."""
    if len(micro) == 1:
        with accelerator.autocast():
            terms = objective(micro[0])
        accelerator.backward(terms["loss"])
    else:
        with accelerator.autocast():
            terms = cached_step(objective, micro, accelerator.backward, lambda: accelerator.no_sync(objective))
    if config.optim.grad_clip > 0:
        accelerator.clip_grad_norm_(objective.parameters(), config.optim.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {k: v.detach() for k, v in terms.items()}


def mean_over_processes(accelerator, terms: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """The step's loss terms as one process on the whole global batch would report them.

    Under gathering each rank's loss is its share, scaled so that the mean over ranks is the
    global value (align/losses/pairs.py); rank 0's own number alone would be a partial loss.
    One all-reduce of the stacked scalars; every rank must call this at the same step.
    """
    names = list(terms)
    values = accelerator.reduce(torch.stack([terms[k].float() for k in names]), reduction="mean")  # (n_terms,)
    return dict(zip(names, values.tolist()))


def _evaluate(accelerator, model, config: Config, step: int, final: bool = False) -> Optional[Dict[str, Any]]:
    """Retrieval on the held-out split, on the main process (others wait)."""
    from align.eval.runner import evaluate_model, write_results

    split = config.eval.split or config.data.val
    results = None
    if split and accelerator.is_main_process:
        was_training = model.training
        results = evaluate_model(model, config, split, accelerator.device)
        model.train(was_training)
        name = config.eval.output or os.path.join(config.train.output_dir, "eval.json")
        write_results(results, name if final else os.path.join(config.train.output_dir, f"eval-step-{step:08d}.json"))
        accelerator.log({f"eval/{pair}/{k}": v for pair, m in results.items() for k, v in m.items()}, step=step)
    accelerator.wait_for_everyone()
    return results


def _progress(accelerator, config: Config, total: int, initial: int):
    if not (config.train.progress and accelerator.is_main_process):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)
