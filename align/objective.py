"""The contrastive objective: model + one loss per modality pair -> named loss terms.

The training loop is the same for image-text, audio-text and three-way training: it calls the
objective and back-propagates ``out["loss"]``. ``objective(batch)`` encodes every present
modality, then computes each pair's loss on the rows that have both (per-modality masks). Its
``mode="embed"`` and ``mode="loss_from_embeddings"`` passes are what the cached (GradCache) step
in align/train/cached_step.py is made of.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from align.config import LossConfig, MatryoshkaConfig
from align.data.sample import MODALITIES, scatter_rows
from align.model import AlignModel, prefix
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


def zero_rows(objective: nn.Module, like: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """(size, dim) zeros of ``like``'s dtype and device on the graph of a parameter of
    ``objective`` that trains (with a zero gradient): what stands in for a modality a batch lacks,
    or for a whole empty batch. A backward through them then runs on every rank, and under DDP
    reaches the reducer's hooks, whatever the batch held. Not the temperature's graph: it has none
    under ``model.learn_temperature=false`` (the backward failed, and a rank skipping it would
    leave the others waiting in DDP's all-reduce). Plain zeros where nothing trains (evaluation)."""
    zeros = like.new_zeros(size, dim)
    trainable = next((p for p in objective.parameters() if p.requires_grad), None)
    if trainable is None or not torch.is_grad_enabled():
        return zeros
    return zeros + 0 * trainable.reshape(-1)[0].to(like.dtype)  # (size, dim)


@torch.no_grad()
def batch_top1(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Share of this rank's valid rows whose own pair is the best-scoring of the rank's valid B
    rows (A->B): a cheap training-health signal (rising from 1/n towards 1), NaN-free (0 when no
    row is valid). Another positive of the same group that outscores the pair counts as a miss."""
    rows = valid.nonzero(as_tuple=True)[0]
    if rows.numel() == 0:
        return a.new_zeros((), dtype=torch.float32)
    scores = a[rows].float() @ b[rows].float().T  # (n, n)
    hits = scores.argmax(dim=1) == torch.arange(rows.numel(), device=scores.device)
    return hits.float().mean()


def matryoshka_levels(config: Optional[MatryoshkaConfig], embed_dim: Optional[int]) -> List[Tuple[Optional[int], float]]:
    """[(dim, weight)] at which every pair's loss is computed: [(None, 1.0)] (full width only)
    when off; else each configured dim with its weight normalised to sum 1 (equal by default).
    The full width is written as None, so that it is used as it is, not truncated and renormalised."""
    if config is None or not config.dims:
        return [(None, 1.0)]
    weights = config.weights or [1.0] * len(config.dims)
    total = sum(weights)
    return [(None if dim == embed_dim else dim, weight / total) for dim, weight in zip(config.dims, weights)]


def nested_loss(levels: Sequence[Tuple[Optional[int], float]], loss_at: Callable[[Optional[int]], torch.Tensor],
                name: str, full_dim: int, terms: Dict[str, torch.Tensor]) -> torch.Tensor:
    """sum_d w_d * loss_at(d) over the Matryoshka ``levels`` (``matryoshka_levels``); with more
    than the full width, each level's value is also reported in ``terms`` as "<name>@<d>"."""
    total = None
    for dim, weight in levels:
        value = loss_at(dim)
        if dim is not None or len(levels) > 1:
            terms[f"{name}@{dim or full_dim}"] = value.detach()
        level = value if weight == 1.0 else weight * value
        total = level if total is None else total + level
    return total


class ContrastiveObjective(nn.Module):
    """Model + pair losses. ``forward(batch)`` returns {"loss": total, "<a>-<b>": term,
    "<a>-<b>/top1": batch_top1, ..., "logit_scale": s}.

    With ``matryoshka`` (``loss.matryoshka``) each pair's term is sum_d w_d * loss at the
    renormalised ``d``-prefix of the embeddings (see ``MatryoshkaConfig``), and every level is
    reported too as "<a>-<b>@<d>".

    The objective (not the bare model) is what the optimiser and DDP see, so learnable loss
    parameters (SigLIP's bias) train and synchronise with the towers.
    """

    def __init__(self, model: AlignModel, pair_losses: Dict[Pair, Tuple[nn.Module, float]],
                 matryoshka: Optional[MatryoshkaConfig] = None) -> None:
        super().__init__()
        self.model = model
        self.levels = matryoshka_levels(matryoshka, model.embed_dim)
        if model.embed_dim and any(dim is not None and dim > model.embed_dim for dim, _ in self.levels):
            raise ValueError(f"loss.matryoshka.dims {matryoshka.dims}: every dim must be <= model.embed_dim "
                             f"({model.embed_dim})")
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
        # The zeros hang on a trained parameter's graph (``zero_rows``): a backward through a
        # batch with nothing to encode still runs, and under DDP reaches the reducer's hooks.
        size = len(batch["ids"])
        for modality in self.model.towers:
            if modality not in out:
                dim = self.model.embed_dim or next((e.shape[-1] for e in out.values()), 1)
                out[modality] = zero_rows(self, self.model.log_logit_scale, size, dim)  # (B, D)
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

            def at(dim: Optional[int]) -> torch.Tensor:  # called at once, in this iteration
                if "negatives" in kwargs:
                    kwargs["negatives"] = prefix(embeddings["neg_text"], dim)
                # Every rank must call every pair's loss (it gathers across ranks), even with no valid rows.
                return loss(prefix(embeddings[a], dim), prefix(embeddings[b], dim), logit_scale=scale, valid=valid,
                            groups=groups, **kwargs)["loss"]

            pair_loss = nested_loss(self.levels, at, name, embeddings[a].shape[-1], terms)
            terms[name] = pair_loss.detach()
            terms[f"{name}/top1"] = batch_top1(embeddings[a], embeddings[b], valid)
            weighted = self.weights[name] * pair_loss
            total = weighted if total is None else total + weighted
        if total is None:
            raise ValueError(f"no loss to compute: the model's towers {self.model.modalities} form no pair")
        terms["loss"] = total
        terms["logit_scale"] = scale.detach()
        return terms

    def reusable(self, batch: Mapping[str, Any]) -> Dict[str, Any]:
        """``batch`` with its inputs ready to be embedded twice (``Tower.reusable``): what a
        cached step embeds."""
        return {**batch, "inputs": {m: self.model.reusable(m, x) for m, x in batch["inputs"].items()}}

    def own_lr(self) -> Dict[str, float]:
        """Parameters with their own learning rate (align/train/optim.py): none here."""
        return {}

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


class QueryProductObjective(nn.Module):
    """Search-log training (``data.search_log``, align/searchlog/pairs.py): each row is a query
    (text, photo or voice, through its modality's tower) and a product (its fields through their
    towers, fused as align/fields.py says: the item vector ``align embed`` makes). One loss
    between the two sides, ``loss.name`` with ``loss.params``: ``graded_infonce`` receives the
    rows' graded products (``item_keys``, ``positive_keys``, ``positive_grades``); any other
    loss gets the product's catalogue row as its group, so a product in two rows of a batch is
    never its own negative (under ``same_group: ignore``).

    ``forward(batch)`` returns {"loss", "query-product", "query-product/top1", "logit_scale"}
    and, with ``loss.matryoshka``, "query-product@<d>" per level, as ``ContrastiveObjective``.

    ``field_alignment`` (``loss.field_alignment``) w > 0 adds w * InfoNCE between each product's
    photo (and sound) fields and its text fields, fused per modality, over the batch's products
    (a product in two rows is not its own negative), reported as "fields:<m>-text". Search logs
    are mostly typed queries, so without it the text tower follows the queries and the image and
    audio towers drift away from it: photo and voice search get worse as text search improves.

    ``learn_field_weights`` (``loss.field_weights: learned``) trains the weights of the fields in
    the item vector with the towers, starting from the config's; they are reported as
    "field_weight/<f>", and the trainer writes them into the config it evaluates with and saves.
    """

    NAME = "query-product"

    def __init__(self, model: AlignModel, loss: nn.Module, fields: Mapping[str, Any],
                 matryoshka: Optional[MatryoshkaConfig] = None, field_alignment: float = 0.0,
                 learn_field_weights: bool = False, field_weights_lr: float = 0.01) -> None:
        super().__init__()
        import inspect

        from align.fields import field_weights

        if not (field_alignment >= 0):
            raise ValueError(f"loss.field_alignment must be >= 0, got {field_alignment}")
        self.model = model
        self.loss = loss
        self.fields = {name: spec.modality for name, spec in fields.items()}
        self.field_weights = field_weights(fields)
        # loss.field_weights: learned: the fields of positive weight get log-weights, trained with
        # the towers (a field at 0 stays out); the weighted mean is scale-free, so only their
        # ratios matter. In the state dict, so a resumed run goes on from where it stopped.
        self.learned = [name for name, w in self.field_weights.items() if w > 0] if learn_field_weights else []
        if self.learned:
            self.field_log_weights = nn.Parameter(torch.tensor([self.field_weights[n] for n in self.learned]).log())
        self.field_weights_lr = float(field_weights_lr)
        self.levels = matryoshka_levels(matryoshka, model.embed_dim)
        self.graded = "item_keys" in inspect.signature(loss.forward).parameters
        self.field_alignment = float(field_alignment)
        modalities = set(self.fields.values())
        # every rank builds the same pairs, so every rank calls the same gathering losses
        self.aligned = sorted(m for m in modalities if m != "text") if "text" in modalities and field_alignment else []
        self.alignment_loss = build_loss("infonce", {"same_group": "ignore"}) if self.aligned else None

    def _zeros(self, size: int) -> torch.Tensor:
        return zero_rows(self, self.model.log_logit_scale, size, self.model.embed_dim)  # (B, D), on the graph

    def weights(self) -> Dict[str, Any]:
        """Each field's weight in the item vector: the config's, or the learned ones (0-dim tensors
        on the graph)."""
        if not self.learned:
            return self.field_weights
        return {**self.field_weights, **dict(zip(self.learned, self.field_log_weights.exp().unbind(0)))}

    def own_lr(self) -> Dict[str, float]:
        """Parameters with their own learning rate (align/train/optim.py): the field log-weights."""
        return {"field_log_weights": self.field_weights_lr} if self.learned else {}

    def learned_weights(self) -> Dict[str, float]:
        """The learned weights as numbers (empty unless ``loss.field_weights: learned``): what the
        trainer writes into ``model.fields.<f>.weight`` before it evaluates or saves."""
        return {name: float(w) for name, w in zip(self.learned, self.field_log_weights.detach().exp().tolist())}

    def embed(self, batch: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
        """{"query": (B, D), "product": (B, D), "query_mask": (B,), "product_mask": (B,)}."""
        from align.fields import fuse

        size = len(batch["ids"])
        query = self._zeros(size)
        for modality, x in batch["inputs"].items():
            query = query + scatter_rows(self.model.encode(modality, x), batch["masks"][modality])
        query_mask = torch.zeros(size, dtype=torch.bool, device=query.device)
        for mask in batch["masks"].values():
            query_mask = query_mask | mask.to(query.device)
        vectors, masks = {}, {}
        for name, modality in self.fields.items():
            mask = batch["fields"]["masks"].get(name)
            if mask is None or not bool(mask.any()):
                vectors[name], masks[name] = self._zeros(size), torch.zeros(size, dtype=torch.bool, device=query.device)
                continue
            vectors[name] = scatter_rows(self.model.encode(modality, batch["fields"]["inputs"][name]), mask)
            masks[name] = mask.to(query.device)
        weights = self.weights()
        product, product_mask = fuse(vectors, masks, weights)
        out = {"query": query, "product": product.to(query.dtype), "query_mask": query_mask,
               "product_mask": product_mask}
        for modality in (["text"] + self.aligned) if self.aligned else []:  # per modality, for field_alignment
            names = [name for name, m in self.fields.items() if m == modality]
            # the weights as they stand: learned ones follow the search loss, not this one
            fused, mask = fuse({n: vectors[n] for n in names}, {n: masks[n] for n in names},
                               {n: weights[n].detach() if torch.is_tensor(weights[n]) else weights[n] for n in names})
            out[f"fields:{modality}"], out[f"fields:{modality}_mask"] = fused.to(query.dtype), mask
        return out

    def loss_from_embeddings(self, embeddings: Mapping[str, torch.Tensor], batch: Mapping[str, Any]
                             ) -> Dict[str, torch.Tensor]:
        scale = self.model.logit_scale()
        valid = embeddings["query_mask"] & embeddings["product_mask"]
        kwargs: Dict[str, Any] = {"valid": valid}
        if self.graded:
            kwargs.update(item_keys=batch["item_keys"], positive_keys=batch["positive_keys"],
                          positive_grades=batch["positive_grades"])
        else:
            kwargs["groups"] = batch["groups"]
        terms: Dict[str, torch.Tensor] = {}
        query, product = embeddings["query"], embeddings["product"]
        total = nested_loss(self.levels, lambda dim: self.loss(prefix(query, dim), prefix(product, dim),
                                                               logit_scale=scale, **kwargs)["loss"],
                            self.NAME, query.shape[-1], terms)
        terms[self.NAME] = total.detach()
        terms[f"{self.NAME}/top1"] = batch_top1(query, product, valid)
        for modality in self.aligned:
            text, other = embeddings["fields:text"], embeddings[f"fields:{modality}"]
            both = embeddings["fields:text_mask"] & embeddings[f"fields:{modality}_mask"]
            term = self.alignment_loss(other, text, logit_scale=scale, valid=both, groups=batch["groups"])["loss"]
            terms[f"fields:{modality}-text"] = term.detach()
            total = total + self.field_alignment * term
        terms["loss"] = total
        terms["logit_scale"] = scale.detach()
        if self.learned:
            for name, weight in zip(self.learned, self.field_log_weights.detach().exp().unbind(0)):
                terms[f"field_weight/{name}"] = weight
        return terms

    def forward(self, batch: Mapping[str, Any], mode: str = "loss", embeddings: Optional[Mapping] = None):
        """``mode="loss"``: the step's loss terms; ``"embed"``: the two sides' vectors."""
        if mode == "embed":
            return self.embed(batch)
        if mode == "loss_from_embeddings":
            return self.loss_from_embeddings(embeddings, batch)
        if mode != "loss":
            raise ValueError(f"unknown mode {mode!r}")
        return self.loss_from_embeddings(self.embed(batch), batch)
