"""The recommender head: a small two-tower model on top of the frozen aligned item space.

Item side: the item's aligned vector (``align embed``) through a residual MLP adapter, plus,
for items that had training interactions, a learned ID vector. During training the ID vector
is dropped for a share ``id_dropout`` of the rows, so the adapter alone must score an item well:
that is what scores a cold item (no ID, or one added by ``align embed`` after training) without
retraining (DropoutNet, Volkovs et al. 2017, https://papers.nips.cc/paper/7081).

User side: the user's most recent items (their head vectors), left-padded to ``history``:
  * ``mean``: masked mean, then a residual MLP;
  * ``sasrec``: a causal transformer with learned positions, read at the last position
    (Kang & McAuley 2018, https://arxiv.org/abs/1808.09781).
A user with no history gets a learned vector (the model's "anyone" taste).

Both sides end L2-normalised; the score is their cosine (times 1 / temperature in the loss).

With ``head.fusion: learned`` the item tower first fuses the item's modality vectors itself
(``ModalityFusion``: one softmax weight per modality, trained with the rest of the head from the
interactions), where ``given`` reads the fused vector ``align embed`` computed. The weights start
equal, so a learned head starts from exactly the vector ``align embed`` fuses.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from align.rec.config import HeadConfig


# Saved beside the head by `align rec-train`: (M, dim) unit vectors of a seeded sample of training
# users at the cut-off, what the hub penalty measures each item against (align/rec/rerank.py).
REFERENCE_USERS_FILE = "reference_users.safetensors"


class ResidualMLP(nn.Module):
    """x -> proj(x) + MLP(x): the projection keeps the aligned geometry, the MLP bends it."""

    def __init__(self, dim_in: int, dim_out: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=False)
        self.mlp = nn.Sequential(nn.Linear(dim_in, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim_out))

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x) + self.mlp(x)


class ModalityFusion(nn.Module):
    """A learned weighted mean of an item's modality vectors, one logit per modality:

        fused_i = normalize( sum_m [i has m] w_m v_im / sum_m [i has m] w_m ),  w = softmax(logits),
        v_im = normalize(row)

    the formula of ``align.index.vectors.fuse`` with weights that train. The logits start at zero
    (equal weights): training starts from the plain mean ``align embed`` writes. An item with no
    modality gets a zero vector, as ``fuse`` gives it. The softmax keeps the weights positive and
    summing to 1, so they read as each modality's share.
    """

    def __init__(self, modalities: Sequence[str]) -> None:
        super().__init__()
        self.modalities = tuple(modalities)
        self.logits = nn.Parameter(torch.zeros(len(self.modalities)))

    def weights(self) -> Tensor:
        """(M,) the modalities' weights, positive, summing to 1."""
        return torch.softmax(self.logits, dim=0)

    def named_weights(self) -> Dict[str, float]:
        """Modality name -> its weight (what the run summary reports)."""
        return {name: float(w) for name, w in zip(self.modalities, self.weights().detach().cpu())}

    def forward(self, vectors: Tensor, masks: Tensor) -> Tensor:
        """vectors (..., M, D), masks (..., M) bool or 0/1 -> (..., D) unit rows (zero without a modality)."""
        weight = masks.to(vectors.dtype) * self.weights().to(vectors.dtype)  # (..., M)
        total = (weight.unsqueeze(-1) * F.normalize(vectors, dim=-1)).sum(-2)  # (..., D)
        mean = total / weight.sum(-1, keepdim=True).clamp_min(1e-12)
        return F.normalize(mean, dim=-1)


def fusion_layout(feature_dim: int, modalities: int, extras: int) -> int:
    """The modality width D of learned-fusion features [M*D vectors | M masks | extras] of width
    ``feature_dim`` (``align.rec.data.item_features``)."""
    dim, rest = divmod(feature_dim - extras, modalities)
    if rest or dim < 2:
        raise ValueError(f"{feature_dim} feature columns do not hold {modalities} modality vectors, their masks "
                         f"and {extras} more columns")
    return dim - 1


class ItemTower(nn.Module):
    """Content adapter plus an optional per-item ID vector (zero for items without one); with
    learned fusion, the content is first fused from the item's modality vectors."""

    def __init__(self, content_dim: int, n_ids: int, config: HeadConfig, modalities: Sequence[str] = ()) -> None:
        super().__init__()
        self.fusion = None
        if config.fusion == "learned":
            if len(modalities) < 2:
                raise ValueError("head.fusion=learned needs the names of two or more modalities")
            self.extras = int(config.popularity_feature)  # the columns after the masks (popularity)
            self.modality_dim = fusion_layout(content_dim, len(modalities), self.extras)
            self.fusion = ModalityFusion(modalities)
            content_dim = self.modality_dim + self.extras  # the adapter reads [fused | extras], as for given
        self.adapter = ResidualMLP(content_dim, config.dim, config.hidden, config.dropout)
        self.id_dropout = config.id_dropout
        self.ids = nn.Embedding(max(n_ids, 1), config.dim) if config.id_embeddings else None
        if self.ids is not None:
            nn.init.zeros_(self.ids.weight)  # a new ID starts as "content only"

    def forward(self, content: Tensor, id_rows: Tensor) -> Tensor:
        """content (..., Dc), id_rows (...) int64, -1 = no ID -> (..., dim) unit vectors."""
        x = self.adapter(self.fuse(content))
        if self.ids is not None:
            keep = id_rows >= 0
            if self.training and self.id_dropout > 0:
                keep = keep & (torch.rand(id_rows.shape, device=id_rows.device) >= self.id_dropout)
            x = x + self.ids(id_rows.clamp(min=0)) * keep.unsqueeze(-1).to(x.dtype)
        return F.normalize(x, dim=-1)


    def fuse(self, content: Tensor) -> Tensor:
        """Learned fusion: (..., M*D + M + extras) -> (..., D + extras) [fused | extras]; given: as is."""
        if self.fusion is None:
            return content
        m, d = len(self.fusion.modalities), self.modality_dim
        vectors = content[..., :m * d].unflatten(-1, (m, d))  # (..., M, D)
        masks = content[..., m * d:m * d + m]  # (..., M) 0/1
        return torch.cat([self.fusion(vectors, masks), content[..., m * d + m:]], dim=-1)


class MeanUserEncoder(nn.Module):
    """Masked mean of the history's item vectors plus a learned vector for the history's length,
    then a residual MLP. The length tells the MLP how far to trust the mean: a user with one
    item is mostly "anyone" (popular items), one with twenty is their own taste."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.mlp = ResidualMLP(config.dim, config.dim, config.hidden, config.dropout)
        self.lengths = nn.Embedding(config.history + 1, config.dim)
        nn.init.normal_(self.lengths.weight, std=0.02)
        self.empty = nn.Parameter(torch.randn(config.dim) * 0.02)

    def forward(self, items: Tensor, mask: Tensor) -> Tensor:
        """items (B, L, dim), mask (B, L) bool -> (B, dim) unit vectors."""
        counts = mask.sum(1, keepdim=True)  # (B, 1)
        mean = (items * mask.unsqueeze(-1)).sum(1) / counts.clamp(min=1)
        users = self.mlp(mean + self.lengths(counts.squeeze(1).clamp(max=self.lengths.num_embeddings - 1)))
        users = torch.where(counts > 0, users, self.empty.expand_as(users))
        return F.normalize(users, dim=-1)


class SASRecUserEncoder(nn.Module):
    """Causal transformer over the left-padded history, read at the most recent position."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.positions = nn.Parameter(torch.randn(config.history, config.dim) * 0.02)
        layer = nn.TransformerEncoderLayer(config.dim, config.heads, 2 * config.dim, config.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.dim)
        self.empty = nn.Parameter(torch.randn(config.dim) * 0.02)
        self.register_buffer("causal", torch.triu(torch.ones(config.history, config.history, dtype=torch.bool), 1),
                             persistent=False)

    def forward(self, items: Tensor, mask: Tensor) -> Tensor:
        """items (B, L, dim), mask (B, L) bool, left-padded -> (B, dim) unit vectors."""
        length = items.shape[1]
        empty = ~mask.any(1)  # (B,)
        # A row with no item at all would attend to nothing (NaN): let it see its last slot,
        # whose output is replaced by the empty-history vector below.
        mask = mask.clone()
        mask[empty, -1] = True
        x = items + self.positions[-length:]  # right-aligned: the last position is the newest item
        x = self.blocks(x, mask=self.causal[:length, :length], src_key_padding_mask=~mask)  # (B, L, dim)
        users = self.norm(x[:, -1])
        users = torch.where(empty[:, None], self.empty.expand_as(users), users)
        return F.normalize(users, dim=-1)


class RecHead(nn.Module):
    """Item tower + user encoder; ``score = <user, item>`` of unit vectors."""

    def __init__(self, content_dim: int, n_ids: int, config: HeadConfig, modalities: Sequence[str] = ()) -> None:
        """``content_dim``: the width of ``item_features``; ``modalities``: what a learned fusion weighs, in
        the order of the features' modality vectors (ignored with ``head.fusion: given``)."""
        super().__init__()
        self.config = config
        self.items = ItemTower(content_dim, n_ids, config, modalities)
        self.users = MeanUserEncoder(config) if config.user_encoder == "mean" else SASRecUserEncoder(config)

    def encode_items(self, content: Tensor, id_rows: Tensor) -> Tensor:
        """(N, Dc), (N,) -> (N, dim)."""
        return self.items(content, id_rows)

    def fusion_weights(self) -> Dict[str, float]:
        """Learned fusion: modality -> weight (summing to 1); given: empty."""
        return {} if self.items.fusion is None else self.items.fusion.named_weights()

    def encode_users(self, history_content: Tensor, history_ids: Tensor, mask: Tensor) -> Tensor:
        """history_content (B, L, Dc), history_ids (B, L) (-1 = no ID), mask (B, L) -> (B, dim)."""
        return self.users(self.items(history_content, history_ids), mask)

    def forward(self, history: Tensor, targets: Tensor, content: Tensor, id_rows: Tensor) -> Tuple[Tensor, Tensor]:
        """One training batch's two sides: (users (B, dim), targets (T, dim)).

        history (B, L) item codes, -1 = padding; targets (T,) item codes (the batch's next items,
        or every item for a full softmax); content (N, Dc) and id_rows (N,) of the catalogue.
        Each distinct item of the batch goes through the item tower once (a batch repeats
        popular items many times), and its ID is dropped or kept once for the whole batch.
        """
        mask = history >= 0
        slots = history[mask]  # (S,) the history's item codes
        items, inverse = torch.cat([slots, targets]).unique(return_inverse=True)  # (M,), (S + T,)
        vectors = self.items(content[items], id_rows[items])  # (M, dim)
        history_vectors = vectors.new_zeros(*history.shape, vectors.shape[-1])  # (B, L, dim)
        history_vectors[mask] = vectors[inverse[:len(slots)]]
        return self.users(history_vectors, mask), vectors[inverse[len(slots):]]
