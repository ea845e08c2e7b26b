"""sentence-transformers export: an ``hf_text`` tower as a folder that ``SentenceTransformer(path)``
loads offline and that gives our text embeddings::

    modules.json, config_sentence_transformers.json, README.md (written by sentence-transformers)
    config.json, model.safetensors, tokenizer files, sentence_bert_config.json   Transformer (max_seq_length = ours)
    1_Pooling/          mean over the attention mask, or the first token (``pooling: cls``)
    2_Dense/ (3_Dense/) our projection: a bias-free Linear is one Dense with no activation; the
                        ``mlp`` head is Dense(bias, GELU) then Dense(no bias, no activation)
    N_Normalize/        L2 normalisation, as every tower ends

The folder is written by sentence-transformers' own ``save`` from its own modules (built from our
weights), so its layout is whatever the installed version reads back. Weights are safetensors.
An identity projection (``auto`` with the trunk already at ``embed_dim``) adds no Dense.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import List, Optional, Sequence

import torch
from torch import nn

from align.errors import RunError
from align.export.libraries import missing_library
from align.model import AlignModel
from align.towers.text import HFTextTower

SUBDIR = "sentence_transformers"
LIBRARIES = {"sentence_transformers": "sentence-transformers"}  # module name: pip package
INSTALL = "pip install sentence-transformers"


def sentence_transformers_problem(model: AlignModel) -> Optional[str]:
    """Why ``model``'s text tower cannot be a sentence-transformers folder, or None."""
    tower = model.towers["text"] if "text" in model.towers else None
    if not isinstance(tower, HFTextTower):
        kind = type(tower).__name__ if tower is not None else "no text tower"
        return f"sentence-transformers needs an hf_text text tower (a transformers encoder); this model has {kind}"
    missing = missing_library(LIBRARIES, INSTALL)
    if missing:  # before _dense_layers, which imports it
        return missing
    if _dense_layers(tower.projection) is None:
        return (f"model.towers.text.projection is {type(tower.projection).__name__}; only identity, linear and "
                "mlp projections are written as sentence-transformers Dense modules")
    return None


def _dense_layers(projection: nn.Module) -> Optional[List[nn.Module]]:
    """sentence-transformers Dense modules computing ``projection`` (an empty list for identity), or None."""
    from sentence_transformers.sentence_transformer.modules import Dense

    def dense(linear: nn.Linear, activation: nn.Module) -> nn.Module:
        bias = linear.bias is not None
        return Dense(linear.in_features, linear.out_features, bias=bias, activation_function=activation,
                     init_weight=linear.weight.detach().clone(),
                     init_bias=linear.bias.detach().clone() if bias else None)

    if isinstance(projection, nn.Identity):
        return []
    if isinstance(projection, nn.Linear):
        return [dense(projection, nn.Identity())]
    layers = list(projection) if isinstance(projection, nn.Sequential) else []
    if (len(layers) == 3 and isinstance(layers[0], nn.Linear) and isinstance(layers[1], nn.GELU)
            and isinstance(layers[2], nn.Linear)):
        return [dense(layers[0], nn.GELU(approximate=layers[1].approximate)), dense(layers[2], nn.Identity())]
    return None


def export_sentence_transformers(model: AlignModel, out: str) -> List[str]:
    """Write the sentence-transformers folder at ``out``; the files written."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    tower: HFTextTower = model.towers["text"]
    parent = os.path.dirname(os.path.abspath(out))
    staging = tempfile.mkdtemp(prefix=".hf-trunk-", dir=parent)  # the Transformer module loads from a folder
    try:
        tower.trunk.save_pretrained(staging, safe_serialization=True)
        tower.tokenizer.save_pretrained(staging)
        transformer = Transformer(staging, max_seq_length=int(tower.config.max_length))
        hidden = transformer.get_embedding_dimension()
        pooling = Pooling(hidden, pooling_mode="cls" if tower.config.pooling == "cls" else "mean")
        modules = [transformer, pooling, *_dense_layers(tower.projection), Normalize()]
        SentenceTransformer(modules=modules, device="cpu").save(out, safe_serialization=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sorted(os.path.relpath(os.path.join(root, name), out) for root, _, names in os.walk(out) for name in names)


def load_exported(out: str, dtype: torch.dtype = torch.float32):
    """The folder as sentence-transformers loads it, offline, on the CPU."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(os.path.abspath(out), device="cpu", local_files_only=True).to(dtype).eval()


def check_sentence_transformers(out: str, texts: Sequence[str], expected: torch.Tensor) -> float:
    """Load ``out`` with sentence-transformers alone and encode ``texts``; the largest |difference|."""
    try:
        encoder = load_exported(out)
        with torch.no_grad():
            got = encoder.encode(list(texts), convert_to_tensor=True, batch_size=len(texts))
    except Exception as error:  # sentence-transformers and transformers raise many types
        raise RunError(f"{out}: sentence-transformers could not load or run the export "
                       f"({type(error).__name__}: {error})") from None
    return float((got.float().cpu() - expected).abs().max())
