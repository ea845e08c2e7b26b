"""Per-modality preprocessing applied inside dataloader workers.

Each tower hands out a small picklable preprocessor (``tower.preprocessor(train)``):
image -> (3, H, W) uint8 tensor, text -> token tensor(s), audio -> (T,) waveform at the tower's rate.
``SampleProcessor`` applies them to a raw sample (see align/data/sample.py) and turns any
failure into a ``BadSample`` naming the sample and modality, so loaders can count and skip it.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Mapping, Optional

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

    def __init__(self, preprocessors: Mapping[str, Callable[[Any], Any]], max_negatives: int = 0,
                 image_draft_side: Optional[int] = None, image_keep_jpeg: bool = False) -> None:
        unknown = set(preprocessors) - set(MODALITIES)
        if unknown:
            raise ValueError(f"no such modality: {sorted(unknown)}; known: {MODALITIES}")
        self.preprocessors = dict(preprocessors)
        self.max_negatives = max_negatives
        # Readers decode a JPEG no smaller than this shorter side (None: at full size); data.jpeg_draft
        self.image_draft_side = image_draft_side
        # Readers hand JPEGs over checked but undecoded (align/data/manifest.py open_image); data.image_decode
        self.image_keep_jpeg = image_keep_jpeg

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


def _replace(processor: SampleProcessor, **changes: Any) -> SampleProcessor:
    settings = {"preprocessors": processor.preprocessors, "max_negatives": processor.max_negatives,
                "image_draft_side": processor.image_draft_side, "image_keep_jpeg": processor.image_keep_jpeg}
    return SampleProcessor(**{**settings, **changes})


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
    return _replace(processor, preprocessors={**processor.preprocessors, "image": image.on_device()})


def with_image_decode(processor: SampleProcessor, decode: str) -> SampleProcessor:
    """``data.image_decode``: ``device`` has the readers hand JPEGs over checked but undecoded, and
    the image preprocessor ship their bytes for the tower to decode (``image_ops.ImageGeometry``;
    other images keep the pixel path, see ``manifest.open_image``). Applied after
    ``with_image_pipeline``: only its device preprocessor takes bytes (``takes_jpeg_bytes``).
    It pays off on CUDA (nvJPEG, batched); on a CPU run the same path decodes in the main process."""
    image = processor.preprocessors.get("image")
    if decode == "worker" or image is None:
        return processor
    if not getattr(image, "takes_jpeg_bytes", False):
        raise ConfigError(f"data.image_decode: device needs data.image_pipeline: device (the image preprocessor "
                          f"{type(image).__name__} takes pixels only); set both, or data.image_decode: worker")
    return _replace(processor, image_keep_jpeg=True)


def with_jpeg_draft(processor: SampleProcessor, enabled: bool) -> SampleProcessor:
    """``data.jpeg_draft``: the readers may decode a JPEG at 1/2, 1/4 or 1/8 scale (``draft_side``)."""
    image = processor.preprocessors.get("image")
    if not enabled or image is None:
        return processor
    return _replace(processor, image_draft_side=draft_side(image))


def draft_side(transform: Any) -> int:
    """The smallest shorter side a decoded image may have for ``transform`` to lose nothing: twice
    the largest output side of its resizing steps, and for a random resized crop also divided by
    the square root of its smallest area share (a crop of a tenth of the image needs the image
    about three times bigger). A ``ConfigError`` naming ``data.jpeg_draft`` when no step says."""
    source = getattr(transform, "source", transform)  # our tower preprocessors keep open_clip's Compose
    steps = getattr(source, "steps", None) or getattr(source, "transforms", None) or [source]
    side = 0.0
    for step in steps:
        size = getattr(step, "size", None)  # Resize, RandomResizedCrop, CenterCrop ...
        if size is None:
            continue
        sizes = [size] if isinstance(size, int) else [int(v) for v in size if v is not None]
        if not sizes:
            continue
        need = 2.0 * max(sizes)
        scale = getattr(step, "scale", None)
        if scale is not None and type(step).__name__ == "RandomResizedCrop":
            need /= math.sqrt(max(float(min(scale)), 1e-3))
        side = max(side, need)
    if not side:
        raise ConfigError(f"data.jpeg_draft: the image transform {type(transform).__name__} has no resize step "
                          f"whose size says how small a decoded image may be; set data.jpeg_draft: false")
    return int(math.ceil(side))
