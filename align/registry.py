"""Named registries for the extension points: towers and losses.

Each registry maps a config name (``model.towers.image.type: open_clip_image``, ``loss.name:
siglip``) to a class. The built-ins are listed here, in one place, as ``module:Class`` and
imported on first use, so that reading a config or ``align --help`` loads no model code and no
module of ours imports the registry back. Add your own with ``TOWERS.register("name")(cls)``.
Tests iterate over ``names()`` so every registered entry is exercised.
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Iterator, List, Mapping, TypeVar

T = TypeVar("T")


class Registry:
    """A name -> class table for one kind of component; built-ins load lazily."""

    def __init__(self, kind: str, builtins: Mapping[str, str]) -> None:
        self.kind = kind
        self._builtins = dict(builtins)  # name -> "module:Class", imported on first get
        self._entries: Dict[str, Callable] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(factory: T) -> T:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = factory
            return factory

        return add

    def get(self, name: str) -> Callable:
        if name not in self._entries and name in self._builtins:
            module, _, attribute = self._builtins[name].partition(":")
            self._entries[name] = getattr(importlib.import_module(module), attribute)
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names()) or 'none'}") from None

    def names(self) -> List[str]:
        return sorted(set(self._entries) | set(self._builtins))

    def __contains__(self, name: str) -> bool:
        return name in self._entries or name in self._builtins

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


TOWERS = Registry("tower", {
    "open_clip_image": "align.towers.open_clip:OpenClipImageTower",
    "open_clip_text": "align.towers.open_clip:OpenClipTextTower",
    "hf_text": "align.towers.text:HFTextTower",
    "audio_transformer": "align.towers.audio:AudioTransformerTower",
    "hf_audio": "align.towers.audio:HFAudioTower",
})
LOSSES = Registry("loss", {
    "infonce": "align.losses.infonce:InfoNCE",
    "infonce_tiled": "align.losses.infonce_tiled:InfoNCETiled",
    "siglip": "align.losses.siglip:SigLIP",
    "siglip_tiled": "align.losses.siglip_tiled:SigLIPTiled",
    "hcl": "align.losses.hcl:HardNegativeInfoNCE",
    "vsepp": "align.losses.vsepp:MaxViolation",
    "sampled_softmax": "align.losses.sampled_softmax:SampledSoftmax",
    "graded_infonce": "align.losses.graded_infonce:GradedInfoNCE",
    "graded_infonce_tiled": "align.losses.graded_tiled:GradedInfoNCETiled",
})
