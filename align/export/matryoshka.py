"""``align export --dim D``: towers that output the renormalised first ``D`` coordinates of the
model's embeddings (Matryoshka truncation, Kusupati et al. 2022, https://arxiv.org/abs/2205.13147).

Every tower ends in ``normalize(projection(features))`` (align/towers/base.py). Keeping the first
``D`` rows of the projection's last linear map and then normalising gives the same vector as
normalising, keeping ``D`` coordinates and renormalising (normalisation is one scale per row), so
the truncation needs no new op: open_clip's projection fold, sentence-transformers' Dense modules
and the ONNX graphs all carry it as they are. An identity projection becomes the (D, width)
identity prefix. The export is checked against the full model's embeddings cut the same way
(``align.objective.prefix``), not against this copy.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from align.errors import RunError
from align.model import AlignModel


def _kept_rows(linear: nn.Linear, dim: int) -> nn.Linear:
    """``linear`` with only its first ``dim`` outputs."""
    out = nn.Linear(linear.in_features, dim, bias=linear.bias is not None)
    with torch.no_grad():
        out.weight.copy_(linear.weight[:dim])
        if linear.bias is not None:
            out.bias.copy_(linear.bias[:dim])
    return out.to(linear.weight.dtype)


def truncated_projection(projection: nn.Module, width: int, dim: int, where: str) -> nn.Module:
    """``projection`` (identity, linear, or a Sequential ending in a linear map) cut to ``dim`` outputs.
    ``width``: its output size (an identity's input size)."""
    if isinstance(projection, nn.Identity):
        prefix = nn.Linear(width, dim, bias=False)
        with torch.no_grad():
            prefix.weight.copy_(torch.eye(dim, width))
        return prefix
    if isinstance(projection, nn.Linear):
        return _kept_rows(projection, dim)
    if isinstance(projection, nn.Sequential) and len(projection) and isinstance(projection[-1], nn.Linear):
        layers = list(projection)
        return nn.Sequential(*layers[:-1], _kept_rows(layers[-1], dim))
    raise RunError(f"{where} is a {type(projection).__name__}; --dim cuts identity, linear and mlp projections only")


def truncated_model(model: AlignModel, dim: int, width: int) -> AlignModel:
    """A copy of ``model`` (eval mode) whose towers output the renormalised ``dim``-prefix of their
    ``width``-wide embeddings; ``model`` is left as it is."""
    copied = copy.deepcopy(model).eval()
    for modality, tower in copied.towers.items():
        tower.projection = truncated_projection(tower.projection, width, dim, f"model.towers.{modality}.projection")
    copied.embed_dim = dim
    return copied
