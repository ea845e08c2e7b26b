"""Image and text towers taken from an open_clip model.

``model`` is any name open_clip knows (``open_clip.list_models()``) or the path of a model-config
JSON; ``pretrained`` is an open_clip tag (``laion2b_s34b_b79k``) or a local checkpoint file.
When the image and text towers name the same model and weights, one CLIP is created and split
between them, so fine-tuning a pretrained CLIP keeps both halves of the original pair; with
``projection: auto`` and ``model.embed_dim`` equal to the CLIP's, its zero-shot alignment is
intact at step 0.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import nn

from align.registry import TOWERS
from align.towers.base import Tower, projection_head


@dataclass
class OpenClipConfig:
    model: str = "ViT-B-32"  # open_clip model name or a model-config JSON path
    pretrained: str = ""  # open_clip pretrained tag or local checkpoint file; "" = random init
    image_size: Optional[int] = None  # overrides the config's image size
    context_length: Optional[int] = None  # overrides the text context length
    projection: str = "auto"  # auto | none | linear | mlp (see towers/base.py)
    cache_dir: Optional[str] = None  # where open_clip keeps downloaded weights


def resolve_model_name(model: str) -> str:
    """A JSON path is registered with open_clip under its file stem; a name is checked."""
    import open_clip

    if model.endswith(".json"):
        if not os.path.isfile(model):
            raise FileNotFoundError(f"open_clip model config not found: {model}")
        open_clip.add_model_config(model)
        return os.path.splitext(os.path.basename(model))[0]
    if model not in open_clip.list_models() and not model.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(f"open_clip has no model {model!r}; see open_clip.list_models() or give a JSON path")
    return model


@functools.lru_cache(maxsize=2)
def load_clip_halves(model: str, pretrained: str, image_size: Optional[int], context_length: Optional[int],
                     cache_dir: Optional[str]) -> Tuple[nn.Module, nn.Module]:
    """Create one CLIP and split it into (visual, text-only CLIP). Cached so both towers share it."""
    import open_clip

    name = resolve_model_name(model)
    kwargs = {}
    if image_size:
        kwargs["force_image_size"] = image_size
    if context_length:
        kwargs["force_context_length"] = context_length
    # weights_only=True: an untrusted checkpoint is read as tensors and never runs code.
    clip = open_clip.create_model(name, pretrained=pretrained or None, cache_dir=cache_dir,
                                  weights_only=True, **kwargs)
    visual = clip.visual
    clip.visual = nn.Identity()  # the text half keeps token embedding, transformer, ln, projection
    return visual, clip


class OpenClipImageTokens:
    """Picklable image preprocessor: PIL image -> (3, H, W) tensor with open_clip's transform."""

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, image: Any) -> torch.Tensor:
        return self.transform(image)


class OpenClipTokenize:
    """Picklable text preprocessor: str -> (L,) token ids with open_clip's tokenizer."""

    def __init__(self, tokenizer: Callable) -> None:
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> torch.Tensor:
        return self.tokenizer([text])[0]


def _params(config: OpenClipConfig) -> tuple:
    return config.model, config.pretrained, config.image_size, config.context_length, config.cache_dir


@TOWERS.register("open_clip_image")
class OpenClipImageTower(Tower):
    """open_clip's vision trunk (ViT, ResNet or timm) + projection to the shared space."""

    modality = "image"
    Config = OpenClipConfig

    def __init__(self, config: OpenClipConfig, embed_dim: int) -> None:
        super().__init__()
        self.config = config
        visual, _ = load_clip_halves(*_params(config))
        self.trunk = visual
        self.projection = projection_head(visual.output_dim, embed_dim, config.projection)
        self.preprocess_cfg = dict(getattr(visual, "preprocess_cfg", {}) or {})
        self.image_size = visual.image_size

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images)  # (B, 3, H, W) -> (B, clip_dim)

    def preprocessor(self, train: bool) -> Callable:
        import open_clip

        cfg = self.preprocess_cfg
        transform = open_clip.image_transform(
            self.image_size, is_train=train, mean=cfg.get("mean"), std=cfg.get("std"),
            interpolation=cfg.get("interpolation"), resize_mode=cfg.get("resize_mode"),
        )
        return OpenClipImageTokens(transform)

    def trunk_blocks(self) -> List[nn.Module]:
        if hasattr(self.trunk, "transformer"):  # VisionTransformer
            return list(self.trunk.transformer.resblocks)
        if hasattr(self.trunk, "layer4"):  # ModifiedResNet
            return [self.trunk.layer1, self.trunk.layer2, self.trunk.layer3, self.trunk.layer4]
        if hasattr(self.trunk, "trunk") and hasattr(self.trunk.trunk, "blocks"):  # timm
            return list(self.trunk.trunk.blocks)
        raise ValueError(f"cannot find the blocks of {type(self.trunk).__name__} to unfreeze")

    def trunk_tail(self) -> list:
        tail = []
        for name in ("ln_post", "attn_pool", "attn_pool_contrastive", "attnpool", "head"):
            module = getattr(self.trunk, name, None)
            if isinstance(module, nn.Module):
                tail.append(module)
        if isinstance(getattr(self.trunk, "proj", None), nn.Parameter):
            tail.append(self.trunk.proj)
        return tail


@TOWERS.register("open_clip_text")
class OpenClipTextTower(Tower):
    """open_clip's text transformer (or its HF text encoder) + projection to the shared space."""

    modality = "text"
    Config = OpenClipConfig

    def __init__(self, config: OpenClipConfig, embed_dim: int) -> None:
        super().__init__()
        import open_clip

        self.config = config
        _, text_clip = load_clip_halves(*_params(config))
        self.trunk = text_clip
        self.trunk.logit_scale.requires_grad_(False)  # the model's own temperature is used instead
        if getattr(self.trunk, "logit_bias", None) is not None:
            self.trunk.logit_bias.requires_grad_(False)
        with torch.no_grad():
            probe = self.trunk.encode_text(torch.zeros(1, self.trunk.context_length, dtype=torch.long))
        self.projection = projection_head(probe.shape[-1], embed_dim, config.projection)
        self.tokenizer = open_clip.get_tokenizer(resolve_model_name(config.model),
                                                 context_length=self.trunk.context_length)

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.trunk.encode_text(tokens)  # (B, L) -> (B, clip_dim)

    def preprocessor(self, train: bool) -> Callable:
        return OpenClipTokenize(self.tokenizer)

    def _text(self) -> nn.Module:
        return getattr(self.trunk, "text", self.trunk)  # CustomTextCLIP keeps it under .text

    def trunk_blocks(self) -> List[nn.Module]:
        text = self._text()
        if hasattr(text, "transformer") and hasattr(text.transformer, "resblocks"):
            return list(text.transformer.resblocks)
        if hasattr(text, "transformer") and hasattr(text.transformer, "encoder"):  # HFTextEncoder
            return list(text.transformer.encoder.layer)
        raise ValueError(f"cannot find the blocks of {type(text).__name__} to unfreeze")

    def trunk_tail(self) -> list:
        text = self._text()
        tail = [m for m in (getattr(text, "ln_final", None), getattr(text, "proj", None)) if isinstance(m, nn.Module)]
        projection = getattr(text, "text_projection", None)
        if isinstance(projection, (nn.Module, nn.Parameter)):
            tail.append(projection)
        return tail
