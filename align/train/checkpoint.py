"""Checkpoints: Accelerate state (model, optimiser, scheduler, RNG) + model weights + config.

Each checkpoint is written to ``step-XXXXXXXX.tmp`` and renamed when whole, so a crash mid-save
never leaves a checkpoint that looks complete. Its ``model/`` folder (``model.safetensors`` +
``config.yaml``) loads with ``align.load_model`` alone (safetensors holds tensors only: loading it runs no code).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Dict, Optional

import torch

from align.config import Config, save_config

STEP_DIR = re.compile(r"^step-(\d+)$")
MODEL_SUBDIR = "model"  # Accelerate's own model.safetensors (the whole objective) sits beside it


def checkpoint_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, "checkpoints", f"step-{step:08d}")


def list_checkpoints(output_dir: str) -> list:
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, name)) for name in os.listdir(root) if (m := STEP_DIR.match(name))]
    return [path for _, path in sorted(found)]


def resolve_resume(output_dir: str, resume: str) -> Optional[str]:
    """"" -> None; "latest" -> newest complete checkpoint or None; a path must exist."""
    if not resume:
        return None
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    if not os.path.isfile(os.path.join(resume, "trainer_state.json")):
        raise FileNotFoundError(f"train.resume={resume}: not a complete checkpoint (no trainer_state.json)")
    return resume


def save_checkpoint(accelerator, objective, config: Config, output_dir: str, state: Dict[str, Any],
                    keep: int) -> str:
    """Write the checkpoint for ``state["step"]`` atomically; prune to ``keep`` newest."""
    final = checkpoint_dir(output_dir, state["step"])
    tmp = final + ".tmp"
    if accelerator.is_main_process and os.path.exists(tmp):
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)  # every rank writes its RNG state; main writes the rest
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(objective).model
        save_model(model, config, os.path.join(tmp, MODEL_SUBDIR))
        save_config(config, os.path.join(tmp, "config.yaml"))
        with open(os.path.join(tmp, "trainer_state.json"), "w", encoding="utf-8") as handle:
            json.dump(state, handle, indent=2)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_trainer_state(path: str) -> Dict[str, Any]:
    with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as handle:
        return json.load(handle)


def save_model(model: torch.nn.Module, config: Config, folder: str) -> None:
    """Model weights (safetensors) + the resolved config, enough to rebuild the model."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = os.path.join(folder, "model.safetensors.tmp")
    save_file(_dedupe_shared(tensors), tmp, metadata={"format": "align"})
    os.replace(tmp, os.path.join(folder, "model.safetensors"))
    save_config(config, os.path.join(folder, "config.yaml"))


def _dedupe_shared(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied weights); clone so each stands alone.
    seen: Dict[int, str] = {}
    out = {}
    for name, tensor in tensors.items():
        key = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if key in seen else tensor
        seen.setdefault(key, name)
    return out
