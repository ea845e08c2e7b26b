"""Image and text towers taken from an open_clip model.

``model`` is any name open_clip knows (``open_clip.list_models()``) or the path of a model-config
JSON; ``pretrained`` is an open_clip tag (``laion2b_s34b_b79k``) or a local checkpoint file.
When the image and text towers name the same model and weights, one CLIP is created and split
between them, so fine-tuning a pretrained CLIP keeps both halves of the original pair; with
``projection: auto`` and ``model.embed_dim`` equal to the CLIP's, its zero-shot alignment is
intact at step 0.

No file is unpickled: a local ``pretrained`` file must be ``.safetensors``, a ``local-dir:`` or
``hf-hub:`` model must have safetensors weights, and a model whose text tower is a transformers
model (``text_cfg.hf_model_name``: open_clip's roberta, xlm-roberta, mt5 and nllb CLIPs) is refused,
since open_clip reads those with ``torch.load`` (``check_no_pickles``). A checkpoint's ``model/``
folder keeps a copy of a model-config JSON (``model/open_clip/<name>.json``) and the image
preprocessing the tower used (``ImagePreprocess``), so it rebuilds with no other file and
normalises images as in training.
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
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Literal, Optional, Set, Tuple

import torch
from torch import nn

from align.errors import ConfigError
from align.towers.base import Projection, TokenCache, Tower, projection_head, used_length
from align.towers.image_ops import rgb_pixels


@dataclass
class ImagePreprocess:
    """How images are resized and normalised for an open_clip image tower: open_clip's
    ``PreprocessCfg`` less its ``size`` (that follows the model and ``image_size``). An unset
    field keeps open_clip's value for the model and its ``pretrained`` tag (a tag such as
    ViT-L-14's ``laion2b_s32b_b82k`` brings mean = std = 0.5). A checkpoint saves all of them,
    because it is rebuilt without the tag (``saved_open_clip_config``), which would otherwise
    fall back to OpenAI's mean and std."""

    mean: Optional[Tuple[float, float, float]] = None
    std: Optional[Tuple[float, float, float]] = None
    interpolation: Optional[Literal["bicubic", "bilinear", "random"]] = None
    resize_mode: Optional[Literal["shortest", "longest", "squash"]] = None
    fill_color: Optional[int] = None  # padding of resize_mode "longest"


@dataclass
class OpenClipConfig:
    model: str = "ViT-B-32"  # open_clip model name or a model-config JSON path
    pretrained: str = ""  # open_clip pretrained tag or local .safetensors file; "" = random init
    image_size: Optional[int] = None  # overrides the config's image size
    context_length: Optional[int] = None  # overrides the text context length
    projection: Projection = "auto"  # see towers/base.py projection_head
    cache_dir: Optional[str] = None  # where open_clip keeps downloaded weights
    preprocess: Optional[ImagePreprocess] = None  # image tower only; None = open_clip's for model + tag


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
    of open_clip's tags for that model (compared as open_clip does: case and -/_ ignored); nothing
    they name would be unpickled (``check_no_pickles``)."""
    import open_clip

    try:
        name = resolve_model_name(config.model)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"{key}.model: {error}") from None
    check_no_pickles(config, name, key)
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


UNPICKLING = "open_clip reads it with torch.load, an unpickler, and this project unpickles no file it reads"


def check_no_pickles(config: OpenClipConfig, name: str, key: str) -> None:
    """``ConfigError`` naming ``key``'s ``.pretrained`` or ``.model`` where open_clip would unpickle
    a file: a ``pretrained`` file that is not ``.safetensors``; a ``local-dir:`` folder whose
    weights (the file open_clip picks) are not, or an ``hf-hub:`` model whose safetensors
    weights are not in the local Hugging Face cache; a model whose text tower is a transformers
    model (``text_cfg.hf_model_name``), which open_clip loads with ``AutoModel.from_pretrained``
    (a folder with only ``pytorch_model.bin`` is unpickled) at every build, and whose config and
    tokenizer a checkpoint does not keep. ``name``: ``config.model`` as ``resolve_model_name``
    gives it. Cheap: reads at most a JSON file."""
    pretrained = config.pretrained
    if pretrained and os.path.isfile(pretrained) and not pretrained.endswith(".safetensors"):
        raise ConfigError(
            f"{key}.pretrained: {pretrained} is not a .safetensors file; {UNPICKLING}. Convert it once, in a "
            "trusted environment: safetensors.torch.save_file({k: v.contiguous() for k, v in "
            f"open_clip.factory.load_state_dict({pretrained!r}).items()}}, 'clip.safetensors'), and give that file")
    model_cfg = _schema_model_config(config, key) if name.startswith(("hf-hub:", "local-dir:")) else None
    if model_cfg is None:
        import open_clip

        model_cfg = open_clip.get_model_config(name) or {}
    hf_model = model_cfg.get("text_cfg", {}).get("hf_model_name")
    if hf_model:
        raise ConfigError(
            f"{key}.model: {config.model}'s text tower is the transformers model {hf_model!r} "
            "(text_cfg.hf_model_name), which open_clip loads without asking for safetensors (a folder with only "
            "pytorch_model.bin is unpickled) and which a checkpoint does not keep. Use an open_clip model whose text "
            "tower is its own, or, for a transformers text tower, type hf_text with path: a folder holding "
            "safetensors weights")


def _schema_model_config(config: OpenClipConfig, key: str) -> Dict[str, Any]:
    """The ``model_cfg`` of a ``local-dir:`` or ``hf-hub:`` model, once its weights are known to be
    safetensors; else ``ConfigError`` naming ``key.model`` and what to do instead."""
    import open_clip.factory

    schema, identifier = open_clip.factory.parse_model_name(config.model)
    if schema == "local-dir":
        config_file = os.path.join(identifier, "open_clip_config.json")
        if not os.path.isfile(config_file):
            raise ConfigError(f"{key}.model: {config.model}: no open_clip_config.json in {identifier}")
        # the file open_clip itself would load: it prefers some .bin names over model.safetensors
        weights = open_clip.factory._find_checkpoint_in_dir(Path(identifier))
        if weights is not None and not str(weights).endswith(".safetensors"):
            raise ConfigError(
                f"{key}.model: {config.model}: open_clip would load {weights}, not a .safetensors file; {UNPICKLING}. "
                "Convert it once, in a trusted environment, to open_clip_model.safetensors in that folder "
                "(safetensors.torch.save_file of open_clip.factory.load_state_dict(the file)) and remove the pickle")
    else:
        from huggingface_hub import try_to_load_from_cache

        from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME

        cached = {filename: try_to_load_from_cache(identifier, filename, cache_dir=config.cache_dir)
                  for filename in (HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME)}
        if not all(isinstance(path, str) for path in cached.values()):
            raise ConfigError(
                f"{key}.model: {config.model}: {HF_SAFE_WEIGHTS_NAME} and {HF_CONFIG_NAME} are not in the local "
                "Hugging Face cache, so whether open_clip would unpickle its weights (an open_clip_pytorch_model.bin) "
                f"cannot be checked. Download both first (huggingface-cli download {identifier} {HF_CONFIG_NAME} "
                f"{HF_SAFE_WEIGHTS_NAME}), or give local-dir:<a folder holding them>")
        config_file = cached[HF_CONFIG_NAME]
    try:
        with open(config_file, encoding="utf-8") as handle:
            return json.load(handle).get("model_cfg", {})
    except (OSError, ValueError, AttributeError) as error:
        raise ConfigError(f"{key}.model: {config_file} is not a readable open_clip_config.json ({error})") from None


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
    path resolved against ``folder``. The tag's image preprocessing goes with it: the image
    tower saved its own in ``preprocess`` (``OpenClipImageTower.save_sources``); a checkpoint
    written before it did gets open_clip's defaults, as it always had."""
    model = config.model
    if model.endswith(".json") and not os.path.isabs(model):
        model = os.path.join(folder, model)
    return dataclasses.replace(config, model=model, pretrained="")


def _params(config: OpenClipConfig) -> tuple:
    return config.model, config.pretrained, config.image_size, config.context_length, config.cache_dir


def checked_clip_halves(config: OpenClipConfig, modality: str) -> Tuple[nn.Module, nn.Module]:
    """``load_clip_halves`` after ``check_no_pickles``: a tower built without the run's checks
    (``build_model`` from Python, ``load_model`` of a checkpoint whose files were edited) refuses
    a pickle too, naming ``model.towers.<modality>``."""
    check_no_pickles(config, resolve_model_name(config.model), f"model.towers.{modality}")
    return load_clip_halves(*_params(config))


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
        visual, _ = checked_clip_halves(config, self.modality)
        self.trunk = visual
        self.projection = projection_head(visual.output_dim, embed_dim, config.projection)
        self.preprocess_cfg = dict(getattr(visual, "preprocess_cfg", {}) or {})  # open_clip's, with the tag's
        if config.preprocess is not None:  # set here, or saved by a checkpoint (rebuilt without the tag)
            chosen = dataclasses.asdict(config.preprocess)
            self.preprocess_cfg.update({k: v for k, v in chosen.items() if v is not None})
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

    def save_sources(self, folder: str) -> OpenClipConfig:
        """``save_open_clip_sources`` + the preprocessing this tower used (``ImagePreprocess``),
        which a pretrained tag set and the rebuild from the checkpoint, without the tag, would lose."""
        from open_clip.transform import PreprocessCfg, merge_preprocess_dict

        cfg = merge_preprocess_dict(PreprocessCfg(), self.preprocess_cfg)  # what ``transform`` defaults to
        mean, std = (tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else (value,) * 3))
                     for value in (cfg["mean"], cfg["std"]))
        used = ImagePreprocess(mean=mean, std=std, interpolation=cfg["interpolation"],
                               resize_mode=cfg["resize_mode"], fill_color=int(cfg["fill_color"]))
        return dataclasses.replace(save_open_clip_sources(self, folder), preprocess=used)

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
            fill_color=cfg.get("fill_color") or 0,
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
    """open_clip's text transformer + projection to the shared space (a model whose text tower is
    a transformers model is refused: ``check_no_pickles``)."""

    modality = "text"

    def __init__(self, config: OpenClipConfig, embed_dim: int) -> None:
        super().__init__()
        import open_clip

        self.config = config
        _, text_clip = checked_clip_halves(config, self.modality)
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
        raise ValueError(f"cannot find the blocks of {type(text).__name__} to unfreeze")

    def trunk_tail(self) -> list:
        text = self._text()
        tail = [m for m in (getattr(text, "ln_final", None), getattr(text, "proj", None)) if isinstance(m, nn.Module)]
        projection = getattr(text, "text_projection", None)
        if isinstance(projection, (nn.Module, nn.Parameter)):
            tail.append(projection)
        return tail
