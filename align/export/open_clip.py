"""open_clip export: an ``open_clip_image`` + ``open_clip_text`` pair as a folder that open_clip
loads by itself, ``open_clip.create_model_and_transforms("local-dir:<out>/open_clip")``::

    open_clip_config.json        {"model_cfg": the CLIP's model config, embed_dim = ours,
                                  "preprocess_cfg": size, mean, std, interpolation, resize_mode}
    open_clip_model.safetensors  the CLIP's state dict (visual.*, token_embedding, transformer, ...)

(open_clip 3.3's ``local-dir:`` reads exactly these: ``model_cfg`` and ``preprocess_cfg`` from the
JSON, the weights from the folder's ``open_clip_model.safetensors``, read with safetensors; the
text tokenizer follows from ``text_cfg``: CLIP's BPE ``SimpleTokenizer`` at its context length.)

Our towers put a projection to ``model.embed_dim`` after each CLIP half. A bias-free linear one is
folded into the CLIP's own final projection, ``proj' = proj @ W^T`` (the visual ``proj`` and the
``text_projection``; a text projection with a bias, an ``nn.Linear``, becomes ``W A`` and
``W b``), computed in float64 and rounded once to float32, so open_clip's model gives our
embeddings. An identity projection needs nothing. Anything else (an MLP head, a trunk without a
final projection matrix to fold into, timm or Hugging Face trunks whose configs open_clip would
fetch from a hub) is refused with the reason, rather than exporting something different.
"""
from __future__ import annotations

import copy
import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from align.errors import RunError, write_json_atomic
from align.loading import write_tensors
from align.model import AlignModel
from align.towers.open_clip import OpenClipImageTower, OpenClipTextTower, resolve_model_name

SUBDIR = "open_clip"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"


def open_clip_problem(model: AlignModel) -> Optional[str]:
    """Why ``model`` cannot be written as an open_clip model, or None."""
    image, text = (model.towers[m] if m in model.towers else None for m in ("image", "text"))
    if not isinstance(image, OpenClipImageTower) or not isinstance(text, OpenClipTextTower):
        kinds = {m: type(t).__name__ for m, t in model.towers.items()}
        return f"open_clip needs an open_clip_image and an open_clip_text tower; this model has {kinds}"
    same = ("model", "image_size", "context_length")
    if any(getattr(image.config, key) != getattr(text.config, key) for key in same):
        return ("open_clip needs both towers cut from one CLIP; model.towers.image and model.towers.text name "
                f"different {'/'.join(same)}")
    cfg = model_config(image)
    if cfg["vision_cfg"].get("timm_model_name") or cfg["text_cfg"].get("hf_model_name"):
        return ("the CLIP uses a timm or Hugging Face trunk, whose config open_clip fetches from a hub when it "
                "builds the model; only open_clip's own ViT/ResNet and text transformer are exported")
    for name, tower, target in (("image", image, _visual_projection(image)), ("text", text, _text_projection(text))):
        if isinstance(tower.projection, nn.Identity):
            continue
        if not isinstance(tower.projection, nn.Linear) or tower.projection.bias is not None:
            return (f"model.towers.{name}.projection is {type(tower.projection).__name__}, not a bias-free linear "
                    "map: it cannot be folded into open_clip's projection")
        if target is None:
            return (f"model.towers.{name}: the CLIP's {name} half has no final projection matrix to fold our "
                    "linear projection into")
    return None


def model_config(image: OpenClipImageTower) -> Dict[str, Any]:
    """The CLIP's model config as open_clip reads it (JSON file or built-in name), with the
    tower's image-size and context-length overrides applied."""
    import open_clip

    config = image.config
    if config.model.endswith(".json"):
        with open(config.model, encoding="utf-8") as handle:
            cfg = json.load(handle)
    else:
        cfg = open_clip.get_model_config(resolve_model_name(config.model))
        if cfg is None:
            raise RunError(f"open_clip has no model config for {config.model!r}")
    cfg = copy.deepcopy(cfg)
    if config.image_size:
        cfg["vision_cfg"]["image_size"] = config.image_size
    if config.context_length:
        cfg["text_cfg"]["context_length"] = config.context_length
    return cfg


def _visual_projection(tower: OpenClipImageTower) -> Optional[nn.Parameter]:
    proj = getattr(tower.trunk, "proj", None)
    return proj if isinstance(proj, nn.Parameter) else None


def _text_projection(tower: OpenClipTextTower) -> Any:
    projection = getattr(tower._text(), "text_projection", None)
    return projection if isinstance(projection, (nn.Parameter, nn.Linear)) else None


def _fold(matrix: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(in, clip_dim) @ W^T (clip_dim -> D) in float64, rounded once to float32: (in, D)."""
    return (matrix.double() @ weight.double().T).float()


def open_clip_state(model: AlignModel) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """(open_clip_config.json's content, the CLIP state dict) for ``model`` (``open_clip_problem`` is None)."""
    image, text = model.towers["image"], model.towers["text"]
    state = {f"visual.{k}": v for k, v in image.trunk.state_dict().items()}
    state.update({k: v for k, v in text.trunk.state_dict().items() if not k.startswith("visual.")})
    prefix = "text." if hasattr(text.trunk, "text") else ""  # CustomTextCLIP keeps its text half under .text
    if isinstance(image.projection, nn.Linear):
        state["visual.proj"] = _fold(image.trunk.proj.detach(), image.projection.weight.detach())
    if isinstance(text.projection, nn.Linear):
        weight = text.projection.weight.detach()
        target = _text_projection(text)
        if isinstance(target, nn.Linear):  # y = W (A x + b)
            state[f"{prefix}text_projection.weight"] = _fold(target.weight.detach().T, weight).T.contiguous()
            state[f"{prefix}text_projection.bias"] = (weight.double() @ target.bias.detach().double()).float()
        else:
            state[f"{prefix}text_projection"] = _fold(target.detach(), weight)
    # open_clip keeps the log of the logit scale, as we do; ours is capped at max_logit_scale.
    log_scale = min(float(model.log_logit_scale.detach()), math.log(model.max_logit_scale))
    state["logit_scale"] = torch.full_like(text.trunk.logit_scale.detach(), log_scale)
    cfg = model_config(image)
    cfg["embed_dim"] = int(model.embed_dim or _output_dim(model))
    preprocess = {k: (list(v) if isinstance(v, tuple) else v) for k, v in image.preprocess_cfg.items()}
    return {"model_cfg": cfg, "preprocess_cfg": preprocess}, state


def _output_dim(model: AlignModel) -> int:
    with torch.no_grad():
        image = model.towers["image"]
        size = image.image_size if isinstance(image.image_size, (tuple, list)) else (image.image_size,) * 2
        return int(image(torch.zeros(1, 3, *size)).shape[-1])


def export_open_clip(model: AlignModel, out: str) -> List[str]:
    """Write the open_clip folder at ``out``; the files written."""
    config, state = open_clip_state(model)
    os.makedirs(out, exist_ok=True)
    write_json_atomic(config, os.path.join(out, CONFIG_FILE))
    write_tensors(state, os.path.join(out, WEIGHTS_FILE), metadata={"format": "pt"})
    return [CONFIG_FILE, WEIGHTS_FILE]


def load_exported(out: str, dtype: torch.dtype = torch.float32) -> Tuple[nn.Module, Any, Any]:
    """(model, eval transform, tokenizer) as open_clip itself loads the folder (``local-dir:``)."""
    import open_clip

    name = f"local-dir:{os.path.abspath(out)}"
    model, _, preprocess = open_clip.create_model_and_transforms(name, weights_only=True)
    return model.eval().to(dtype), preprocess, open_clip.get_tokenizer(name)


def check_open_clip(out: str, texts: Sequence[str], images: torch.Tensor, expected_text: torch.Tensor,
                    expected_image: torch.Tensor) -> float:
    """Load ``out`` with open_clip alone and encode ``texts`` (its tokenizer) and ``images``
    (normalised (B, 3, H, W)); the largest |difference| from the expected unit rows."""
    try:
        model, _, tokenizer = load_exported(out)
        with torch.no_grad():
            text = model.encode_text(tokenizer(list(texts)), normalize=True)
            image = model.encode_image(images, normalize=True)
    except Exception as error:  # open_clip raises plain exceptions of many types
        raise RunError(f"{out}: open_clip could not load or run the export ({type(error).__name__}: {error})") from None
    return max(float((text - expected_text).abs().max()), float((image - expected_image).abs().max()))
