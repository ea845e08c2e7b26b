"""AdamW parameter groups and the warmup + cosine schedule."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

import torch
from torch import nn

from align.config import OptimConfig, TrainConfig
from align.schedule import warmup_cosine


# What is not decayed is decided by what a parameter is, not by its name (a name is whatever a
# tower's author chose: our audio tower's positional embedding is ``position``). Decaying these
# shrinks what only sets a scale, an offset or a lookup row (CLIP, timm):
# * every parameter with ndim < 2: biases, norm scales, the temperature, SigLIP's bias;
# * the parameters of normalisation modules and of nn.Embedding (token tables);
# * what a module declares in ``no_weight_decay()`` (names relative to it, as timm's models do):
#   the raw nn.Parameter positional / class embeddings of our towers and of timm trunks.
# open_clip's own trainer excludes only ndim < 2, norms, biases and logit_scale, so it DOES decay
# positional, token and class embeddings; ``optim.decay_embeddings=true`` follows it.
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.LocalResponseNorm,
         *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))


def embedding_names(objective: nn.Module) -> Set[str]:
    """Full names of the embedding tables: nn.Embedding weights and what modules declare."""
    names: Set[str] = set()
    for prefix, module in objective.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            names.update(dot + name for name, _ in module.named_parameters(recurse=False))
        declared = getattr(module, "no_weight_decay", None)
        if callable(declared):
            names.update(dot + name for name in declared())
    return names


def no_decay_names(objective: nn.Module, decay_embeddings: bool = False) -> Set[str]:
    """Full names of the parameters of ``objective`` that get no weight decay (rules above)."""
    names = set() if decay_embeddings else embedding_names(objective)
    for prefix, module in objective.named_modules():
        if isinstance(module, NORMS):
            dot = f"{prefix}." if prefix else ""
            names.update(dot + name for name, _ in module.named_parameters(recurse=False))
    names.update(name for name, parameter in objective.named_parameters() if parameter.ndim < 2)
    return names


def param_groups(objective: nn.Module, config: OptimConfig, tower_lr_scale: Dict[str, float],
                 own_lr: Optional[Dict[str, float]] = None) -> List[dict]:
    """Groups by what a parameter is: its tower (or "other"; a parameter given its own learning
    rate by full name in ``own_lr`` is a group of its own) x decay or not, each with its lr scale
    (the tower's ``lr_scale``, or ``own_lr[name] / config.lr``); frozen parameters are left out.

    The groups follow the model's structure, never the values: two towers at one scale stay two
    groups, so a resume with another ``lr_scale`` meets the groups its checkpoint saved and trains
    with the new scale (keyed by value, a changed scale merged or split groups and the resume was
    refused). Only freezing or thawing a tower changes them."""
    groups: Dict[tuple, dict] = {}
    for name, parameter, owner, decay, scale in _trained_parameters(objective, config, tower_lr_scale, own_lr):
        group = groups.setdefault((owner, decay), {"params": [], "names": [],
                                                   "weight_decay": config.weight_decay if decay else 0.0,
                                                   "lr": config.lr * scale, "lr_scale": scale})
        group["params"].append(parameter)
        group["names"].append(name)
    return list(groups.values())


def groups_by_value(objective: nn.Module, config: OptimConfig, tower_lr_scale: Dict[str, float],
                    own_lr: Optional[Dict[str, float]] = None) -> List[List[str]]:
    """The parameter names of each group as ``param_groups`` made them before groups followed the
    structure: by (decay, lr scale) values. Only to read the optimiser state of checkpoints from
    then, which did not record the names (align/train/checkpoint.py)."""
    groups: Dict[tuple, List[str]] = {}
    for name, _, _, decay, scale in _trained_parameters(objective, config, tower_lr_scale, own_lr):
        groups.setdefault((decay, scale), []).append(name)
    return list(groups.values())


def _trained_parameters(objective: nn.Module, config: OptimConfig, tower_lr_scale: Dict[str, float],
                        own_lr: Optional[Dict[str, float]]) -> Iterator[Tuple[str, nn.Parameter, str, bool, float]]:
    """(name, parameter, owner, decay, lr scale) of every parameter that trains, in ``named_parameters`` order."""
    no_decay = no_decay_names(objective, config.decay_embeddings)
    own_lr = own_lr or {}
    for name, parameter in objective.named_parameters():
        if not parameter.requires_grad:
            continue
        owner, scale = "other", 1.0
        for modality, tower_scale in tower_lr_scale.items():
            if f"towers.{modality}." in name:
                owner, scale = modality, tower_scale
        if name in own_lr:
            owner, scale = name, own_lr[name] / config.lr
        yield name, parameter, owner, name not in no_decay, scale


def build_optimizer(objective: nn.Module, config: OptimConfig, tower_lr_scale: Dict[str, float],
                    own_lr: Optional[Dict[str, float]] = None) -> torch.optim.AdamW:
    """AdamW over ``param_groups``; build it after the model is on its training device, so that
    ``implementation="auto"`` picks the fused kernel only where that device has one. Each group
    keeps its parameters' names (torch's ``param_names``): checkpoints record them, and a resume
    matches the saved state to the parameters by name."""
    groups = param_groups(objective, config, tower_lr_scale, own_lr)
    if not groups:
        raise ValueError("nothing to train: every parameter is frozen")
    for group in groups:
        group["param_names"] = group.pop("names")
    kwargs = dict(lr=config.lr, betas=config.betas, eps=config.eps)
    if config.implementation == "auto":
        try:  # build on the training device: fused kernels exist for CPU and CUDA, not everywhere
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError):
            return torch.optim.AdamW(groups, foreach=True, **kwargs)
    flags = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}
    return torch.optim.AdamW(groups, **flags[config.implementation], **kwargs)


@dataclass(frozen=True)
class SchedulePlan:
    """Where the learning-rate schedule runs in this launch, in optimiser steps of this launch's
    global batch (``plan_schedule``)."""

    total: int  # the schedule's length: train.max_steps, or epochs x steps per epoch
    start: int  # its place when this launch begins (0 for a new run)
    warmup: float  # optim.warmup_steps, in this launch's steps

    @property
    def remaining(self) -> int:
        """The optimiser steps this launch takes to the end of the run."""
        return max(0, self.total - self.start)


def plan_schedule(optim: OptimConfig, train: TrainConfig, batches_per_epoch: int, global_batch: int,
                  saved: Optional[Any] = None, position: int = 0) -> SchedulePlan:
    """The schedule as this launch sees it: ``batches_per_epoch`` loader batches an epoch (steps of
    ``train.accum_steps`` of them, ``global_batch`` samples each); ``saved`` the resumed
    checkpoint's ``align.train.checkpoint.TrainState`` (not imported: checkpoint.py imports this
    module), ``position`` the loader batches of ``saved.epoch`` already read, counted at this
    launch's batch size (``align.train.resume.resume_position``).

    ``train.max_steps`` counts optimiser steps whatever their size: the run ends after that many,
    and the schedule's place is the checkpoint's step. Otherwise the run is its epochs, and a
    resume that changed the global batch (``data.batch_size`` or the number of processes) takes
    other steps than the ones counted so far: counting steps would end the run early or late, and
    the schedule's place would jump. So the schedule is measured in samples, written as steps of
    this launch's size: its place is the part of the run already read (the epochs done and the rows
    of this one), its length the run's epochs at this size, and its warm-up ``optim.warmup_steps``
    steps of the run's first launch (``first_global_batch``). The learning rate goes on from where
    it was (within what one step moves it), every configured epoch is trained once, and a resume at
    the same size finds its place at ``saved.step``, as before.
    """
    steps_per_epoch = batches_per_epoch // train.accum_steps
    if train.max_steps or saved is None:
        return SchedulePlan(train.max_steps or train.epochs * steps_per_epoch, saved.step if saved else 0,
                            optim.warmup_steps)
    total = train.epochs * steps_per_epoch
    rest_of_epoch = max(0, batches_per_epoch - position) // train.accum_steps  # the steps this epoch still takes
    start = min(total, (saved.epoch + 1) * steps_per_epoch - rest_of_epoch)
    first = first_global_batch(saved) or global_batch
    return SchedulePlan(total, start, optim.warmup_steps * first / global_batch)


def first_global_batch(state: Any) -> int:
    """The global batch of the run's first launch (0 for a checkpoint from before it was recorded)."""
    return int(state.segments[0].get("global_batch", 0)) if state.segments else 0


def lr_factor(step: int, total_steps: int, config: OptimConfig, warmup_steps: Optional[float] = None) -> float:
    """Linear warmup to 1, then cosine (or constant) decay to ``min_lr_ratio``; ``warmup_steps``
    in place of ``config.warmup_steps`` (``SchedulePlan.warmup``)."""
    warmup = config.warmup_steps if warmup_steps is None else warmup_steps
    return warmup_cosine(step, total_steps, warmup, config.min_lr_ratio, config.schedule == "cosine")


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, config: OptimConfig,
                    warmup_steps: Optional[float] = None):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, config, warmup_steps))
