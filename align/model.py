"""``AlignModel``: one tower per modality, all projecting into one shared space, plus the
learnable temperature of the contrastive losses; ``prefix``: a Matryoshka width of that space.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from align.config import ModelConfig, TowerConfig
from align.errors import ConfigError
from align.registry import TOWERS
from align.towers.base import Tower, checkpoint_blocks, freeze_tower


class AlignModel(nn.Module):
    """Towers keyed by modality (``"text"``, ``"image"``, ``"audio"``) and a shared temperature.

    ``encode(modality, inputs)`` returns L2-normalised (B, D) embeddings; ``logit_scale()`` is
    exp(learned log-scale) clamped at ``max_logit_scale`` (CLIP: 100), as every loss expects.
    """

    def __init__(self, towers: Mapping[str, Tower], init_temperature: float = 0.07,
                 max_logit_scale: float = 100.0, learn_temperature: bool = True,
                 embed_dim: Optional[int] = None) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        for modality, tower in towers.items():
            if tower.modality != modality:
                raise ValueError(f"a {tower.modality} tower ({type(tower).__name__}) was given for {modality!r}")
        self.towers = nn.ModuleDict(dict(towers))
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)),
                                            requires_grad=learn_temperature)
        self.max_logit_scale = max_logit_scale

    @property
    def modalities(self) -> list:
        return list(self.towers.keys())

    def encode(self, modality: str, inputs: Any) -> torch.Tensor:
        if modality not in self.towers:
            raise KeyError(f"this model has no {modality!r} tower; it has {self.modalities}")
        return self.towers[modality](inputs)  # (B, D)

    def reusable(self, modality: str, inputs: Any) -> Any:
        """``inputs`` of ``modality`` ready to be encoded again and again (``Tower.reusable``)."""
        return self.towers[modality].reusable(inputs) if modality in self.towers else inputs

    def forward(self, inputs: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
        """Encode every modality present in ``inputs`` -> {modality: (n_m, D)}."""
        return {m: self.encode(m, x) for m, x in inputs.items() if m in self.towers}

    def logit_scale(self) -> torch.Tensor:
        # Clamp in log space so the gradient still reaches the parameter below the cap.
        return self.log_logit_scale.clamp(max=math.log(self.max_logit_scale)).exp()

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the parameter itself to [0, log(max_logit_scale)] (``logit_scale_clamp:
        parameter``; open_clip's trainer does this after every optimiser step)."""
        self.log_logit_scale.clamp_(0.0, math.log(self.max_logit_scale))

    def preprocessors(self, train: bool) -> Dict[str, Callable]:
        return {m: tower.preprocessor(train) for m, tower in self.towers.items()}


def build_tower(modality: str, config: TowerConfig, embed_dim: int) -> Tower:
    tower_cls = TOWERS.get(config.type)
    if tower_cls.modality != modality:
        raise ValueError(f"model.towers.{modality}: {config.type!r} is a {tower_cls.modality} tower")
    tower = tower_cls(config.params, embed_dim)
    freeze_tower(tower, config.freeze, config.unfreeze_last)
    if config.grad_checkpointing:
        checkpoint_blocks(tower)
    return tower


def build_model(config: ModelConfig) -> AlignModel:
    """Assemble the towers named in ``model.towers`` (see align/config.py)."""
    from align.towers.open_clip import load_clip_halves

    try:
        towers = {m: build_tower(m, tc, config.embed_dim) for m, tc in config.towers.items()}
    finally:
        load_clip_halves.cache_clear()  # the cache only lets image and text share one CLIP
    return AlignModel(towers, config.init_temperature, config.max_logit_scale, config.learn_temperature,
                      embed_dim=config.embed_dim)


def prefix(x: torch.Tensor, dim: Optional[int]) -> torch.Tensor:
    """The first ``dim`` coordinates of (..., D) unit vectors, renormalised (zero rows stay zero);
    ``dim`` None or D: ``x`` itself. What a Matryoshka-trained space keeps at width ``dim``."""
    if dim is None or dim == x.shape[-1]:
        return x
    if dim > x.shape[-1]:
        raise ValueError(f"loss.matryoshka.dims: {dim} is wider than the embeddings ({x.shape[-1]})")
    return F.normalize(x[..., :dim], dim=-1)


def check_prefix_dim(dim: int, full_dim: int, flag: str = "--dim") -> int:
    """``dim`` when 1 <= dim <= full_dim; else a ``ConfigError`` naming ``flag``."""
    if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= full_dim:
        raise ConfigError(f"{flag} {dim}: must be a whole number from 1 to the embedding width {full_dim} "
                          f"(Matryoshka truncation keeps the first {flag.lstrip('-')} coordinates)")
    return dim
