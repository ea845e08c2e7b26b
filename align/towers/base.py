"""What every tower is: ``encode(inputs) -> (B, D)`` L2-normalised embeddings in the shared space.

A tower wraps a trunk (open_clip, transformers or ours) and a projection head to the shared
dimension. It also hands out the picklable preprocessor that dataloader workers apply to raw
values (align/data/transforms.py), and names its trunk blocks so freezing can keep the last N
trainable (LiT: https://arxiv.org/abs/2111.07991).

A registered tower is a class with a nested ``Config`` dataclass and the constructor
``Tower(config, embed_dim)``; ``model.towers.<modality>`` in YAML sets that dataclass.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Literal, Union

import torch
import torch.nn.functional as F
from torch import nn


def used_length(keep: torch.Tensor) -> int:
    """Columns of a (B, L) token batch up to and including the last one any row uses (``keep``
    marks real tokens); at least 1. Padding beyond it can be cut when the encoder's output does
    not depend on it (causal or padding-masked attention, pooling at a real token).

    Catalogue texts are short (a title: 10-20 tokens) while towers pad to their context (CLIP:
    77), so cutting saves most of the text tower's work. Reading the length syncs with the
    device once per text batch.
    """
    columns = keep.any(dim=0).nonzero()
    return int(columns.max()) + 1 if columns.numel() else 1


class TokenCache:
    """Bounded memo ``text -> tokens`` for the picklable text preprocessors (one per worker).

    Catalogue texts repeat: the variants of one product share a title, and mined negatives are
    other items' texts, tokenised again for every sample that lists them. Tokenising is the
    dearest text step in a worker (open_clip's cleans and BPE-encodes in Python). It holds at
    most ``size`` texts of ``max_chars`` characters in all (the keys are what can grow: a served
    query may be long, while its tokens are cut to the context); the oldest entries go first
    when either is full, and a text longer than ``max_chars`` is tokenised but not kept. Callers
    get a copy, so mutating it leaves the cache intact.
    """

    def __init__(self, tokenize: Callable[[str], Any], size: int = 8192, max_chars: int = 1 << 24) -> None:
        self.tokenize, self.size, self.max_chars = tokenize, size, max_chars
        self._store: Dict[str, Any] = {}
        self._chars = 0  # total length of the keys held

    def __call__(self, text: str) -> Any:
        tokens = self._store.get(text)
        if tokens is None:
            tokens = self.tokenize(text)
            if len(text) <= self.max_chars:
                self._keep(text, tokens)
        if isinstance(tokens, dict):
            return {k: v.clone() for k, v in tokens.items()}
        return tokens.clone()

    def _keep(self, text: str, tokens: Any) -> None:
        self._store[text] = tokens
        self._chars += len(text)
        while len(self._store) > self.size or self._chars > self.max_chars:  # oldest first (dicts keep order)
            oldest = next(iter(self._store))
            del self._store[oldest]
            self._chars -= len(oldest)


class Tower(nn.Module):
    """Base class for modality towers. Subclasses set ``modality`` and implement the hooks."""

    modality: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.projection: nn.Module = nn.Identity()

    def features(self, inputs: Any) -> torch.Tensor:
        """Trunk output before projection, (B, trunk_dim)."""
        raise NotImplementedError

    def forward(self, inputs: Any) -> torch.Tensor:
        return F.normalize(self.projection(self.features(inputs)), dim=-1)  # (B, D)

    @classmethod
    def check_sources(cls, config: Any, key: str) -> None:
        """Raise ``ConfigError`` naming ``key`` when ``config`` names weights, files or models that
        cannot be found. Runs before a run builds anything (align/preflight.py); cheap: no model
        is created. Towers that read nothing from disk keep this default."""

    def save_sources(self, folder: str) -> Any:
        """Write what rebuilding this tower reads besides its weights (model configs, tokenizer
        files, vocabularies) under ``folder`` (a checkpoint's ``model/``) and return the tower's
        config pointing at them, with paths relative to ``folder``. Towers built from their
        config alone keep this default."""
        return self.config

    @classmethod
    def saved_config(cls, config: Any, folder: str) -> Any:
        """The config to rebuild this tower from a model folder written by ``save_sources``:
        paths relative to ``folder`` resolved, pretrained weights off (the folder's
        model.safetensors overwrites them), so nothing outside ``folder`` is read."""
        return config

    def preprocessor(self, train: bool) -> Callable[[Any], Any]:
        """A picklable callable: raw value (str, PIL image, (wave, sr)) -> model input tensor(s)."""
        raise NotImplementedError

    def reusable(self, inputs: Any) -> Any:
        """``inputs`` made ready to be embedded more than once without redoing work that does not
        depend on the weights: a cached step (align/train/cached_step.py) embeds each
        micro-batch twice. The image tower decodes ``data.image_decode: device`` JPEGs here, once.
        Towers with nothing to do keep this default: the inputs as they are."""
        return inputs

    def trunk_blocks(self) -> List[nn.Module]:
        """The trunk's repeated blocks, input side first; freezing keeps the last N trainable."""
        return []

    def trunk_tail(self) -> List[Union[nn.Module, nn.Parameter]]:
        """Modules or parameters after the last block (final norm, pooling, trunk projection)
        that unfreeze together with the last blocks."""
        return []


# The projection into the shared space a tower's config chooses (see ``projection_head``).
Projection = Literal["auto", "none", "linear", "mlp"]


def projection_head(in_dim: int, out_dim: int, kind: Projection = "auto") -> nn.Module:
    """Projection into the shared space.

    ``auto`` keeps a pretrained alignment intact: identity when the trunk already emits the
    shared dimension, a bias-free linear map otherwise. ``mlp`` is the two-layer head of SimCLR.
    """
    if kind == "auto":
        kind = "none" if in_dim == out_dim else "linear"
    if kind == "none":
        if in_dim != out_dim:
            raise ValueError(f"projection 'none' needs trunk dim {in_dim} == embed_dim {out_dim}")
        return nn.Identity()
    if kind == "linear":
        return nn.Linear(in_dim, out_dim, bias=False)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim, bias=False))
    raise ValueError(f"unknown projection {kind!r}; choose auto, none, linear or mlp")


def freeze_tower(tower: Tower, freeze: bool, unfreeze_last: int = 0) -> None:
    """Lock the trunk (LiT), optionally leaving its last ``unfreeze_last`` blocks trainable.

    The projection head always stays trainable: it is what maps a locked trunk into the space.
    """
    if not freeze:
        return
    for module in tower.modules():
        if module is not tower.projection:
            for parameter in module.parameters(recurse=False):
                parameter.requires_grad_(False)
    blocks = tower.trunk_blocks()
    if unfreeze_last > len(blocks):
        raise ValueError(f"unfreeze_last={unfreeze_last} but the {tower.modality} tower has {len(blocks)} blocks")
    trainable = (blocks[len(blocks) - unfreeze_last:] + tower.trunk_tail()) if unfreeze_last > 0 else []
    for item in trainable + [tower.projection]:
        for parameter in [item] if isinstance(item, nn.Parameter) else item.parameters():
            parameter.requires_grad_(True)


def _recomputed(forward: Callable, *args: Any, **kwargs: Any) -> Any:
    """``forward`` whose activations are dropped after the forward and recomputed in the backward
    (when training with gradients; plain otherwise). The RNG state is replayed, so dropout in the
    recomputation draws what it drew the first time: the gradients are those of the plain block."""
    if torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def checkpoint_blocks(tower: Tower) -> int:
    """Gradient checkpointing of every trunk block of ``tower`` (``towers.<m>.grad_checkpointing``):
    activation memory falls from one set per block to one per tower plus one block's, for about a
    third more compute (each block's forward runs twice). The blocks stay where they are, so
    parameter names and checkpoints do not change. Returns the number of blocks."""
    import functools

    blocks = tower.trunk_blocks()
    for block in blocks:
        block.forward = functools.partial(_recomputed, block.forward)
    return len(blocks)
