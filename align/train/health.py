"""Training-health figures the loop logs: samples/s of training alone, the step's loss terms as
one process on the whole global batch would report them, and gradient norms per tower."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Dict

import torch

if TYPE_CHECKING:
    from align.objective import ContrastiveObjective


class SampleClock:
    """Samples/s over a log window, measuring training only (data wait + step, as open_clip's
    log does): evaluation and checkpointing run ``off_the_clock``."""

    def __init__(self) -> None:
        self.samples, self.start = 0, time.time()

    def rate(self) -> float:
        """Samples/s since the last call; starts the next window."""
        rate = self.samples / max(time.time() - self.start, 1e-9)
        self.samples, self.start = 0, time.time()
        return rate

    def off_the_clock(self, work: Callable, *args: Any) -> Any:
        paused = time.time()
        result = work(*args)
        self.start += time.time() - paused
        return result


def gradient_norms(objective: "ContrastiveObjective") -> Dict[str, torch.Tensor]:
    """L2 norms of the current gradients: all of them, and each tower's."""
    def norm(parameters) -> torch.Tensor:
        grads = [p.grad for p in parameters if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads) if grads else objective.model.log_logit_scale.new_zeros(())

    norms = {"grad_norm": norm(objective.parameters())}
    for modality, tower in objective.model.towers.items():
        norms[f"grad_norm/{modality}"] = norm(tower.parameters())
    return norms


def mean_over_processes(accelerator, terms: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """The step's loss terms as one process on the whole global batch would report them.

    Under gathering each rank's loss is its share, scaled so that the mean over ranks is the
    global value (align/losses/pairs.py); rank 0's own number alone would be a partial loss.
    One all-reduce of the stacked scalars; every rank must call this at the same step.
    """
    names = list(terms)
    values = accelerator.reduce(torch.stack([terms[k].float() for k in names]), reduction="mean")  # (n_terms,)
    return dict(zip(names, values.tolist()))
