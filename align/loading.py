"""Load a trained model from a checkpoint or its ``model/`` folder (``model.safetensors`` +
``config.yaml`` + the towers' sources, written by ``align/train/checkpoint.py``'s ``save_model``).

Nothing read here can run code: weights are safetensors, the config is YAML read with
``safe_load``, tower sources are JSON and text (transformers configs and tokenizers, open_clip
model JSON). Each tower is rebuilt from the folder alone (``Tower.saved_config``): relative paths
point inside it and no pretrained weights are read; ours overwrite them. A file that is not what
it should be is a ``RunError`` (or ``ConfigError`` for the YAML) naming it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Optional, Tuple

import torch

from align.config import Config, ModelConfig, load_config
from align.errors import RunError, atomic_open
from align.model import AlignModel, build_model


def read_tensors(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(tensors on CPU, metadata) of a safetensors file; anything else is a ``RunError`` naming it."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})
    except Exception as error:  # safetensors raises its own SafetensorError for a bad header
        raise RunError(f"{path}: not a readable safetensors file ({error}); it is refused, not unpickled") from None


def write_tensors(tensors: Dict[str, torch.Tensor], path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    """Tensors to a safetensors file, atomically (a crash leaves the old file or none, never half)."""
    from safetensors.torch import save_file

    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_open(path, "wb") as handle:  # save_file streams into the temporary file by name
        save_file(_dedupe_shared(cpu), handle.name, metadata=metadata)


def _dedupe_shared(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied weights); clone so each stands alone.
    seen: Dict[int, str] = {}
    out = {}
    for name, tensor in tensors.items():
        key = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if key in seen else tensor
        seen.setdefault(key, name)
    return out


def read_json(path: str) -> Any:
    """A JSON file's value; anything else is a ``RunError`` naming it."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as error:  # ValueError: JSONDecodeError and UnicodeDecodeError
        raise RunError(f"{path}: not a readable JSON file ({error}); it is refused, not unpickled") from None


def model_folder(folder: str) -> str:
    """A checkpoint's ``model/`` folder, or ``folder`` itself when it holds the model; a run's
    output folder stands for its newest complete checkpoint (``checkpoints/step-N/``)."""
    inner = os.path.join(folder, "model")
    if os.path.isfile(os.path.join(inner, "model.safetensors")):
        return inner
    steps = os.path.join(folder, "checkpoints")
    if not os.path.isfile(os.path.join(folder, "model.safetensors")) and os.path.isdir(steps):
        done = sorted(name for name in os.listdir(steps)  # step-XXXXXXXX sorts by step; .tmp ones are partial
                      if name.startswith("step-") and not name.endswith(".tmp")
                      and os.path.isfile(os.path.join(steps, name, "model", "model.safetensors")))
        if done:
            return os.path.join(steps, done[-1], "model")
    return folder


def read_saved_config(folder: str, overrides: Optional[List[str]] = None) -> Config:
    """The ``config.yaml`` saved in ``folder``; bytes that are not text (a planted pickle) are a
    ``RunError`` naming it, invalid YAML a ``ConfigError`` naming it."""
    path = os.path.join(folder, "config.yaml")
    try:
        return load_config(path, overrides)
    except UnicodeDecodeError as error:
        raise RunError(f"{path}: not a readable YAML file ({error}); it is refused") from None


def rebuild_config(config: ModelConfig, folder: str) -> ModelConfig:
    """``config`` with every tower pointed at its sources inside ``folder``, pretrained weights off."""
    from align.registry import TOWERS

    towers = {modality: dataclasses.replace(tower, params=TOWERS.get(tower.type).saved_config(tower.params, folder))
              for modality, tower in config.towers.items()}
    return dataclasses.replace(config, towers=towers)


def load_model(folder: str, device: Optional[torch.device] = None) -> AlignModel:
    """The model saved in ``folder`` (a checkpoint or its ``model/``), in eval mode; reads only
    files inside that folder."""
    folder = model_folder(folder)
    weights = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(weights):
        raise RunError(f"{folder}: no model.safetensors (give a checkpoint folder or its model/ folder)")
    config = read_saved_config(folder)
    model = build_model(rebuild_config(config.model, os.path.abspath(folder)))
    state, _ = read_tensors(weights)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise RunError(f"{weights} does not match its config.yaml: {error}") from None
    model.eval()
    return model.to(device) if device is not None else model
