"""The learning-rate multiplier shared by ``align train`` and ``align rec-train``: linear warm-up,
then cosine decay (or none). A leaf: both trainers import it, neither imports the other."""
from __future__ import annotations

import math


def warmup_cosine(step: int, total_steps: int, warmup_steps: float, min_ratio: float = 0.0,
                  decay: bool = True) -> float:
    """Linear warm-up to 1 over ``warmup_steps``, then cosine to ``min_ratio`` at ``total_steps``
    (``decay=False``: stay at 1). ``warmup_steps`` may be fractional (a warm-up counted in another
    launch's steps, align/train/optim.py): the ramp then stops at 1."""
    if warmup_steps > 0 and step < warmup_steps:
        return min(1.0, (step + 1) / warmup_steps)
    if not decay:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
