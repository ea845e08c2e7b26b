"""align: text, image and audio encoders aligned in one embedding space.

The public names load on first use, so ``align --help`` and ``align prep`` start without torch::

    from align import load_model
    model = load_model("runs/demo/checkpoints/step-00000120")
"""
from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "AlignModel": "align.model",
    "build_model": "align.model",
    "Config": "align.config",
    "load_config": "align.config",
    "ConfigError": "align.errors",
    "RunError": "align.errors",
    "load_model": "align.loading",
}

__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'align' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)


def __dir__() -> list:
    return sorted(list(globals()) + __all__)
