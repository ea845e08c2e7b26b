"""Multi-field products: an item's vector is the weighted mean of its normalised field vectors.

A product has fields: its photo, its title, its description, its attribute values, its sound.
Each text field is embedded on its own by the text tower (a title and a long description joined
into one text let the description drown the title), and the item vector is

    item_i = normalize( sum_f w_f [i has f] normalize(v_if) / sum_f w_f [i has f] )

with ``w_f`` from ``model.fields.<f>.weight`` (trained with the towers under
``loss.field_weights: learned``, which writes the weights reached there: align/objective.py). An
item lacking a field (an empty cell, no photo) is the mean of the fields it has; one with no field
of positive weight gets a zero row and a False mask. The same function makes the item vector in
search-log training (align/objective.py, with gradients), in ``align embed`` / ``align
search-eval`` and so in the index, so the space the loss shaped is the space that is searched.

Without ``model.fields`` every modality tower is one field named after its modality, the text
field joining ``data.columns.text``: the plain modality fusion ``align embed`` has always done.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from align.config import FieldConfig
from align.errors import ConfigError

FUSED = "fused"


def field_weights(fields: Mapping[str, FieldConfig]) -> Dict[str, float]:
    return {name: float(spec.weight) for name, spec in fields.items()}


def towers_without_fields(towers: Iterable[str], fields: Mapping[str, FieldConfig]) -> List[str]:
    """The modalities among ``towers`` that no field of positive weight embeds. Fine-tuned on a
    search log, such a tower learns its queries against products it is no part of, and field
    alignment cannot hold it to the text tower: on the demo, voice search fell from nDCG@10 0.59 to
    0.48 until the products got a sound field."""
    fielded = {field.modality for field in fields.values() if field.weight > 0}
    return [modality for modality in towers if modality not in fielded]


def check_weights(weights: Optional[Mapping[str, float]], names) -> None:
    """A ``ConfigError`` unless ``weights`` is None or gives every one of ``names`` a weight >= 0,
    one of them > 0."""
    if weights is None:
        return
    if set(weights) != set(names):
        raise ConfigError(f"fusion weights name {sorted(weights)}; give exactly {sorted(names)} "
                          f"a weight each (0 leaves one out of the fused vector)")
    bad = {m: w for m, w in weights.items() if not (math.isfinite(w) and w >= 0)}
    if bad or not any(weights.values()):
        raise ConfigError(f"fusion weights {dict(weights)}: each must be finite and >= 0, and one > 0")


def fuse(vectors: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
         weights: Optional[Mapping[str, Union[float, torch.Tensor]]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One vector per item from its field (or modality) vectors, as the module doc writes it.

    Args:
        vectors: name -> (N, D); a ``"fused"`` entry is ignored. Rows need not be unit length.
        masks: name -> (N,) bool, the item has that field.
        weights: name -> weight >= 0 for every name of ``vectors``; None: equal weights. A
            weight may be a 0-dim tensor (learned weights, positive by construction: not checked,
            which would wait for the device).
    Returns:
        (fused (N, D) float32 with unit rows, zero rows where the item has no field of positive
        weight; mask (N,) bool, True where the row is real). Differentiable in ``vectors`` and in
        tensor weights.
    """
    names = [name for name in vectors if name != FUSED]
    if not names:
        raise ValueError("fuse needs at least one field's vectors")
    if weights is not None and any(torch.is_tensor(w) for w in weights.values()):
        check_weights({n: 1.0 for n in weights}, names)  # the names only
    else:
        check_weights(weights, names)
    first = vectors[names[0]]
    total = torch.zeros(first.shape, dtype=torch.float32, device=first.device)  # (N, D)
    weight_sum = torch.zeros(first.shape[0], dtype=torch.float32, device=first.device)  # (N,)
    for name in names:
        given = 1.0 if weights is None else weights[name]
        weight = masks[name].float() * (given.float() if torch.is_tensor(given) else float(given))  # (N,)
        total = total + weight[:, None] * F.normalize(vectors[name].float(), dim=-1)
        weight_sum = weight_sum + weight
    present = weight_sum > 0
    mean = total / weight_sum.clamp_min(1e-12)[:, None]  # (N, D); rows without a field stay zero
    return F.normalize(mean, dim=-1), present
