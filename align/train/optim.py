"""AdamW parameter groups and the warmup + cosine schedule."""
from __future__ import annotations

from typing import Dict, List, Optional, Set

import torch
from torch import nn

from align.config import OptimConfig
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
    """Groups by (decay or not) x (lr scale: the tower's, or ``own_lr[name] / config.lr`` for a
    parameter given its own learning rate by full name); frozen parameters are left out."""
    groups: Dict[tuple, dict] = {}
    no_decay = no_decay_names(objective, config.decay_embeddings)
    own_lr = own_lr or {}
    for name, parameter in objective.named_parameters():
        if not parameter.requires_grad:
            continue
        scale = 1.0
        for modality, tower_scale in tower_lr_scale.items():
            if f"towers.{modality}." in name:
                scale = tower_scale
        if name in own_lr:
            scale = own_lr[name] / config.lr
        decay = name not in no_decay
        key = (decay, scale)
        group = groups.setdefault(key, {"params": [], "names": [], "weight_decay": config.weight_decay if decay else 0.0,
                                        "lr": config.lr * scale, "lr_scale": scale})
        group["params"].append(parameter)
        group["names"].append(name)
    return list(groups.values())


def build_optimizer(objective: nn.Module, config: OptimConfig, tower_lr_scale: Dict[str, float],
                    own_lr: Optional[Dict[str, float]] = None) -> torch.optim.AdamW:
    """AdamW over ``param_groups``; build it after the model is on its training device, so that
    ``implementation="auto"`` picks the fused kernel only where that device has one."""
    groups = param_groups(objective, config, tower_lr_scale, own_lr)
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
    return warmup_cosine(step, total_steps, config.warmup_steps, config.min_lr_ratio, config.schedule == "cosine")


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, config: OptimConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, config))
