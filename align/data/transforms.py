"""Per-modality preprocessing applied inside dataloader workers.

Each tower hands out a small picklable preprocessor (``tower.preprocessor(train)``):
image -> (3, H, W) uint8 tensor, text -> token tensor(s), audio -> (T,) waveform at the tower's rate.
``SampleProcessor`` applies them to a raw sample (see align/data/sample.py) and turns any
failure into a ``BadSample`` naming the sample and modality, so loaders can count and skip it.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping

import torch

from align.data.sample import MODALITIES, BadSample
from align.errors import ConfigError


class SampleProcessor:
    """Raw sample -> processed sample, for the modalities the model has towers for.

    Args:
        preprocessors: modality -> callable on that modality's raw value.
        max_negatives: K, the number of explicit negative texts kept per sample (padded with a
            mask); 0 drops negatives.
    """

    def __init__(self, preprocessors: Mapping[str, Callable[[Any], Any]], max_negatives: int = 0) -> None:
        unknown = set(preprocessors) - set(MODALITIES)
        if unknown:
            raise ValueError(f"no such modality: {sorted(unknown)}; known: {MODALITIES}")
        self.preprocessors = dict(preprocessors)
        self.max_negatives = max_negatives

    def __call__(self, raw: Dict[str, Any]) -> Dict[str, Any]:
        sample_id = str(raw.get("id"))
        text = raw.get("text")
        # The raw text travels with the sample: evaluation treats identical texts as positives.
        out: Dict[str, Any] = {"id": sample_id, "group": raw.get("group"),
                               "text_raw": str(text) if text is not None else None}
        for modality in MODALITIES:
            value = raw.get(modality)
            if value is None or modality not in self.preprocessors:
                out[modality] = None
                continue
            if modality == "text" and not str(value).strip():
                raise BadSample(sample_id, "empty_text", raw.get("_where", ""))
            try:
                out[modality] = self.preprocessors[modality](value)
            except BadSample:
                raise
            except Exception as error:  # any decoder/transform failure is this sample's fault
                raise BadSample(sample_id, f"bad_{modality}", raw.get("_where", ""), repr(error)) from error
        if not any(out[m] is not None for m in MODALITIES):
            raise BadSample(sample_id, "no_modality", raw.get("_where", ""))
        if self.max_negatives > 0:
            out["negatives"] = self._negatives(raw.get("negatives") or [])
        return out

    def _negatives(self, texts: list) -> Dict[str, torch.Tensor]:
        tokenize = self.preprocessors["text"]
        texts = [t for t in texts if t and str(t).strip()][: self.max_negatives]
        mask = torch.zeros(self.max_negatives, dtype=torch.bool)
        mask[: len(texts)] = True
        padded = texts + [""] * (self.max_negatives - len(texts))
        tokens = [tokenize(t) for t in padded]
        stacked = (
            {k: torch.stack([t[k] for t in tokens]) for k in tokens[0]}
            if isinstance(tokens[0], dict)
            else torch.stack(tokens)
        )  # (K, L)
        return {"text": stacked, "mask": mask}


def with_image_pipeline(processor: SampleProcessor, pipeline: str) -> SampleProcessor:
    """``data.image_pipeline``: ``worker`` keeps ``processor``; ``device`` swaps its image
    preprocessor for the one that only decodes and draws the crop (its ``on_device()``), the
    tower doing the rest on its device. An image preprocessor without one (a timm-style transform
    that cannot be split) is refused rather than silently run on the CPU."""
    image = processor.preprocessors.get("image")
    if pipeline == "worker" or image is None:
        return processor
    if not hasattr(image, "on_device"):
        raise ConfigError(f"data.image_pipeline: device needs an image tower whose preprocessor can run on "
                          f"the device ({type(image).__name__} cannot); set data.image_pipeline: worker")
    return SampleProcessor({**processor.preprocessors, "image": image.on_device()}, processor.max_negatives)
