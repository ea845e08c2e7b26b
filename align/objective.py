"""The contrastive objective: model + one loss per modality pair -> named loss terms.

The training loop is the same for image-text, audio-text and three-way training: it calls the
objective and back-propagates ``out["loss"]``. Two ways to compute a step:

* ``objective(batch)``: encode every present modality, then each pair's loss on the rows that
  have both (per-modality masks).
* ``cached_step(micro_batches, backward, no_sync)``: exact large-batch accumulation in the
  manner of GradCache (Gao et al. 2021, https://arxiv.org/abs/2101.06983). All micro-batches are
  embedded without graphs, the loss is computed once over the whole batch (so every sample sees
  every other as a negative), then each micro-batch is re-encoded with its RNG state restored
  (same dropout) and back-propagated with the cached embedding gradients. Plain gradient
  accumulation would only ever contrast samples within one micro-batch.
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from align.config import LossConfig
from align.data.sample import MODALITIES, scatter_rows
from align.model import AlignModel
from align.registry import LOSSES

Pair = Tuple[str, str]


def canonical_pair(name: str) -> Pair:
    """``"image-text"`` -> ``("text", "image")``: pairs are ordered as in MODALITIES."""
    a, b = name.split("-")
    return (a, b) if MODALITIES.index(a) < MODALITIES.index(b) else (b, a)


def build_loss(name: str, params: Any = None) -> nn.Module:
    """A registered loss from its ``Config`` (a mapping of its fields, or None for the defaults).
    ``load_config`` has already checked names and values, so a config file never fails here."""
    loss_cls = LOSSES.get(name)
    if params is None or isinstance(params, Mapping):
        params = loss_cls.Config(**(params or {}))
    return loss_cls.from_config(params)


def build_pair_losses(modalities: List[str], config: LossConfig) -> Dict[Pair, Tuple[nn.Module, float]]:
    """(a, b) -> (loss module, weight) for every pair of the model's modalities with weight > 0.
    A pair listed in ``loss.pairs`` uses its own name and params (resolved by ``load_config``)."""
    ordered = [m for m in MODALITIES if m in modalities]
    overrides = {canonical_pair(k): v for k, v in config.pairs.items()}
    losses = {}
    for pair in itertools.combinations(ordered, 2):
        override = overrides.get(pair)
        weight = override.weight if override else 1.0
        if weight <= 0:
            continue
        name, params = (override.name or config.name, override.params) if override else (config.name, config.params)
        losses[pair] = (build_loss(name, params), weight)
    return losses


class ContrastiveObjective(nn.Module):
    """Model + pair losses. ``forward(batch)`` returns {"loss": total, "<a>-<b>": term, ...}.

    The objective (not the bare model) is what the optimiser and DDP see, so learnable loss
    parameters (SigLIP's bias) train and synchronise with the towers.
    """

    def __init__(self, model: AlignModel, pair_losses: Dict[Pair, Tuple[nn.Module, float]]) -> None:
        super().__init__()
        self.model = model
        self.losses = nn.ModuleDict({f"{a}-{b}": loss for (a, b), (loss, _) in pair_losses.items()})
        self.weights = {f"{a}-{b}": weight for (a, b), (_, weight) in pair_losses.items()}

    # ------------------------------------------------------------------ pieces

    def embed(self, batch: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
        """{modality: (B, D)} with zero rows where missing, plus "neg_text": (B, K, D) if any."""
        masks = batch["masks"]
        out = {m: scatter_rows(self.model.encode(m, x), masks[m]) for m, x in batch["inputs"].items()
               if m in self.model.towers}
        # A modality absent from this batch (or an empty batch, which an exactly-once epoch can
        # hand a rank) still gets zero rows: every rank must call every pair's loss, which
        # gathers across ranks, whatever its own batch holds.
        size = len(batch["ids"])
        for modality in self.model.towers:
            if modality not in out:
                dim = self.model.embed_dim or next((e.shape[-1] for e in out.values()), 1)
                out[modality] = self.model.logit_scale().detach().new_zeros(size, dim)
        negatives = batch.get("negatives")
        if negatives is not None and "text" in self.model.towers:
            mask = negatives["mask"]  # (B, K)
            tokens = negatives["text"]
            flat = {k: v[mask] for k, v in tokens.items()} if isinstance(tokens, dict) else tokens[mask]
            encoded = self.model.encode("text", flat) if mask.any() else None  # (n_neg, D)
            reference = out["text"]  # (B, D)
            full = reference.new_zeros(*mask.shape, reference.shape[-1])  # (B, K, D)
            if encoded is not None:
                full = full.index_put(tuple(mask.nonzero(as_tuple=True)), encoded)
            out["neg_text"] = full
        return out

    def loss_from_embeddings(self, embeddings: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
                             groups: Optional[torch.Tensor], negatives_mask: Optional[torch.Tensor] = None
                             ) -> Dict[str, torch.Tensor]:
        scale = self.model.logit_scale()
        terms: Dict[str, torch.Tensor] = {}
        total = None
        for name, loss in self.losses.items():
            a, b = name.split("-")
            valid = masks[a] & masks[b]  # (B,) rows that have both modalities
            kwargs = {}
            if "neg_text" in embeddings and "text" in (a, b):
                a, b = (b, a) if a == "text" else (a, b)  # explicit negatives are candidates for text
                kwargs = {"negatives": embeddings["neg_text"], "negatives_mask": negatives_mask & valid[:, None]}
            # Every rank must call every pair's loss (it gathers across ranks), even with no valid rows.
            out = loss(embeddings[a], embeddings[b], logit_scale=scale, valid=valid, groups=groups, **kwargs)
            terms[name] = out["loss"].detach()
            weighted = self.weights[name] * out["loss"]
            total = weighted if total is None else total + weighted
        if total is None:
            raise ValueError(f"no loss to compute: the model's towers {self.model.modalities} form no pair")
        terms["loss"] = total
        terms["logit_scale"] = scale.detach()
        return terms

    # ------------------------------------------------------------------ steps

    def forward(self, batch: Mapping[str, Any], mode: str = "loss", embeddings: Optional[Mapping] = None):
        """``mode="loss"``: the step's loss terms; ``"embed"``: embeddings only;
        ``"loss_from_embeddings"``: the loss on given (cached) embeddings. Modes exist so that
        every pass of the cached step runs through ``forward`` (and so through DDP's hooks)."""
        if mode == "embed":
            return self.embed(batch)
        negatives_mask = batch.get("negatives", {}).get("mask") if batch.get("negatives") else None
        if mode == "loss_from_embeddings":
            return self.loss_from_embeddings(embeddings, batch["masks"], batch.get("groups"), negatives_mask)
        if mode != "loss":
            raise ValueError(f"unknown mode {mode!r}")
        return self.loss_from_embeddings(self.embed(batch), batch["masks"], batch.get("groups"), negatives_mask)


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
