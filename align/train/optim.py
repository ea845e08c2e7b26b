"""AdamW parameter groups and the warmup + cosine schedule."""
from __future__ import annotations

import math
from typing import Dict, List

import torch
from torch import nn

from align.config import OptimConfig

# Norm scales, biases, the temperature and embeddings are not decayed (CLIP, open_clip):
# decaying them shrinks what only sets a scale or an offset.
NO_DECAY_MARKERS = ("bias", "norm", "ln_", ".ln", "bn", "logit", "positional_embedding", "token_embedding",
                    "class_embedding", "cls_token", "pos_embed")


def is_no_decay(name: str, parameter: torch.Tensor) -> bool:
    return parameter.ndim < 2 or any(marker in name.lower() for marker in NO_DECAY_MARKERS)


def param_groups(objective: nn.Module, config: OptimConfig, tower_lr_scale: Dict[str, float]) -> List[dict]:
    """Groups by (decay or not) x (tower lr scale); frozen parameters are left out."""
    groups: Dict[tuple, dict] = {}
    for name, parameter in objective.named_parameters():
        if not parameter.requires_grad:
            continue
        scale = 1.0
        for modality, tower_scale in tower_lr_scale.items():
            if f"towers.{modality}." in name:
                scale = tower_scale
        decay = not is_no_decay(name, parameter)
        key = (decay, scale)
        group = groups.setdefault(key, {"params": [], "names": [], "weight_decay": config.weight_decay if decay else 0.0,
                                        "lr": config.lr * scale, "lr_scale": scale})
        group["params"].append(parameter)
        group["names"].append(name)
    return list(groups.values())


def build_optimizer(objective: nn.Module, config: OptimConfig, tower_lr_scale: Dict[str, float]) -> torch.optim.AdamW:
    """AdamW over ``param_groups``; build it after the model is on its training device, so that
    ``implementation="auto"`` picks the fused kernel only where that device has one."""
    groups = param_groups(objective, config, tower_lr_scale)
    if not groups:
        raise ValueError("nothing to train: every parameter is frozen")
    for group in groups:
        group.pop("names")
    kwargs = dict(lr=config.lr, betas=config.betas, eps=config.eps)
    if config.implementation == "auto":
        try:  # build on the training device: fused kernels exist for CPU and CUDA, not everywhere
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError):
            return torch.optim.AdamW(groups, foreach=True, **kwargs)
    flags = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}
    return torch.optim.AdamW(groups, **flags[config.implementation], **kwargs)


def lr_factor(step: int, total_steps: int, config: OptimConfig) -> float:
    """Linear warmup to 1, then cosine (or constant) decay to ``min_lr_ratio``."""
    if config.warmup_steps > 0 and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, config: OptimConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, config))
