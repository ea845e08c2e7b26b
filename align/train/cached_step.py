"""The cached step: exact large-batch accumulation in the manner of GradCache.

Gao et al. 2021, https://arxiv.org/abs/2101.06983. All micro-batches are embedded without
graphs, the loss is computed once over the whole batch (so every sample sees every other as a
negative), then each micro-batch is re-encoded with its RNG state restored (same dropout) and
back-propagated with the cached embedding gradients. Plain gradient accumulation would only
ever contrast samples within one micro-batch.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, List, Mapping

import torch


def concat_batches(micro_batches: List[Mapping[str, Any]]) -> Dict[str, Any]:
    """Concatenate masks and groups of micro-batches (inputs are not needed by the loss)."""
    out: Dict[str, Any] = {"masks": {}, "groups": torch.cat([b["groups"] for b in micro_batches])}
    for modality in micro_batches[0]["masks"]:
        out["masks"][modality] = torch.cat([b["masks"][modality] for b in micro_batches])
    if all(b.get("negatives") is not None for b in micro_batches):
        out["negatives"] = {"mask": torch.cat([b["negatives"]["mask"] for b in micro_batches])}
    return out


def cached_step(objective: Callable, micro_batches: List[Mapping[str, Any]],
                backward: Callable[[torch.Tensor], None],
                no_sync: Callable[[], contextlib.AbstractContextManager]) -> Dict[str, torch.Tensor]:
    """One exact large-batch step over ``micro_batches`` (GradCache); gradients are left in .grad.

    ``objective`` is the (possibly DDP-wrapped) ContrastiveObjective; ``backward`` is e.g.
    ``accelerator.backward``; ``no_sync`` returns the context that defers DDP's all-reduce. The
    all-reduce happens once, on the last re-encoding pass.
    """
    # 1. Embed every micro-batch without a graph, remembering the RNG state each one started with.
    rng_states, cached = [], []
    with torch.no_grad():
        for micro in micro_batches:
            rng_states.append(_rng_state())
            cached.append(objective(micro, mode="embed"))
    keys = list(cached[0].keys())
    sizes = [len(m["ids"]) for m in micro_batches]
    full = {k: torch.cat([c[k] for c in cached]).requires_grad_(True) for k in keys}  # (k*B, D)

    # 2. The loss once over the whole batch; gradients w.r.t. the embeddings are cached.
    with no_sync():
        terms = objective(concat_batches(micro_batches), mode="loss_from_embeddings", embeddings=full)
        backward(terms["loss"])
    grads = {k: torch.split(full[k].grad, sizes) for k in keys}

    # 3. Re-encode each micro-batch with its RNG state and push the cached gradients through it
    #    (vector-Jacobian product). The cached gradients already carry any fp16 loss scale, so
    #    this pass uses plain autograd rather than ``backward``.
    for index, micro in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        with contextlib.nullcontext() if last else no_sync():
            with _restored_rng(rng_states[index]):
                embedded = objective(micro, mode="embed")
            torch.autograd.backward([embedded[k] for k in keys], [grads[k][index] for k in keys])
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
