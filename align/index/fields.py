"""Embed a catalogue field by field (``model.fields``, align/fields.py) with ``align embed``'s machinery.

A model trained with ``model.fields`` (search-log fine-tuning) was taught that an item is the
weighted mean of its field vectors, each text field embedded on its own. Its catalogue is
embedded the same way: one pass of ``align embed``'s catalogue encoder per text field (the
manifests read with ``data.columns.text`` set to that field's columns, so the text is joined as
in training) and one for the media fields, then fused with the field weights.

The result is an ``ItemEmbeddings`` like any other: ``image``/``audio`` vectors per item,
``text`` the weighted mean of its text fields (what a text-to-text search compares), and
``fused`` the weighted mean over all fields, which is what the index holds and search-eval ranks.
Its metadata says ``fusion: fields`` and the weights, so an append with other fields is refused.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch

from align.config import FieldConfig
from align.data.loader import loader_from_config
from align.data.transforms import SampleProcessor
from align.fields import FUSED, field_weights, fuse, product_fields


def model_fields(config: Any) -> Dict[str, FieldConfig]:
    """The checkpoint config's ``model.fields`` ({} when it has none: plain modality fusion)."""
    return dict(config.model.fields)


def fields_metadata(fields: Mapping[str, FieldConfig]) -> Dict[str, str]:
    described = ",".join(f"{name}:{spec.modality}{'[' + '+'.join(spec.columns) + ']' if spec.columns else ''}"
                         f"={spec.weight:g}" for name, spec in fields.items())
    return {"fusion": "fields", "fields": described}


def embed_fields(model: Any, config: Any, manifests: Sequence[str], batch_size: int, device: torch.device,
                 fields: Mapping[str, FieldConfig], progress: Optional[str] = None
                 ) -> Tuple[list, Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(ids, vectors, masks) of every item of ``manifests``: per modality and ``fused`` (module doc)."""
    from align.index.embed import embed_batches, read_catalogue

    processor = SampleProcessor(model.preprocessors(train=False))
    passes: Dict[str, Tuple[str, Any]] = {}  # field -> (modality, config it is read with)
    for name, spec in fields.items():
        if spec.modality == "text":
            columns = dataclasses.replace(config.data.columns, text=list(spec.columns))
            passes[name] = ("text", dataclasses.replace(config, data=dataclasses.replace(config.data, columns=columns)))
        else:
            passes[name] = (spec.modality, config)
    ids = None
    vectors: Dict[str, torch.Tensor] = {}
    masks: Dict[str, torch.Tensor] = {}
    for name, (modality, read_config) in passes.items():
        loaders = [loader_from_config(read_config, processor, train=False, spec=m, pin_memory=device.type == "cuda")
                   for m in manifests]
        rows = iter([loader.dataset.rows for loader in loaders])
        catalogue = read_catalogue(manifests, [modality], batch_size, lambda _: next(rows), loaders)
        part = embed_batches(model, catalogue, catalogue.batches(), device,
                             None if progress is None else f"{progress} {name}")
        ids = catalogue.ids if ids is None else ids
        count = len(ids)
        vectors[name] = torch.zeros(count, model.embed_dim)
        masks[name] = torch.zeros(count, dtype=torch.bool)
        vectors[name][part.rows[modality]] = part.vectors[modality]
        masks[name][part.rows[modality]] = True
    weights = field_weights(fields)
    out_vectors: Dict[str, torch.Tensor] = {}
    out_masks: Dict[str, torch.Tensor] = {}
    for modality in model.modalities:  # per modality: its fields fused (text: title + description + ...)
        own = [name for name, spec in fields.items() if spec.modality == modality and weights[name] > 0]
        if own:
            out_vectors[modality], out_masks[modality] = fuse({n: vectors[n] for n in own},
                                                              {n: masks[n] for n in own}, {n: weights[n] for n in own})
        else:
            out_vectors[modality] = torch.zeros(len(ids), model.embed_dim)
            out_masks[modality] = torch.zeros(len(ids), dtype=torch.bool)
    out_vectors[FUSED], out_masks[FUSED] = fuse(vectors, masks, weights)
    return list(ids), out_vectors, out_masks


__all__ = ["embed_fields", "fields_metadata", "model_fields", "product_fields"]
