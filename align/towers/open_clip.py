"""Image and text towers taken from an open_clip model.

``model`` is any name open_clip knows (``open_clip.list_models()``) or the path of a model-config
JSON; ``pretrained`` is an open_clip tag (``laion2b_s34b_b79k``) or a local checkpoint file.
When the image and text towers name the same model and weights, one CLIP is created and split
between them, so fine-tuning a pretrained CLIP keeps both halves of the original pair; with
``projection: auto`` and ``model.embed_dim`` equal to the CLIP's, its zero-shot alignment is
intact at step 0.

Local ``pretrained`` files are read with ``torch.load(weights_only=True)``: tensors only, so a
planted pickle payload is refused instead of run. A checkpoint's ``model/`` folder keeps a copy
of a model-config JSON (``model/open_clip/<name>.json``) so it rebuilds with no other file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Set, Tuple

import torch
from torch import nn

from align.errors import ConfigError
from align.towers.base import Projection, TokenCache, Tower, projection_head, used_length
from align.towers.image_ops import rgb_pixels


@dataclass
class OpenClipConfig:
    model: str = "ViT-B-32"  # open_clip model name or a model-config JSON path
    pretrained: str = ""  # open_clip pretrained tag or local checkpoint file; "" = random init
    image_size: Optional[int] = None  # overrides the config's image size
    context_length: Optional[int] = None  # overrides the text context length
    projection: Projection = "auto"  # see towers/base.py projection_head
    cache_dir: Optional[str] = None  # where open_clip keeps downloaded weights


def resolve_model_name(model: str) -> str:
    """A JSON path is registered with open_clip under its file stem (a file that is not JSON is a
    ``ConfigError`` naming it); a name is checked."""
    import open_clip

    if model.endswith(".json"):
        if not os.path.isfile(model):
            raise FileNotFoundError(f"open_clip model config not found: {model}")
        try:  # read it first: open_clip would keep a broken file on its search path
            with open(model, encoding="utf-8") as handle:
                json.load(handle)
        except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
            raise ConfigError(f"{model}: not a readable open_clip model-config JSON ({error})") from None
        open_clip.add_model_config(model)
        return os.path.splitext(os.path.basename(model))[0]
    if model not in open_clip.list_models() and not model.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(f"open_clip has no model {model!r}; see open_clip.list_models() or give a JSON path")
    return model


def check_open_clip_sources(config: OpenClipConfig, key: str) -> None:
    """``model`` is an open_clip name or an existing JSON; ``pretrained`` is empty, a file, or one
    of open_clip's tags for that model (compared as open_clip does: case and -/_ ignored)."""
    import open_clip

    try:
        name = resolve_model_name(config.model)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"{key}.model: {error}") from None
    pretrained = config.pretrained
    if not pretrained or os.path.isfile(pretrained):
        return
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained.lower().replace("-", "_") in tags:
        return
    if os.sep in pretrained or os.path.splitext(pretrained)[1]:
        raise ConfigError(f"{key}.pretrained: no such file {pretrained}")
    known = f"its tags: {', '.join(tags)}" if tags else "open_clip has no pretrained weights for it"
    raise ConfigError(f"{key}.pretrained: {pretrained!r} is neither a file nor an open_clip tag of {name} ({known})")


class _NotRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init(quiet: bool) -> Iterator[None]:
    """Drop open_clip's "No pretrained weights loaded ... initialized randomly" warning where no
    weights were asked for: a model trained from scratch, or one whose weights our checkpoint
    loads next (``align search`` and the rest would print it on every start). ``quiet``: no
    pretrained weights were asked for."""
    if not quiet:
        yield
        return
    drop = _NotRandomInitWarning()
    logging.getLogger().addFilter(drop)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(drop)


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
    with _quiet_random_init(not pretrained):
        clip = open_clip.create_model(name, pretrained=pretrained or None, cache_dir=cache_dir,
                                      weights_only=True, **kwargs)
    visual = clip.visual
    clip.visual = nn.Identity()  # the text half keeps token embedding, transformer, ln, projection
    return visual, clip


class PilToUint8:
    """Picklable: PIL image -> (3, H, W) uint8 tensor of its RGB pixels, not normalised."""

    def __call__(self, image: Any) -> torch.Tensor:
        return rgb_pixels(image)


class OpenClipImageTokens:
    """Picklable image preprocessor: PIL image -> (3, H, W) tensor with open_clip's transform.

    The transform's geometric and colour steps run as open_clip defines them; its closing
    ToTensor + Normalize is replaced by ``PilToUint8``, so images leave the dataloader workers
    as uint8 and the tower normalises whole batches on the model's device (a quarter of the
    bytes between processes and to the GPU, and the float work done once per batch, vectorised).
    A transform of another shape (timm's) is kept whole and yields normalised floats.
    """

    def __init__(self, transform: Callable) -> None:
        self.source = transform  # whole, for ``on_device``
        steps = list(getattr(transform, "transforms", []))
        if len(steps) >= 2 and _is_to_tensor(steps[-2]) and isinstance(steps[-1], _normalize_type()):
            from torchvision.transforms import Compose

            transform = Compose([*steps[:-2], PilToUint8()])
        self.transform = transform

    def __call__(self, image: Any) -> torch.Tensor:
        return self.transform(image)

    def on_device(self) -> Callable:
        """The ``data.image_pipeline: device`` preprocessor: stored-size pixels (or a checked
        JPEG's bytes, ``data.image_decode: device``) + the crop and flip this transform would
        draw (``ImageGeometry``; ``ConfigError`` where it cannot)."""
        from align.towers.image_ops import ImageGeometry

        return ImageGeometry(self.source)


def _normalize_type() -> type:
    from torchvision.transforms import Normalize

    return Normalize


def _is_to_tensor(step: Any) -> bool:
    return type(step).__name__ in ("ToTensor", "MaybeToTensor")


def pixel_normalisation(transform: Callable) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each (1, 3, 1, 1), with ``uint8 * scale + shift`` equal to the
    transform's ``Normalize(ToTensor(image))``."""
    normalize = next(step for step in getattr(transform, "transforms", []) if isinstance(step, _normalize_type()))
    mean = torch.tensor(normalize.mean, dtype=torch.float32).expand(3).reshape(1, 3, 1, 1)
    std = torch.tensor(normalize.std, dtype=torch.float32).expand(3).reshape(1, 3, 1, 1)
    return 1.0 / (255.0 * std), -mean / std


class OpenClipTokenize:
    """Picklable text preprocessor: str -> (L,) token ids with open_clip's tokenizer."""

    def __init__(self, tokenizer: Callable) -> None:
        self.tokenizer = tokenizer
        self.cache = TokenCache(self._tokenize)

    def _tokenize(self, text: str) -> torch.Tensor:
        return self.tokenizer([text])[0]

    def __call__(self, text: str) -> torch.Tensor:
        return self.cache(text)


def _encodes_prefixes(text: nn.Module) -> bool:
    """True when open_clip's text module gives the same pooled output for the tokens cut after
    the last real one: causal attention (no position sees a later one), pooling at the
    end-of-text token, no padding mask and no class token appended after the padding (CoCa).
    Built-in CLIP text and ``TextTransformer`` qualify; SigLIP's (``last`` pooling) and HF
    text encoders do not."""
    pool = getattr(text, "text_pool_type", getattr(text, "pool_type", None))
    return (pool in ("argmax", "eos") and getattr(text, "attn_mask", None) is not None
            and getattr(text, "cls_emb", None) is None and not getattr(text, "use_pad_mask", False)
            and hasattr(text, "token_embedding") and hasattr(text, "positional_embedding"))


def _encode_prefix(text: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's text forward on (B, L') tokens, L' <= context, with the position table and
    causal mask cut to L' (its own forward only takes the full context)."""
    from open_clip.transformer import text_global_pool

    length = tokens.shape[1]
    cast = text.transformer.get_cast_dtype()
    x = text.token_embedding(tokens).to(cast) + text.positional_embedding[:length].to(cast)
    x = text.ln_final(text.transformer(x, attn_mask=text.attn_mask[:length, :length]))
    pooled = text_global_pool(x, tokens, getattr(text, "text_pool_type", getattr(text, "pool_type", None)),
                              eos_token_id=getattr(text, "text_eos_id", getattr(text, "eos_id", None)))
    projection = text.text_projection
    if projection is None:
        return pooled
    return projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection


def _raw_embeddings(tower: nn.Module) -> Set[str]:
    """Names (in ``tower``) of its trunk's positional / class embeddings: open_clip holds them as
    raw nn.Parameters (its token table is an nn.Embedding, which the optimiser knows by type)."""
    kinds = ("positional_embedding", "class_embedding", "cls_emb")
    return {name for name, _ in tower.named_parameters() if name.rsplit(".", 1)[-1] in kinds}


SOURCES_SUBDIR = "open_clip"


def save_open_clip_sources(tower: Tower, folder: str) -> OpenClipConfig:
    """A model-config JSON is copied to ``folder/open_clip/`` (its file name is the model name);
    open_clip's built-in names need nothing."""
    config = tower.config
    if not config.model.endswith(".json"):
        return config
    relative = os.path.join(SOURCES_SUBDIR, os.path.basename(config.model))
    os.makedirs(os.path.join(folder, SOURCES_SUBDIR), exist_ok=True)
    shutil.copyfile(config.model, os.path.join(folder, relative))
    return dataclasses.replace(config, model=relative)


def saved_open_clip_config(config: OpenClipConfig, folder: str) -> OpenClipConfig:
    """Pretrained weights off (the folder's model.safetensors replaces them); a relative JSON
    path resolved against ``folder``."""
    model = config.model
    if model.endswith(".json") and not os.path.isabs(model):
        model = os.path.join(folder, model)
    return dataclasses.replace(config, model=model, pretrained="")


def _params(config: OpenClipConfig) -> tuple:
    return config.model, config.pretrained, config.image_size, config.context_length, config.cache_dir


class OpenClipTower(Tower):
    """Either half of one open_clip CLIP (``load_clip_halves``): its config, sources and saving."""

    Config = OpenClipConfig
    check_sources = staticmethod(check_open_clip_sources)
    saved_config = staticmethod(saved_open_clip_config)
    save_sources = save_open_clip_sources


class OpenClipImageTower(OpenClipTower):
    """open_clip's vision trunk (ViT, ResNet or timm) + projection to the shared space."""

    modality = "image"

    def __init__(self, config: OpenClipConfig, embed_dim: int) -> None:
        super().__init__()
        self.config = config
        visual, _ = load_clip_halves(*_params(config))
        self.trunk = visual
        self.projection = projection_head(visual.output_dim, embed_dim, config.projection)
        self.preprocess_cfg = dict(getattr(visual, "preprocess_cfg", {}) or {})
        self.image_size = visual.image_size
        scale, shift = pixel_normalisation(self.transform(train=False))
        # Not in the state dict: they follow from the model config, like the transform itself.
        self.register_buffer("pixel_scale", scale, persistent=False)
        self.register_buffer("pixel_shift", shift, persistent=False)

    def features(self, images: Any) -> torch.Tensor:
        """(B, 3, H, W) -> (B, clip_dim). uint8 images are raw pixels (what ``preprocessor``
        gives) and are normalised here; float images are taken as already normalised (the
        output of open_clip's own preprocess). A dict is a ``data.image_pipeline: device``
        batch (stored-size pixels and, with ``data.image_decode: device``, JPEG bytes on the host,
        + drawn crops, align/towers/image_ops.py): decoded on this tower's device (unless
        ``reusable`` already did), cropped, resized and flipped here first."""
        if isinstance(images, dict):
            from align.towers.image_ops import resized_crops, stored_images

            stored = images["stored"] if "stored" in images else stored_images(images, self.pixel_scale.device)
            levels = resized_crops(stored, images, self.image_size)  # (B, 3, S, S) float32 pixel levels
            return self.trunk(torch.addcmul(self.pixel_shift, levels, self.pixel_scale))
        if images.dtype == torch.uint8:
            images = torch.addcmul(self.pixel_shift, images.to(self.pixel_scale.dtype), self.pixel_scale)
        return self.trunk(images)

    def reusable(self, images: Any) -> Any:
        """A ``data.image_decode: device`` batch with its JPEGs decoded, once, on this tower's
        device: its geometry + "stored", one (3, h, w) uint8 image a row (``stored_images``).
        Other inputs as they are."""
        if not isinstance(images, dict) or images.get("jpeg") is None:
            return images
        from align.towers.image_ops import stored_images

        geometry = {k: v for k, v in images.items() if k not in ("jpeg", "pixels")}
        return {**geometry, "stored": stored_images(images, self.pixel_scale.device)}

    def transform(self, train: bool) -> Callable:
        """open_clip's image transform for this model (ending in ToTensor + Normalize)."""
        import open_clip

        cfg = self.preprocess_cfg
        return open_clip.image_transform(
            self.image_size, is_train=train, mean=cfg.get("mean"), std=cfg.get("std"),
            interpolation=cfg.get("interpolation"), resize_mode=cfg.get("resize_mode"),
        )

    def preprocessor(self, train: bool) -> Callable:
        return OpenClipImageTokens(self.transform(train))

    def no_weight_decay(self) -> Set[str]:
        """Positional and class embeddings: not decayed (align/train/optim.py)."""
        return _raw_embeddings(self)

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


class OpenClipTextTower(OpenClipTower):
    """open_clip's text transformer (or its HF text encoder) + projection to the shared space."""

    modality = "text"

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
        """(B, L) token ids -> (B, clip_dim). A causal text transformer pooled at the
        end-of-text token gives the same embedding from the columns up to the batch's longest
        text, so the padding after it is not encoded."""
        text = self._text()
        if _encodes_prefixes(text):
            length = used_length(tokens != getattr(text, "pad_id", 0))
            if length < tokens.shape[1]:
                return _encode_prefix(text, tokens[:, :length])
        return self.trunk.encode_text(tokens)

    def preprocessor(self, train: bool) -> Callable:
        return OpenClipTokenize(self.tokenizer)

    def _text(self) -> nn.Module:
        return getattr(self.trunk, "text", self.trunk)  # CustomTextCLIP keeps it under .text

    def no_weight_decay(self) -> Set[str]:
        """Positional (and CoCa's class) embeddings: not decayed (align/train/optim.py)."""
        return _raw_embeddings(self)

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
