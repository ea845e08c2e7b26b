"""Load a trained model from a checkpoint (its ``model/`` folder) or an export folder
(``model.safetensors`` + ``config.yaml``).

Only tensors are read (safetensors), so an untrusted checkpoint cannot run code. Towers are
rebuilt from the saved config with their pretrained weights switched off (ours overwrite them).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch

from align.config import load_config
from align.model import AlignModel, build_model


def load_model(folder: str, device: Optional[torch.device] = None) -> AlignModel:
    from safetensors.torch import load_file

    if os.path.isfile(os.path.join(folder, "model", "model.safetensors")):  # a training checkpoint
        folder = os.path.join(folder, "model")
    weights = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{folder}: no model.safetensors (is this an align checkpoint?)")
    config = load_config(os.path.join(folder, "config.yaml"))
    for tower in config.model.towers.values():
        if hasattr(tower.params, "pretrained"):
            tower.params = dataclasses.replace(tower.params, pretrained="")
    model = build_model(config.model)
    state = load_file(weights)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{weights} does not match its config.yaml: {error}") from error
    model.eval()
    return model.to(device) if device is not None else model
