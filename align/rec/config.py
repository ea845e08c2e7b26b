"""The recommender's run config: YAML (``configs/rec/*.yaml``) read as strictly as ``align train``'s
(unknown keys and wrong types name the key, dotted overrides on the command line), checked
before any data is read, and saved beside the trained head."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional

from align.config import check_range, load_dataclass
from align.errors import ConfigError
from align.rec.interactions import InteractionColumns


@dataclass
class RecDataConfig:
    interactions: str = ""  # the log: CSV, JSONL or Parquet
    catalogue: List[str] = field(default_factory=list)  # manifests whose ids are the items
    id_column: str = "id"  # the catalogue's id column
    items: str = ""  # folder written by `align embed` (embeddings.safetensors + ids.json)
    columns: InteractionColumns = field(default_factory=InteractionColumns)
    max_bad_fraction: float = 0.01
    # none: every row trains and nothing is held out, for a head that serves (rec-eval refuses it)
    split: Literal["temporal", "leave_last_out", "none"] = "temporal"
    cutoff: Optional[float] = None  # temporal split time (seconds); None = the test_quantile of times
    test_quantile: float = 0.2
    cold_user_max: int = 2  # users with at most this many training interactions are cold


@dataclass
class HeadConfig:
    modality: str = "fused"  # which item vectors feed the head: fused, text, image or audio
    # given: the fused vectors as `align embed` wrote them (a plain or --fusion-weights mean);
    # learned: the head fuses the item's modality vectors itself, one softmax weight per modality
    # trained from the interactions, starting from the plain mean (head.modality must be fused)
    fusion: Literal["given", "learned"] = "given"
    dim: int = 128  # output dimension of the user and item vectors
    hidden: int = 256  # width of the item adapter and of the user MLP
    id_embeddings: bool = True  # a learned vector per warm item, beside the content
    id_dropout: float = 0.5  # chance a training item's ID vector is dropped: content alone must score
    # the item's log training count (scaled to [0, 1]) joins its content: content alone cannot
    # tell what sells, and users with one or two items are best served by what does
    popularity_feature: bool = True
    user_encoder: Literal["mean", "sasrec"] = "mean"
    history: int = 20  # most recent items the user encoder reads
    layers: int = 2  # sasrec
    heads: int = 2  # sasrec
    dropout: float = 0.1


@dataclass
class RecTrainConfig:
    output_dir: str = "runs/rec"
    epochs: int = 10
    batch_size: int = 256  # per process; the global batch's items are the negatives
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    temperature: float = 0.05
    negatives: Literal["in_batch", "full"] = "in_batch"  # full: softmax over the whole catalogue
    logq: bool = True  # correct in-batch logits by log item frequency (in_batch only)
    seed: int = 0
    log_every: int = 20
    wandb: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "align-rec"
    progress: bool = True


@dataclass
class RerankConfig:
    mmr_lambda: float = 1.0  # 1 = relevance only; lower trades relevance for list diversity (MMR)
    popularity_penalty: float = 0.0  # subtracted x log(1 + training count) from each score
    pool: int = 100  # candidates re-ranked per user
    # Hub penalty (CSLS): score - weight * r(item), r = the item's mean cosine to its hub_k nearest
    # training users: items close to everyone stop filling everyone's list (align/rec/rerank.py).
    hub_penalty: float = 0.0
    hub_k: int = 50
    # A user with n training interactions gets hub_penalty * n / (n + hub_half_history): one with a
    # single item has little taste to go on, and the items everyone likes are their best bet.
    hub_half_history: float = 4.0
    hub_users: int = 20000  # training users (a seeded sample) whose vectors r is measured against


@dataclass
class RecEvalConfig:
    ks: List[int] = field(default_factory=lambda: [5, 10, 20])
    mmr_sweep: List[float] = field(default_factory=lambda: [1.0, 0.99, 0.97, 0.95, 0.93, 0.9, 0.8, 0.5])
    batch_size: int = 1024  # users scored at a time
    peers: List[str] = field(default_factory=lambda: ["most_pop", "content_knn"])
    output: str = ""  # default: <output_dir>/rec_eval.json


@dataclass
class RecConfig:
    """Everything ``align rec-train`` and ``align rec-eval`` read."""

    data: RecDataConfig = field(default_factory=RecDataConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    train: RecTrainConfig = field(default_factory=RecTrainConfig)
    rerank: RerankConfig = field(default_factory=RerankConfig)
    eval: RecEvalConfig = field(default_factory=RecEvalConfig)


MODALITY_CHOICES = ("fused", "text", "image", "audio")


def validate_rec(config: RecConfig) -> RecConfig:
    """Cross-field checks; every failure names its key."""
    if not config.data.interactions:
        raise ConfigError("data.interactions: the interaction log is required")
    if not config.data.catalogue:
        raise ConfigError("data.catalogue: list the catalogue manifests whose ids the log names")
    if not config.data.items:
        raise ConfigError("data.items: the item embeddings folder (from `align embed`) is required")
    if config.head.modality not in MODALITY_CHOICES:
        raise ConfigError(f"head.modality: {config.head.modality!r}; use one of {', '.join(MODALITY_CHOICES)}")
    if config.head.fusion == "learned" and config.head.modality != "fused":
        raise ConfigError(f"head.fusion: learned fuses the modality vectors itself; it needs head.modality=fused "
                          f"(got {config.head.modality!r}), or set head.fusion=given")
    for key in ("dim", "hidden", "history", "layers", "heads"):
        if getattr(config.head, key) < 1:
            raise ConfigError(f"head.{key} must be >= 1")
    if config.head.user_encoder == "sasrec" and config.head.dim % config.head.heads:
        raise ConfigError(f"head.heads ({config.head.heads}) must divide head.dim ({config.head.dim})")
    for key, value in (("head.id_dropout", config.head.id_dropout), ("head.dropout", config.head.dropout),
                       ("data.max_bad_fraction", config.data.max_bad_fraction)):
        if not 0 <= value <= 1:
            raise ConfigError(f"{key} must lie in [0, 1]")
    if not 0 < config.data.test_quantile < 1:
        raise ConfigError("data.test_quantile must lie in (0, 1)")
    if config.data.split == "none" and config.data.cutoff is not None:
        raise ConfigError(f"data.cutoff: {config.data.cutoff} cuts nothing with data.split=none (every row trains); "
                          "drop it, or set data.split=temporal")
    if config.train.epochs < 1 or config.train.batch_size < 2:
        raise ConfigError("train.epochs must be >= 1 and train.batch_size >= 2 (the batch is the negatives)")
    # an infinite or NaN rate trains a head of NaNs
    check_range("train.lr", config.train.lr, "> 0")
    check_range("train.temperature", config.train.temperature, "> 0")
    check_range("train.weight_decay", config.train.weight_decay, ">= 0")
    if not 0 <= config.rerank.mmr_lambda <= 1 or any(not 0 <= x <= 1 for x in config.eval.mmr_sweep):
        raise ConfigError("rerank.mmr_lambda and eval.mmr_sweep values must lie in [0, 1]")
    if config.rerank.popularity_penalty < 0:
        raise ConfigError("rerank.popularity_penalty must be >= 0")
    if config.rerank.hub_penalty < 0 or config.rerank.hub_half_history < 0:
        raise ConfigError("rerank.hub_penalty and rerank.hub_half_history must be >= 0")
    if config.rerank.hub_k < 1 or config.rerank.hub_users < 1:
        raise ConfigError("rerank.hub_k and rerank.hub_users must be >= 1")
    from align.rec.baselines import PEERS

    unknown = [p for p in config.eval.peers if p not in PEERS]
    if unknown:
        raise ConfigError(f"eval.peers: unknown recommender {unknown[0]!r}; known: {', '.join(PEERS)}")
    if not config.eval.ks or any(k < 1 for k in config.eval.ks):
        raise ConfigError("eval.ks must be positive integers")
    if config.rerank.pool < max(config.eval.ks):
        raise ConfigError(f"rerank.pool ({config.rerank.pool}) must be >= the largest of eval.ks")
    return config


def load_rec_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> RecConfig:
    """Read, override and check a recommender config (refused before any work)."""
    return validate_rec(load_dataclass(RecConfig, path, overrides))
