"""The cached step: exact large-batch accumulation in the manner of GradCache.

Gao et al. 2021, https://arxiv.org/abs/2101.06983. All micro-batches are embedded without
graphs, the loss is computed once over the whole batch (so every sample sees every other as a
negative), then each micro-batch is re-encoded with its RNG state restored (same dropout) and
back-propagated with the cached embedding gradients. Plain gradient accumulation would only
ever contrast samples within one micro-batch.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
import torch.nn.functional as F


def concat_batches(micro_batches: List[Mapping[str, Any]], negatives: Optional[int] = None) -> Dict[str, Any]:
    """Concatenate masks and groups of micro-batches (inputs are not needed by the loss); with
    ``negatives`` = K, every micro-batch's (B, K_i) negatives mask is padded to (B, K)."""
    out: Dict[str, Any] = {"masks": {}, "groups": torch.cat([b["groups"] for b in micro_batches])}
    for modality in micro_batches[0]["masks"]:
        out["masks"][modality] = torch.cat([b["masks"][modality] for b in micro_batches])
    if negatives is not None:
        out["negatives"] = {"mask": torch.cat([_negatives_mask(b, negatives) for b in micro_batches])}
    return out


def most_negatives(micro_batches: List[Mapping[str, Any]]) -> Optional[int]:
    """K, the widest micro-batch's negatives; None when none has any. A batch whose samples were
    all bad has no negatives even when the others do."""
    widths = [b["negatives"]["mask"].shape[1] for b in micro_batches if b.get("negatives") is not None]
    return max(widths) if widths else None


def _negatives_mask(batch: Mapping[str, Any], negatives: int) -> torch.Tensor:
    if batch.get("negatives") is None:
        return batch["groups"].new_zeros(len(batch["ids"]), negatives, dtype=torch.bool)  # (B, K)
    mask = batch["negatives"]["mask"]  # (B, K_i)
    return F.pad(mask, (0, negatives - mask.shape[1]), value=False)  # (B, K)


def with_negatives(embedded: Dict[str, torch.Tensor], negatives: Optional[int]) -> Dict[str, torch.Tensor]:
    """``embedded`` with "neg_text" as (B, K, D): padded with zero rows, or all zeros for a
    batch without negatives (an empty one: (0, K, D)), so that every micro-batch has the same keys."""
    if negatives is None or "text" not in embedded:
        return embedded
    text = embedded["text"]  # (B, D)
    found = embedded.get("neg_text", text.new_zeros(text.shape[0], 0, text.shape[-1]))  # (B, K_i, D)
    return {**embedded, "neg_text": F.pad(found, (0, 0, 0, negatives - found.shape[1]))}  # (B, K, D)


def cached_step(objective: Callable, micro_batches: List[Mapping[str, Any]],
                backward: Callable[[torch.Tensor], None],
                no_sync: Callable[[], contextlib.AbstractContextManager],
                reusable: Optional[Callable[[Mapping[str, Any]], Mapping[str, Any]]] = None
                ) -> Dict[str, torch.Tensor]:
    """One exact large-batch step over ``micro_batches`` (GradCache); gradients are left in .grad.

    ``objective`` is the (possibly DDP-wrapped) ContrastiveObjective; ``backward`` is e.g.
    ``accelerator.backward``; ``no_sync`` returns the context that defers DDP's all-reduce. The
    all-reduce happens once, on the last re-encoding pass. ``reusable`` (the unwrapped
    objective's) readies each micro-batch for its two passes first: JPEGs decoded once, not twice.
    """
    if reusable is not None:
        micro_batches = [reusable(micro) for micro in micro_batches]
    # 1. Embed every micro-batch without a graph, remembering the RNG state each one started with.
    rng_states, cached = [], []
    with torch.no_grad():
        for micro in micro_batches:
            rng_states.append(_rng_state())
            cached.append(objective(micro, mode="embed"))
    negatives = most_negatives(micro_batches)
    cached = [with_negatives(c, negatives) for c in cached]
    keys = list(cached[0].keys())
    sizes = [len(m["ids"]) for m in micro_batches]
    full = {k: torch.cat([c[k] for c in cached]).requires_grad_(True) for k in keys}  # (k*B, D)

    # 2. The loss once over the whole batch; gradients w.r.t. the embeddings are cached.
    with no_sync():
        terms = objective(concat_batches(micro_batches, negatives), mode="loss_from_embeddings", embeddings=full)
        backward(terms["loss"])
    grads = {k: torch.split(full[k].grad, sizes) for k in keys}

    # 3. Re-encode each micro-batch with its RNG state and push the cached gradients through it
    #    (vector-Jacobian product). The cached gradients already carry any fp16 loss scale, so
    #    this pass uses plain autograd rather than ``backward``. Zero rows (no negatives, a
    #    micro-batch that lost every sample) have no graph and nothing to pass on.
    for index, micro in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        with contextlib.nullcontext() if last else no_sync():
            with _restored_rng(rng_states[index]):
                embedded = with_negatives(objective(micro, mode="embed"), negatives)
            keep = [k for k in keys if embedded[k].requires_grad]
            if keep:  # none: an empty micro-batch under a fixed temperature
                torch.autograd.backward([embedded[k] for k in keep], [grads[k][index] for k in keep])
    return {k: v.detach() for k, v in terms.items()}


def _rng_state() -> Dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


@contextlib.contextmanager
def _restored_rng(state: Dict[str, Any]):
    saved = _rng_state()
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
    try:
        yield
    finally:
        torch.set_rng_state(saved["cpu"])
        if "cuda" in saved:
            torch.cuda.set_rng_state_all(saved["cuda"])
