"""The training recipe: config -> Accelerator -> data -> objective -> optimiser -> prepare ->
resume -> loop -> evaluate -> save. ``train(config)`` is what ``align train`` and ``train.py`` run.

A run can stop early and go on later: SIGUSR1 or SIGTERM saves after the current step and raises
``Stopped`` (align/train/preempt.py; inside a SLURM batch job the job is requeued), and
``train.resume=latest`` continues from the newest checkpoint, mid-epoch, reading the rest of the
epoch exactly once (align/train/resume.py). Each launch is a *segment* of the run, recorded in the
checkpoints and in ``summary.json``.
"""
from __future__ import annotations

import logging
import os
import signal
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional

import torch

from align.config import Config, product_fields, save_config, to_dict
from align.data.bad_samples import take_bad_report
from align.data.loader import loader_from_config
from align.data.transforms import SampleProcessor
from align.errors import RunError, remove_staged_leftovers, write_json_atomic
from align.fields import field_weights, towers_without_fields
from align.model import build_model
from align.objective import ContrastiveObjective, QueryProductObjective, build_pair_losses
from align.train import checkpoint
from align.train.best import best_folder, track_best
from align.train.checkpoint import TrainState
from align.train.cached_step import cached_step
from align.train.health import SampleClock, gradient_norms, mean_over_processes
from align.train.optim import build_optimizer, build_scheduler, plan_schedule
from align.train.preempt import StopAgreement, Stopped, StopSignals, requeue, slurm_job
from align.train.prefetch import prefetch_to_device
from align.train.resume import begin_segment, reading_of, resume_position
from align.train.seen import SeenLog

log = logging.getLogger("align.train")


def make_accelerator(config: Config):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    if torch.cuda.is_available():
        # TF32 matmuls and cuDNN's autotuner, as open_clip's trainer turns on whenever CUDA is
        # there: fp32 steps run on the tensor cores (10-bit mantissa products, fp32 sums).
        # train.tf32=false keeps full fp32 products and deterministic kernels.
        torch.backends.cuda.matmul.allow_tf32 = config.train.tf32
        torch.backends.cudnn.allow_tf32 = config.train.tf32
        torch.backends.cudnn.benchmark = config.train.tf32
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


@dataclass
class Run:
    """What the loop works with once everything is built and prepared."""

    accelerator: Any
    config: Config
    objective: Any  # the prepared (possibly DDP-wrapped) ContrastiveObjective
    optimizer: Any
    scheduler: Any
    loader: Any
    total_steps: int
    history: List[Dict[str, float]] = field(default_factory=list)
    progress: Any = None  # a tqdm bar on the main process, when asked for
    clock: SampleClock = field(default_factory=SampleClock)
    stop: Optional[StopAgreement] = None  # polled at every step boundary (align/train/preempt.py)
    stop_signal: int = 0  # the agreed signal once the processes decided to stop
    seen: Optional[SeenLog] = None  # train.record_ids: the ids each step trained on
    stopped_early: bool = False  # train.patience ran out (align/train/best.py)


def train(config: Config) -> Dict[str, Any]:
    """Train as configured; returns the final evaluation (and the run's figures). Raises
    ``Stopped`` after saving when SIGUSR1/SIGTERM asked the run to stop."""
    from align.preflight import check_run_inputs

    check_run_inputs(config)  # a wrong path or model name is refused before anything is built or written
    # Caught from here on: a signal during set-up stops the run at its first step boundary.
    with StopSignals() as signals:
        return _train(config, signals)


def _train(config: Config, signals: StopSignals) -> Dict[str, Any]:
    from accelerate.utils import set_seed

    from align.preflight import check_train_split_fills_a_step

    accelerator = make_accelerator(config)
    out_dir = config.train.output_dir
    resume_from = checkpoint.resolve_resume(out_dir, config.train.resume)
    reading = reading_of(config, accelerator.num_processes)
    saved = checkpoint.read_train_state(resume_from) if resume_from else None
    # A resume that cannot read the rest of the epoch exactly once is refused before any work.
    position = resume_position(saved, reading, resume_from) if saved else 0
    set_seed(config.train.seed)

    model = build_model(config.model)
    if config.model.init_from:
        init_weights(model, config.model.init_from)
    objective = build_objective(model, config)
    processor = SampleProcessor(model.preprocessors(train=True), max_negatives=config.data.max_negatives)
    if config.train.compile:  # in place: the towers keep their parameter names (checkpoints load as ever)
        for tower in model.towers.values():
            tower.compile(backend=config.train.compile_backend)
    loader = build_train_loader(config, processor, accelerator)
    check_train_split_fills_a_step(config, loader, accelerator.num_processes)
    if accelerator.is_main_process:
        save_config(config, os.path.join(out_dir, "config.yaml"))
        for name in checkpoint.remove_leftovers(out_dir) + remove_staged_leftovers(best_folder(out_dir)):
            log.warning("removed %s, left by a run that stopped while saving or pruning", name)
        if config.data.search_log.log:
            warn_of_towers_without_fields(config)
    steps_per_epoch = len(loader) // config.train.accum_steps
    global_batch = config.data.batch_size * config.train.accum_steps * accelerator.num_processes
    # The schedule in steps of this launch's size, from where the run stands: a resume at another
    # batch size or number of processes still trains each epoch once, on a smooth schedule.
    plan = plan_schedule(config.optim, config.train, len(loader), global_batch, saved, position)
    objective, optimizer, scheduler = prepare_training(accelerator, objective, config, plan.total, plan.warmup)

    state = TrainState()
    if resume_from:  # safetensors + JSON only (align/train/checkpoint.py): resuming unpickles nothing
        state = checkpoint.load_checkpoint(resume_from, accelerator, objective, optimizer, scheduler, loader.bad,
                                           schedule_step=plan.start)
        state.batch_in_epoch = position
        accelerator.print(f"resumed from {resume_from} at step {state.step}")
    begin_segment(state, reading)
    state.segments[-1]["global_batch"] = global_batch  # the first launch's counts the warm-up (plan_schedule)
    total_steps = state.step + plan.remaining  # the run's last step: steps taken so far count as they were

    start_trackers(accelerator, config, state)
    steps = f"{plan.remaining} more steps (to step {total_steps})" if resume_from else f"{total_steps} steps"
    accelerator.print(f"{steps} of {global_batch} samples (the number of negatives); "
                      f"{steps_per_epoch} steps per epoch on each of {accelerator.num_processes} processes")

    started = time.time()
    run = Run(accelerator, config, objective, optimizer, scheduler, loader, total_steps,
              progress=_progress(accelerator, config, total_steps, state.step),
              stop=StopAgreement(signals, accelerator.num_processes))
    if config.train.record_ids:
        run.seen = SeenLog(out_dir, accelerator.process_index, after_step=state.step)
    try:
        while state.step < total_steps and not run.stopped_early:
            if train_epoch(run, state):
                end_epoch(run, state)
            elif run.stop_signal:
                stop(run, state)
    finally:
        if run.progress is not None:
            run.progress.close()
        if run.seen is not None:
            run.seen.close()
    return finish(run, state, started)


def init_weights(model, source: str) -> None:
    """``model.init_from``: load an align checkpoint's weights (safetensors only) into ``model``."""
    from align.errors import ConfigError
    from align.loading import model_folder, read_tensors

    weights = os.path.join(model_folder(source), "model.safetensors")
    if not os.path.isfile(weights):
        raise ConfigError(f"model.init_from: {source} holds no model.safetensors; give an align checkpoint folder")
    state, _ = read_tensors(weights)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ConfigError(f"model.init_from: {weights} does not fit model.towers ({error}); configure the towers "
                          f"as that checkpoint's config.yaml does") from None


def build_objective(model, config: Config):
    """The modality-pair objective, or the query-product one when training on a search log."""
    if config.data.search_log.log:
        from align.objective import build_loss

        fields = product_fields(config.model, config.data.columns)
        return QueryProductObjective(model, build_loss(config.loss.name, config.loss.params), fields,
                                     matryoshka=config.loss.matryoshka, field_alignment=config.loss.field_alignment,
                                     learn_field_weights=config.loss.field_weights == "learned",
                                     field_weights_lr=config.loss.field_weights_lr)
    return ContrastiveObjective(model, build_pair_losses(model.modalities, config.loss),
                                matryoshka=config.loss.matryoshka)


def warn_of_towers_without_fields(config: Config) -> None:
    """A warning for each tower of a search-log fine-tune that no product field embeds
    (``align.fields.towers_without_fields``)."""
    fields = product_fields(config.model, config.data.columns)
    for modality in towers_without_fields(config.model.towers, fields):
        log.warning("model.towers.%s has no product field in model.fields: its queries are trained against products "
                    "without %s, and field alignment cannot keep it beside the text tower, so %s search may get "
                    "worse; add one, e.g. model.fields.%s={modality: %s, weight: 0.5}", modality, modality, modality,
                    {"audio": "sound", "image": "photo"}.get(modality, modality), modality)


def sync_field_weights(accelerator, objective, config: Config) -> None:
    """``loss.field_weights: learned``: the weights the fields have reached become
    ``model.fields.<f>.weight`` of ``config`` (the fields written out where it named none). Called
    before every evaluation and save: the held-out log's catalogue is fused as training fuses it,
    and every checkpoint and the best model hold the weights, which ``align embed`` and search
    then fuse with, learned or not."""
    if config.loss.field_weights != "learned":
        return
    learned = accelerator.unwrap_model(objective).learned_weights()
    fields = product_fields(config.model, config.data.columns)
    config.model.fields = {name: replace(spec, weight=learned.get(name, spec.weight)) for name, spec in fields.items()}


def build_train_loader(config: Config, processor, accelerator):
    pin = accelerator.device.type == "cuda"
    if config.data.search_log.log:
        from align.searchlog.pairs import search_log_loader

        return search_log_loader(config, processor, rank=accelerator.process_index,
                                 world_size=accelerator.num_processes, pin_memory=pin)
    return loader_from_config(config, processor, rank=accelerator.process_index,
                              world_size=accelerator.num_processes, pin_memory=pin)


def start_trackers(accelerator, config: Config, state: TrainState) -> None:
    """wandb (offline by default) under the run id the checkpoints keep: a resumed run goes on
    logging to the same wandb run."""
    state.run_id = state.run_id or uuid.uuid4().hex[:12]
    accelerator.init_trackers(config.train.wandb_project, config=to_dict(config),
                              init_kwargs={"wandb": {"mode": config.train.wandb, "dir": config.train.output_dir,
                                                     "id": state.run_id, "resume": "allow"}})


def prepare_training(accelerator, objective: ContrastiveObjective, config: Config, total_steps: int,
                     warmup_steps: Optional[float] = None):
    """Optimiser and schedule (``total_steps`` long, ``warmup_steps`` as ``SchedulePlan.warmup``:
    the config's by default) over ``objective``, prepared by Accelerate -> (objective, optimizer, scheduler)."""
    tower_scale = {m: t.lr_scale for m, t in config.model.towers.items()}
    objective.to(accelerator.device)  # before the optimiser, whose kernel choice follows the device
    optimizer = build_optimizer(objective, config.optim, tower_scale, objective.own_lr())
    scheduler = build_scheduler(optimizer, total_steps, config.optim, warmup_steps)
    # The scheduler is not prepared: Accelerate would step it once per process per call.
    objective, optimizer = accelerator.prepare(objective, optimizer)
    return objective, optimizer, scheduler


def train_epoch(run: Run, state: TrainState) -> bool:
    """Steps through the rest of ``state.epoch``; True when the epoch ran out, False when the
    run reached its last step (the loop leaves there: the end evaluates and saves once)."""
    accum, micro = run.config.train.accum_steps, []
    # bad samples are counted as each batch is used: on CUDA the next one is read ahead, and a
    # checkpoint's count (and a resume, which reads that batch again) must not include it
    batches = run.loader.iterate(state.epoch, skip_batches=state.batch_in_epoch, count_bad=False)
    for batch in prefetch_to_device(batches, run.accelerator.device):  # CUDA: the next one copies meanwhile
        take_bad_report(batch, run.loader.bad)
        state.batch_in_epoch += 1
        micro.append(batch)
        if len(micro) < accum:
            continue
        lr = run.scheduler.get_last_lr()[0]  # what this step trains with (the first group's)
        try:
            terms = optimizer_step(run.accelerator, run.objective, run.optimizer, micro, run.config)
        except NonFiniteStep as error:
            raise diverged(run, state.step + 1, error) from None
        run.scheduler.step()
        n = sum(len(b["ids"]) for b in micro) * run.accelerator.num_processes
        micro_ids, micro = [b["ids"] for b in micro], []
        state.step += 1
        state.samples += n
        run.clock.samples += n
        if state.step % run.config.train.log_every == 0 or state.step == run.total_steps:
            log_step(run, state, terms, lr)
        if run.progress is not None:
            run.progress.update(1)
        if run.seen is not None:
            run.seen.write(state.step, state.epoch, [i for b in micro_ids for i in b])
        periodic_work(run, state, epoch_ended=False)
        if state.step >= run.total_steps or run.stopped_early:
            return False
        if run.stop is not None and (signum := run.stop.poll()):
            run.stop_signal = signum  # every process stops after this same step
            return False
    return True  # batches short of a whole step (len(loader) % accum_steps) are left out


def end_epoch(run: Run, state: TrainState) -> None:
    state.epoch += 1
    state.batch_in_epoch = 0
    periodic_work(run, state, epoch_ended=True)


def stop(run: Run, state: TrainState) -> None:
    """Save where the run stands, ask SLURM to requeue the job (main process, after every process
    saved), and raise ``Stopped`` on every process."""
    accelerator, config = run.accelerator, run.config
    name = signal.Signals(run.stop_signal).name
    state.segments[-1].update(end=state.step, ended="stopped", signal=name)
    sync_field_weights(accelerator, run.objective, config)
    path = run.clock.off_the_clock(checkpoint.save_checkpoint, accelerator, run.objective, run.optimizer,
                                   run.scheduler, config, config.train.output_dir, state,
                                   config.train.keep_checkpoints, run.loader.bad)
    run.stop.close()  # the seen log is flushed line by line and closed by train()'s finally
    job = slurm_job() if config.train.requeue else None
    requeued = job if job and accelerator.is_main_process and requeue(job) else None
    # Nobody leaves before the requeue request is made: a launcher that sees one process end
    # tears the others down, the main process with them.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    raise Stopped(name, state.step, path, requeued)


def periodic_work(run: Run, state: TrainState, epoch_ended: bool) -> None:
    """Evaluate and save every ``eval_every`` / ``save_every`` steps, or at the end of each
    epoch where that setting is 0; off the samples/s clock."""
    train_config = run.config.train
    evaluate = _due(train_config.eval_every, state.step, epoch_ended)
    save = _due(train_config.save_every, state.step, epoch_ended)
    if evaluate or save:
        sync_field_weights(run.accelerator, run.objective, run.config)
    if evaluate:
        model = run.accelerator.unwrap_model(run.objective).model
        results = run.clock.off_the_clock(_evaluate, run.accelerator, model, run.config, state.step)
        if run.clock.off_the_clock(track_best, run.accelerator, model, run.config, state, results):
            run.stopped_early = True
            run.accelerator.print(f"step {state.step}: {train_config.best_metric} has not improved in "
                                  f"{train_config.patience} evaluations (best {state.best.get('value')} at step "
                                  f"{state.best.get('step')}, in {best_folder(train_config.output_dir)}); "
                                  f"stopping (train.patience)")
    if save:
        if state.segments:
            state.segments[-1]["end"] = state.step
        run.clock.off_the_clock(checkpoint.save_checkpoint, run.accelerator, run.objective, run.optimizer,
                                run.scheduler, run.config, train_config.output_dir, state,
                                train_config.keep_checkpoints, run.loader.bad)


def _due(every: int, step: int, epoch_ended: bool) -> bool:
    return epoch_ended if every == 0 else not epoch_ended and step % every == 0


def log_step(run: Run, state: TrainState, terms: Dict[str, torch.Tensor], lr: float) -> None:
    """The step's global loss terms, the lr it trained with, samples/s and bad samples to the
    trackers and the bar."""
    sps = run.clock.rate()
    bad = run.loader.bad.total
    record = mean_over_processes(run.accelerator, terms)
    record.update(lr=lr, samples_per_s=sps, bad_samples=bad)
    run.history.append({"step": state.step, **record})
    run.accelerator.log({f"train/{k}": v for k, v in record.items()}, step=state.step)
    if run.progress is not None:
        run.progress.set_postfix(loss=f"{record['loss']:.3f}", sps=f"{sps:.0f}", bad=bad)


def finish(run: Run, state: TrainState, started: float) -> Dict[str, Any]:
    """The last checkpoint and evaluation, then ``summary.json``; returns the summary."""
    accelerator, config, loader = run.accelerator, run.config, run.loader
    out_dir = config.train.output_dir
    if run.stop is not None:
        run.stop.close()
    if state.segments:
        state.segments[-1].update(end=state.step, ended="finished")
    sync_field_weights(accelerator, run.objective, config)
    final = checkpoint.save_checkpoint(accelerator, run.objective, run.optimizer, run.scheduler, config, out_dir,
                                       state, config.train.keep_checkpoints, loader.bad)
    model = accelerator.unwrap_model(run.objective).model
    results = _evaluate(accelerator, model, config, state.step, final=True)
    track_best(accelerator, model, config, state, results)  # the last evaluation counts too
    segments = state.segments
    summary = {"steps": state.step, "samples": state.samples, "seconds": time.time() - started,
               "bad_samples": dict(loader.bad.counts), "checkpoint": final,
               "preemptions": sum(s["ended"] == "stopped" for s in segments), "resumes": len(segments) - 1,
               "segments": [dict(s, steps=s["end"] - s["start"]) for s in segments],
               "history": run.history, "eval": results}
    if config.loss.field_weights == "learned":  # where they ended (the last checkpoint's model.fields)
        summary["field_weights"] = field_weights(config.model.fields)
    if config.train.best_metric:
        best = {k: state.best.get(k) for k in ("metric", "value", "step")}
        summary.update(best=dict(best, folder=best_folder(out_dir)), stopped_early=run.stopped_early)
    if accelerator.is_main_process:
        write_json_atomic(summary, os.path.join(out_dir, "summary.json"))
        if loader.bad.total:
            accelerator.print(f"skipped {loader.bad.total} bad samples: {dict(loader.bad.counts)}")
    accelerator.end_training()
    return summary


def optimizer_step(accelerator, objective, optimizer, micro: List[dict], config: Config) -> Dict[str, torch.Tensor]:
    """One optimiser step over ``micro`` (one batch, or accum_steps batches contrasted together).

    Returns the loss terms plus the gradient norms before clipping: ``grad_norm`` over every
    parameter and ``grad_norm/<modality>`` per tower (after DDP's all-reduce: the same on every
    rank; unscaled under fp16).
    """
    if len(micro) == 1:
        with accelerator.autocast():
            terms = objective(micro[0])
        accelerator.backward(terms["loss"])
    else:
        with accelerator.autocast():
            terms = cached_step(objective, micro, accelerator.backward, lambda: accelerator.no_sync(objective),
                                accelerator.unwrap_model(objective).reusable)
    accelerator.unscale_gradients()  # fp16: true gradients for the norms and the clip (no-op otherwise)
    model = accelerator.unwrap_model(objective).model
    terms = {k: v.detach() for k, v in terms.items()}
    terms.update(gradient_norms(accelerator.unwrap_model(objective)))
    check_finite(accelerator, terms)  # before the update: a diverged step must not reach the weights
    if config.optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(objective.parameters(), config.optim.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if config.model.logit_scale_clamp == "parameter":
        model.clamp_logit_scale_()
    return terms


class NonFiniteStep(RunError):
    """The loss or the gradient norm of a step is NaN or infinite (on some process)."""


def check_finite(accelerator, terms: Dict[str, torch.Tensor]) -> None:
    """Raise ``NonFiniteStep`` on every process when the loss or the gradient norm is NaN or
    infinite on any of them: one all-reduce, so all stop at the same step and none is left
    waiting in the next collective. It costs one device sync a step (the fp16 GradScaler's step
    makes one too). Under fp16 the GradScaler skips a step whose gradients overflowed and lowers
    its scale, which is how fp16 training goes on: only a non-finite loss stops the run then."""
    flags = torch.stack([~torch.isfinite(terms["loss"]), ~torch.isfinite(terms["grad_norm"])]).float()  # (2,)
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, reduction="sum")
    loss_bad, grad_bad = (flags > 0).tolist()
    scaler_skips = getattr(accelerator, "scaler", None) is not None
    if loss_bad or (grad_bad and not scaler_skips):
        what = "the loss" if loss_bad else "the gradient norm"
        raise NonFiniteStep(f"{what} is not finite on {'some' if accelerator.num_processes > 1 else 'the'} "
                            f"process (this one's loss {terms['loss'].item()}, gradient norm "
                            f"{terms['grad_norm'].item()})")


def diverged(run: Run, step: int, error: NonFiniteStep) -> RunError:
    """The error a diverged step ends the run with: the step, and the checkpoint to go back to."""
    saved = checkpoint.list_checkpoints(run.config.train.output_dir)
    where = (f"the last checkpoint is {saved[-1]}: resume from it (train.resume=latest)" if saved
             else "no checkpoint was saved before it: start again")
    return RunError(f"step {step}: {error}: training diverged. The step was not applied, and nothing of it saved; "
                    f"{where} with a lower optim.lr, a longer optim.warmup_steps or optim.grad_clip")


def _evaluate(accelerator, model, config: Config, step: int, final: bool = False) -> Optional[Dict[str, Any]]:
    """Retrieval on the held-out split and the held-out search log, on the main process (others
    wait)."""
    from align.eval.runner import evaluate_model

    split = config.eval.split or config.data.val
    held_out_log = config.data.search_log.val
    results = None
    if (split or held_out_log) and accelerator.is_main_process:
        was_training = model.training
        results = evaluate_model(model, config, split, accelerator.device) if split else {}
        if held_out_log:
            results.update(_validate_on_log(model, config, accelerator.device))
        model.train(was_training)
        name = config.eval.output or os.path.join(config.train.output_dir, "eval.json")
        write_json_atomic(results, name if final else os.path.join(config.train.output_dir, f"eval-step-{step:08d}.json"))
        accelerator.log({f"eval/{pair}/{k}": v for pair, m in results.items() for k, v in m.items()}, step=step)
    wait_for_main_process(accelerator)
    return results


_LONG_WAITS: Dict[Any, Any] = {}  # the launch's process group -> its gloo group for long waits


def wait_for_main_process(accelerator) -> None:
    """The other processes wait for the main one's evaluation however long it takes: on a gloo
    group with ``BARRIER_TIMEOUT``. On NCCL, Accelerate's barrier is a collective that the
    watchdog ends after 10 minutes, which an evaluation over a large catalogue or search log can
    outlast: the launch died, that step's checkpoint unsaved. Every process calls this at the same
    points, so the group (made by all of them) is made the first time."""
    if accelerator.num_processes == 1:
        return
    import torch.distributed as dist

    from align.encoding import BARRIER_TIMEOUT

    world = dist.group.WORLD
    if world not in _LONG_WAITS:
        _LONG_WAITS[world] = dist.new_group(backend="gloo", timeout=BARRIER_TIMEOUT)
    dist.barrier(group=_LONG_WAITS[world])


def _validate_on_log(model, config: Config, device) -> Dict[str, Any]:
    from align.searchlog.evaluate import validate_on_log

    model.eval()
    with torch.no_grad():
        results = validate_on_log(model, config, device)
    shown = [f"{entry} nDCG@10 {figures['ndcg@10']:.4f} ({figures['n_queries']} queries)"
             for entry, figures in results.items()]
    print("search-log validation: " + ", ".join(shown), flush=True)
    return results


def _progress(accelerator, config: Config, total: int, initial: int):
    if not (config.train.progress and accelerator.is_main_process):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)
