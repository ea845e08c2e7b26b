"""Typed run configuration: dataclasses are the schema, YAML files and dotted overrides set values.

Loading is strict: an unknown key, a wrong type or a value outside a ``Literal`` is refused with
an error naming the dotted key, before any model or data is built::

    cfg = load_config("configs/demo.yaml", ["optim.lr=3e-4", "model.towers.text.freeze=true"])

A YAML file may start from another with ``base: other.yaml`` (a variant is an override, not a
copied file). Each tower's keys are checked against its registered class's ``Config`` dataclass.
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

import yaml

from align.errors import MODALITIES, ConfigError, atomic_open


# ---------------------------------------------------------------- schema


@dataclass
class TowerConfig:
    """One modality tower: ``type`` picks a registered tower; ``params`` are its Config fields.

    In YAML the tower's own keys sit beside ``type`` (they are moved into ``params`` and checked
    against that tower's ``Config`` dataclass).
    """

    type: str = ""
    freeze: bool = False  # lock the trunk (LiT); the projection stays trainable
    unfreeze_last: int = 0  # with freeze: leave this many final trunk blocks trainable
    lr_scale: float = 1.0  # multiplies optim.lr for this tower's parameters
    # recompute each trunk block's activations in the backward instead of keeping them (memory
    # for compute, for large towers; align/towers/base.py checkpoint_blocks)
    grad_checkpointing: bool = False
    params: Any = None  # the tower's Config dataclass, filled during validation


@dataclass
class FieldConfig:
    """One field of a product, e.g. ``model.fields.title``: which tower encodes it and how much it
    weighs in the item vector (align/fields.py). A text field is the manifest ``columns`` joined
    with ``data.columns.text_separator``; an image or audio field reads ``data.columns.image`` /
    ``data.columns.audio`` (its ``columns`` stay empty)."""

    modality: str = "text"
    columns: List[str] = field(default_factory=list)  # text fields: the manifest columns joined
    weight: float = 1.0  # >= 0; the item vector is the weighted mean of its normalised field vectors


@dataclass
class ModelConfig:
    embed_dim: int = 512
    towers: Dict[str, TowerConfig] = field(default_factory=dict)
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0  # CLIP clamps exp(logit_scale) at 100
    learn_temperature: bool = True
    # Where the cap applies. forward: the losses see min(exp(t), max) and the gradient stops at
    # the cap while t itself may drift above it. parameter: t is clamped to [0, log(max)] after
    # each optimiser step, as open_clip's trainer does (the losses then see the same value).
    logit_scale_clamp: Literal["forward", "parameter"] = "forward"
    # Multi-field products: the item vector (training on a search log, align embed, search-eval,
    # the index) is the weighted mean of these normalised field vectors. {} = one field per
    # modality (text = data.columns.text joined), equal weights, as align embed fuses.
    fields: Dict[str, FieldConfig] = field(default_factory=dict)
    # Fine-tuning: start from this align checkpoint's weights (a checkpoint or its model/ folder,
    # safetensors), whose towers must be the ones configured here; "" = the towers' own init.
    init_from: str = ""


@dataclass
class PairLossConfig:
    """Loss for one modality pair, e.g. ``loss.pairs.text-image``.

    ``name: null`` uses ``loss.name``. ``params: null`` uses ``loss.params`` when the pair keeps
    ``loss.name``, and the pair's own loss's defaults when it names another loss (whose
    parameters may differ). After loading, both hold what the pair uses.
    """

    weight: float = 1.0
    name: Optional[str] = None  # a registered loss; None = loss.name
    params: Any = None  # that loss's Config dataclass, filled during loading


@dataclass
class MatryoshkaConfig:
    """Matryoshka representation learning (Kusupati et al. 2022, https://arxiv.org/abs/2205.13147):
    every pair's loss is also computed on the first ``d`` coordinates of the embeddings,
    renormalised, for each ``d`` in ``dims``, so that a prefix is a usable embedding on its own.

    The objective's loss becomes sum_d weight_d * loss(prefix_d(a), prefix_d(b)) per pair, the
    weights normalised to sum 1 (equal when ``weights`` is empty); list ``model.embed_dim`` in
    ``dims`` to keep the full-width loss. ``dims: []`` (the default) switches it off.
    """

    dims: List[int] = field(default_factory=list)  # increasing, each in [1, model.embed_dim]
    weights: List[float] = field(default_factory=list)  # one per dim, >= 0; [] = equal


@dataclass
class LossConfig:
    """``name`` picks a registered loss (align/registry.py); ``params`` are its ``Config`` fields,
    checked against that dataclass like a tower's keys."""

    name: str = "infonce"
    params: Any = None  # the loss's Config dataclass, filled during loading
    # Pairs are "a-b" modality names. Pairs present in a batch but not listed use weight 1.
    pairs: Dict[str, PairLossConfig] = field(default_factory=dict)
    matryoshka: MatryoshkaConfig = field(default_factory=MatryoshkaConfig)
    # Search-log fine-tuning: weight of an InfoNCE between each product's photo (and sound) and
    # its text fields, so the towers stay aligned while queries move (align/objective.py); 0 = off
    field_alignment: float = 0.0
    # Search-log fine-tuning: "learned" trains the fields' weights in the item vector with the
    # towers, from model.fields.<f>.weight; each checkpoint's config holds the weights reached
    field_weights: Literal["fixed", "learned"] = "fixed"
    # their own learning rate (AdamW on the log-weights, on the run's schedule): a fine-tune's lr
    # moves a handful of scalars too little to matter
    field_weights_lr: float = 0.01


@dataclass
class ColumnsConfig:
    """Which manifest column holds which field (align/data/manifest.py reads with it).

    ``id`` is required. ``text`` lists columns joined into one text with ``text_separator``
    (empty cells left out). ``null`` switches a field off. ``group``, ``category`` and
    ``negatives`` may be absent from a file; a modality column (text/image/audio) absent from
    the file turns that modality off with a warning, and a file with none of them is an error.
    """

    id: str = "id"
    text: List[str] = field(default_factory=lambda: ["title", "description"])
    text_separator: str = ". "
    image: Optional[str] = "image"
    audio: Optional[str] = "audio"
    group: Optional[str] = "group"
    category: Optional[str] = "category"
    negatives: Optional[str] = "negatives"


@dataclass
class SearchLogConfig:
    """``data.search_log``: train on (query, product) judgements from a search log (read by
    align/searchlog/log.py) over a catalogue, instead of on a manifest's own pairs.

    Each training row is a query (text, photo or voice, by its column) and one product; the
    product is encoded field by field (``model.fields``) and fused. ``pairs``: ``graded`` makes a
    row of every (query, product) with a grade > 0 and hands the loss the query's other graded
    products (``graded_infonce``); ``best`` makes one row per query with its highest-graded
    product (ties: the first in the log), the plain InfoNCE baseline.
    """

    log: str = ""  # the log (CSV/JSONL/Parquet); "" = off
    catalogue: List[str] = field(default_factory=list)  # manifests whose ids the log's items are
    events: Dict[str, float] = field(default_factory=dict)  # event -> grade; {} = view 1, click 1, cart 2, buy 3
    pairs: Literal["graded", "per_query", "best"] = "graded"
    max_positives: int = 16  # graded products listed per query (the highest grades first)
    media_root: Optional[str] = None  # base of photo/voice query paths; default: the log's folder
    max_bad_fraction: float = 0.05  # of the log's rows
    # A held-out log (same columns; its queries not in ``log``) scored at every evaluation: each query
    # ranks the whole catalogue, judged by its own events (align/searchlog/evaluate.py validate_on_log);
    # eval.json's "search" entry (ndcg@10, err@10, mrr, recall@10, ...). "" = off
    val: str = ""


@dataclass
class DataConfig:
    train: str = ""  # manifest (.csv/.jsonl/.parquet) or shard spec (tars, {a..b}, pipe:, '::' joined)
    val: str = ""  # held-out split used for evaluation
    root: Optional[str] = None  # base of relative media paths; default: the manifest's folder
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    batch_size: int = 64  # per process; the global batch (the number of negatives) is this x world
    num_workers: int = 2
    shuffle_buffer: int = 1000
    resampled: bool = False  # shards: sample shards with replacement (multi-node pretraining)
    epoch_samples: int = 0  # resampled mode: samples per epoch (global)
    weights: List[float] = field(default_factory=list)  # per '::' source, resampled mode
    max_bad_fraction: float = 0.05
    max_negatives: int = 0  # explicit hard-negative texts per sample (0 = off)
    # device: workers only decode (uint8, stored size) and draw the crop; crop/resize/flip/normalise on the model device
    image_pipeline: Literal["worker", "device"] = "worker"
    # Decode big JPEGs at 1/2, 1/4 or 1/8 of their size (libjpeg's DCT scaling: a fraction of the
    # work), never below what the image transform's crop needs (align/data/transforms.py draft_side)
    jpeg_draft: bool = False
    # device (needs image_pipeline: device): workers check JPEGs with a 1/8-scale decode and ship their
    # bytes; the image tower decodes the batch's JPEGs on its device (nvJPEG, batched, on CUDA)
    image_decode: Literal["worker", "device"] = "worker"
    # Fine-tune on a search log instead of data.train's pairs (align/searchlog/pairs.py)
    search_log: SearchLogConfig = field(default_factory=SearchLogConfig)


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.2
    betas: Tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    # Decay positional, token and class embeddings too, as open_clip's trainer does (ours does
    # not by default, as CLIP and timm); norms, biases and the temperature are never decayed.
    decay_embeddings: bool = False
    # AdamW kernel: auto = fused where the parameters' device has one (CPU, CUDA), else foreach.
    # All give the same update up to rounding; fused is several times faster than a Python loop.
    implementation: Literal["auto", "fused", "foreach", "loop"] = "auto"


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    epochs: int = 1
    max_steps: int = 0  # 0 = epochs x steps per epoch
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    tf32: bool = True  # CUDA: TF32 matmuls + cuDNN benchmark in fp32 (open_clip's default); false = bit-exact fp32
    seed: int = 0
    accum_steps: int = 1  # exact large-batch accumulation (feature caching), see train/cached_step.py
    log_every: int = 10
    eval_every: int = 0  # steps; 0 = at the end of each epoch
    save_every: int = 0  # steps; 0 = at the end of each epoch
    keep_checkpoints: int = 2
    resume: str = ""  # "" = fresh, "latest" = newest checkpoint in output_dir, or a path
    wandb: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "align"
    progress: bool = True
    # On SIGUSR1/SIGTERM the run saves after the current step and stops (align/train/preempt.py);
    # inside a SLURM batch job it then asks SLURM to requeue the job (false: only stop).
    requeue: bool = True
    # Write each step's sample ids to <output_dir>/seen/rank-<r>.jsonl: an audit of what the run
    # trained on, kept consistent with the checkpoints across resumes.
    record_ids: bool = False
    # torch.compile every tower (nn.Module.compile: parameter names and checkpoints unchanged).
    # Pays off on a GPU for long runs; the first steps wait for the compiler.
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile's backend ("aot_eager" compiles no kernels)
    # An evaluation figure, "<entry>/<name>" as eval.json holds it (search/ndcg@10 with
    # data.search_log.val, text->image/R@1 with data.val): the model of its best evaluation so far
    # is kept in <output_dir>/best/ (align/train/best.py); higher is better. "" = off
    best_metric: str = ""
    # Stop after this many evaluations in a row without a new best of best_metric (0 = never)
    patience: int = 0


@dataclass
class ClassifyConfig:
    """Zero-shot classification on the eval split (align/eval/classify.py): each class name goes
    through every template into the text tower, their mean (renormalised) is the class vector, and
    each sample of ``modality`` takes the nearest classes; top-k accuracy overall and per class."""

    column: str = ""  # manifest column with each item's class name (e.g. kind); "" = off
    modality: Literal["text", "image", "audio"] = "image"  # the samples that are classified
    templates: List[str] = field(default_factory=lambda: ["{}"])  # "{}" stands for the class name
    ks: List[int] = field(default_factory=lambda: [1, 5])


@dataclass
class EvalConfig:
    split: str = ""  # default: data.val
    batch_size: int = 256
    ks: List[int] = field(default_factory=lambda: [1, 5, 10])
    output: str = ""  # default: <output_dir>/eval.json
    # Rank through a catalogue index too (align/index/build.py): "none", "auto" or a kind / FAISS
    # factory ("exact", "hnsw", "IVF1024,PQ32x8"), for pairs with at least index_min_candidates
    # candidates; its R@K are reported as approximate (R@K~) beside the exact figures.
    index: str = "none"
    index_min_candidates: int = 100_000
    plots: bool = True  # recall_at_k.png beside eval.json (needs matplotlib)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------- strict conversion


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and build dataclasses; errors name ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads no/off/yes/on as booleans
            spelled = [a for a in args if str(a).lower() in (("yes", "on", "true") if value else ("no", "off", "false"))]
            value = spelled[0] if spelled else value
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        return _to_dataclass(tp, value, key)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(v, args[0] if args else Any, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)) or (args and len(args) != len(value) and args[-1] is not Ellipsis):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        item_types = [args[0]] * len(value) if args[-1:] == (Ellipsis,) else list(args)
        return tuple(_convert(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, item_types)))
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _convert(v, args[1] if args else Any, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")


def _to_dataclass(cls: Any, data: Any, prefix: str) -> Any:
    if dataclasses.is_dataclass(data):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    if cls is TowerConfig:
        return _tower_config(data, prefix)
    if cls is LossConfig:
        return _loss_config(data, prefix)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]}; known keys here: {', '.join(sorted(names))}")
    values = {name: _convert(v, hints[name], f"{prefix}.{name}" if prefix else name) for name, v in data.items()}
    return cls(**values)


def _tower_config(data: Dict[str, Any], key: str) -> TowerConfig:
    from align.registry import TOWERS

    if "type" not in data:
        raise ConfigError(f"{key}.type is required; registered towers: {', '.join(TOWERS.names())}")
    if data["type"] not in TOWERS:
        raise ConfigError(f"{key}.type: unknown tower {data['type']!r}; registered: {', '.join(TOWERS.names())}")
    generic = {f.name for f in dataclasses.fields(TowerConfig)} - {"params"}
    own = {k: v for k, v in data.items() if k not in generic}
    if isinstance(data.get("params"), dict):
        own = {**data["params"], **{k: v for k, v in own.items() if k != "params"}}
    tower_cls = TOWERS.get(data["type"])
    hints = typing.get_type_hints(TowerConfig)
    tower = TowerConfig(**{k: _convert(v, hints[k], f"{key}.{k}") for k, v in data.items() if k in generic})
    tower.params = _to_dataclass(tower_cls.Config, own, key)
    return tower


def _loss_params(name: Any, params: Any, key: str) -> Any:
    """``params`` checked against loss ``name``'s ``Config``; its values checked by building it."""
    from align.registry import LOSSES

    if not isinstance(name, str) or name not in LOSSES:
        raise ConfigError(f"{key.rsplit('.', 1)[0]}.name: unknown loss {name!r}; registered: {', '.join(LOSSES.names())}")
    loss_cls = LOSSES.get(name)
    config = _to_dataclass(loss_cls.Config, params, key)
    try:
        loss_cls.from_config(config)  # range checks (tau_plus, tile_size ...) live in the loss
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{key}: {error}") from None
    return config


def _loss_config(data: Dict[str, Any], key: str) -> LossConfig:
    known = {f.name for f in dataclasses.fields(LossConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown key {key}.{unknown[0]}; known keys here: {', '.join(sorted(known))}")
    name = _convert(data.get("name", LossConfig.name), str, f"{key}.name")
    raw_params = data.get("params")
    if raw_params is not None and not isinstance(raw_params, dict):
        raise ConfigError(f"{key}.params: expected a mapping, got {raw_params!r}")
    pairs = _convert(data.get("pairs") or {}, Dict[str, Any], f"{key}.pairs")
    config = LossConfig(name=name, params=_loss_params(name, raw_params, f"{key}.params"),
                        matryoshka=_to_dataclass(MatryoshkaConfig, data.get("matryoshka"), f"{key}.matryoshka"),
                        field_alignment=_convert(data.get("field_alignment", 0.0), float, f"{key}.field_alignment"),
                        field_weights=_convert(data.get("field_weights", LossConfig.field_weights),
                                               Literal["fixed", "learned"], f"{key}.field_weights"),
                        field_weights_lr=_convert(data.get("field_weights_lr", LossConfig.field_weights_lr), float,
                                                  f"{key}.field_weights_lr"))
    for pair, raw in pairs.items():
        where = f"{key}.pairs.{pair}"
        item = _to_dataclass(PairLossConfig, raw, where)
        item.name = item.name or name
        if item.params is None:  # inherit loss.params only where the loss is the same one
            item.params = raw_params if item.name == name else None
        item.params = _loss_params(item.name, item.params, f"{where}.params")
        config.pairs[pair] = item
    return config


# ---------------------------------------------------------------- loading


def _read_yaml(path: str, seen: Tuple[str, ...] = ()) -> Dict[str, Any]:
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {path}")
    if os.path.isdir(path):
        hint = f"; give its config.yaml ({os.path.join(path, 'config.yaml')})" if os.path.isfile(
            os.path.join(path, "config.yaml")) else ""
        raise ConfigError(f"config file {path} is a folder{hint}")
    with open(path, encoding="utf-8") as handle:
        try:
            data = yaml.safe_load(handle) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    base = data.pop("base", None)
    if base is None:
        return data
    base_path = os.path.join(os.path.dirname(path), base)
    if os.path.abspath(base_path) in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to {base_path}")
    return _merge(_read_yaml(base_path, seen + (os.path.abspath(path),)), data)


def _merge(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    """``update`` over ``base``, mapping by mapping. A section whose ``type`` changes (a tower
    of another kind) starts afresh from the update: the old type's keys mean nothing to it."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and not _changes_type(merged[key], value):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _changes_type(old: Dict[str, Any], new: Dict[str, Any]) -> bool:
    return "type" in new and "type" in old and new["type"] != old["type"]


def apply_override(data: Dict[str, Any], override: str) -> None:
    """Set ``a.b.c=value`` in the raw mapping; the value is parsed as YAML (``3e-4``, ``[1,2]``)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key.sub=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r}: empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part} is a value, not a section")
        node = child
    if parts[-1] == "type" and _changes_type(node, {"type": value}):
        node.clear()  # a tower of another kind starts from its own defaults (see _merge)
    node[parts[-1]] = value


def config_from_dict(data: Dict[str, Any]) -> Config:
    # The loss section is always resolved, so that ``loss.params`` holds the loss's Config.
    config = _to_dataclass(Config, {**data, "loss": data.get("loss") or {}}, "")
    validate(config)
    return config


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> Config:
    """Read YAML (with its ``base`` chain), apply dotted overrides, validate strictly."""
    data = _read_yaml(path) if path else {}
    for override in overrides or []:
        apply_override(data, override)
    return config_from_dict(data)


def load_dataclass(cls: Any, path: Optional[str] = None, overrides: Optional[List[str]] = None) -> Any:
    """Any typed config dataclass (the recommender's, for one) from YAML with its ``base`` chain
    and dotted overrides, as strictly as ``load_config``: unknown keys and wrong types name the key."""
    data = _read_yaml(path) if path else {}
    for override in overrides or []:
        apply_override(data, override)
    return _to_dataclass(cls, data, "")


def validate(config: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    if not config.model.towers:
        raise ConfigError("model.towers: at least one tower is required")
    for modality, tower in config.model.towers.items():
        if modality not in MODALITIES:
            raise ConfigError(f"model.towers.{modality}: unknown modality; use one of {', '.join(MODALITIES)}")
        if tower.unfreeze_last and not tower.freeze:
            raise ConfigError(f"model.towers.{modality}.unfreeze_last needs freeze: true")
        if tower.unfreeze_last < 0:
            raise ConfigError(f"model.towers.{modality}.unfreeze_last must be >= 0")
    if config.model.embed_dim <= 0:
        raise ConfigError("model.embed_dim must be positive")
    if not 0 < config.model.init_temperature < 1:
        raise ConfigError("model.init_temperature must lie in (0, 1)")
    for pair in config.loss.pairs:
        parts = pair.split("-")
        if len(parts) != 2 or any(p not in config.model.towers for p in parts) or parts[0] == parts[1]:
            raise ConfigError(f"loss.pairs.{pair}: expected '<a>-<b>' with two of the model's towers "
                              f"({', '.join(config.model.towers)})")
    _check_matryoshka(config.loss.matryoshka, config.model.embed_dim)
    if not (math.isfinite(config.loss.field_alignment) and config.loss.field_alignment >= 0):
        raise ConfigError(f"loss.field_alignment = {config.loss.field_alignment} must be a number >= 0 (0: off)")
    if not (math.isfinite(config.loss.field_weights_lr) and config.loss.field_weights_lr > 0):
        raise ConfigError(f"loss.field_weights_lr = {config.loss.field_weights_lr} must be a number > 0")
    for key in ("batch_size", "num_workers", "max_negatives", "epoch_samples"):
        if getattr(config.data, key) < 0 or (key == "batch_size" and config.data.batch_size == 0):
            raise ConfigError(f"data.{key} must be {'positive' if key == 'batch_size' else '>= 0'}")
    if config.data.image_decode == "device" and config.data.image_pipeline != "device":
        raise ConfigError("data.image_decode: device needs data.image_pipeline: device (the tower crops the images "
                          "it decodes); set data.image_pipeline: device too, or data.image_decode: worker")
    _check_columns(config.data.columns)
    _check_fields(config.model.fields, config.model.towers)
    _check_search_log(config)
    _check_best_metric(config)
    if not 0 <= config.data.max_bad_fraction <= 1:
        raise ConfigError("data.max_bad_fraction must lie in [0, 1]")
    for key, value, rule in _numeric_settings(config):
        check_range(key, value, rule)
    if config.train.accum_steps < 1:
        raise ConfigError("train.accum_steps must be >= 1")
    if config.train.epochs < 1 and config.train.max_steps < 1:
        raise ConfigError("train.epochs or train.max_steps must be positive")
    if not config.eval.ks or any(k < 1 for k in config.eval.ks):
        raise ConfigError("eval.ks must be a list of positive integers (the K of Recall@K), e.g. [1, 5, 10]")
    if config.eval.index_min_candidates < 0:
        raise ConfigError("eval.index_min_candidates must be >= 0")
    _check_classify(config.eval.classify, config.model.towers)


# A rule's text is also what the error says the value must be.
_RANGES = {
    "> 0": lambda v: v > 0,
    ">= 0": lambda v: v >= 0,
    ">= 1": lambda v: v >= 1,
    "in [0, 1)": lambda v: 0 <= v < 1,
    "in [0, 1]": lambda v: 0 <= v <= 1,
}


def _numeric_settings(config: Config) -> List[Tuple[str, float, str]]:
    """(key, value, rule in ``_RANGES``) for the numbers the types alone let through. Each fails
    late or silently otherwise: a NaN rate, decay or lr_scale trains and saves NaN weights, betas
    outside [0, 1) stop torch after the model is built, log_every 0 divides by zero after the first
    step, max_steps -1 writes a checkpoint of no training, a negative eval/save period acts every
    step and a negative warm-up or grad_clip quietly changes the schedule or switches clipping off."""
    optim, train, model = config.optim, config.train, config.model
    settings = [
        ("optim.lr", optim.lr, "> 0"),
        ("optim.weight_decay", optim.weight_decay, ">= 0"),
        ("optim.eps", optim.eps, "> 0"),
        ("optim.betas[0]", optim.betas[0], "in [0, 1)"),
        ("optim.betas[1]", optim.betas[1], "in [0, 1)"),
        ("optim.warmup_steps", optim.warmup_steps, ">= 0"),
        ("optim.min_lr_ratio", optim.min_lr_ratio, "in [0, 1]"),  # of optim.lr, where the cosine ends
        ("optim.grad_clip", optim.grad_clip, ">= 0"),  # 0: off
        ("model.max_logit_scale", model.max_logit_scale, ">= 1"),  # the parameter clamp is [0, log(max)]
        ("train.epochs", train.epochs, ">= 0"),  # 0 only with max_steps > 0 (checked in validate)
        ("train.max_steps", train.max_steps, ">= 0"),  # 0: epochs x steps per epoch
        ("train.log_every", train.log_every, ">= 1"),
        ("train.eval_every", train.eval_every, ">= 0"),  # 0: at each epoch's end
        ("train.save_every", train.save_every, ">= 0"),  # 0: at each epoch's end
        ("train.keep_checkpoints", train.keep_checkpoints, ">= 0"),  # 0: keep all
        ("data.shuffle_buffer", config.data.shuffle_buffer, ">= 0"),  # 0 or 1: no shuffle buffer
        ("eval.batch_size", config.eval.batch_size, ">= 1"),
    ]
    settings += [(f"model.towers.{m}.lr_scale", tower.lr_scale, ">= 0") for m, tower in model.towers.items()]
    settings += [(f"data.weights[{n}]", weight, ">= 0") for n, weight in enumerate(config.data.weights)]
    settings += [(f"loss.pairs.{pair}.weight", spec.weight, ">= 0") for pair, spec in config.loss.pairs.items()]
    settings += [(f"loss.matryoshka.weights[{n}]", weight, ">= 0")
                 for n, weight in enumerate(config.loss.matryoshka.weights)]
    return settings


def check_range(key: str, value: float, rule: str) -> None:
    """A ``ConfigError`` naming ``key`` unless ``value`` is finite and meets ``rule`` (a key of
    ``_RANGES``); NaN meets no comparison, so each rule says what a usable value satisfies."""
    if not (math.isfinite(value) and _RANGES[rule](value)):
        kind = "a whole number" if isinstance(value, int) else "a finite number"
        raise ConfigError(f"{key} = {value} must be {kind} {rule}")


def _check_matryoshka(matryoshka: MatryoshkaConfig, embed_dim: int) -> None:
    dims, weights = matryoshka.dims, matryoshka.weights
    if not dims:
        if weights:
            raise ConfigError("loss.matryoshka.weights given without loss.matryoshka.dims; list the dims too")
        return
    for n, dim in enumerate(dims):
        if not 1 <= dim <= embed_dim:
            raise ConfigError(f"loss.matryoshka.dims[{n}] = {dim} must lie in [1, model.embed_dim = {embed_dim}]")
    if any(later <= earlier for earlier, later in zip(dims, dims[1:])):
        raise ConfigError(f"loss.matryoshka.dims {dims} must increase strictly, e.g. [16, 32, 64, {embed_dim}]")
    if weights and len(weights) != len(dims):
        raise ConfigError(f"loss.matryoshka.weights has {len(weights)} values for {len(dims)} dims; "
                          "give one weight per dim, or none for equal weights")
    if any(w < 0 for w in weights) or (weights and sum(weights) <= 0):
        raise ConfigError(f"loss.matryoshka.weights {weights} must be >= 0 with a positive sum")


def _check_fields(fields: Dict[str, FieldConfig], towers: Dict[str, TowerConfig]) -> None:
    for name, spec in fields.items():
        key = f"model.fields.{name}"
        if spec.modality not in towers:
            raise ConfigError(f"{key}.modality: {spec.modality!r} has no tower; the model has {', '.join(towers)}")
        if spec.modality == "text" and not spec.columns:
            raise ConfigError(f"{key}.columns: a text field lists the manifest columns it joins, e.g. [title]")
        if spec.modality != "text" and spec.columns:
            raise ConfigError(f"{key}.columns: only text fields list columns; a {spec.modality} field reads "
                              f"data.columns.{spec.modality}")
        if not (math.isfinite(spec.weight) and spec.weight >= 0):
            raise ConfigError(f"{key}.weight: {spec.weight} must be a finite number >= 0")
    if fields and not any(spec.weight > 0 for spec in fields.values()):
        raise ConfigError("model.fields: every weight is 0; give one field a positive weight")


def product_fields(model: ModelConfig, columns: ColumnsConfig) -> Dict[str, FieldConfig]:
    """The fields that make an item vector: ``model.fields``, or one per tower (align/fields.py)."""
    if model.fields:
        return dict(model.fields)
    fields = {}
    for modality in model.towers:
        if modality == "text":
            if columns.text:
                fields["text"] = FieldConfig(modality="text", columns=list(columns.text))
        elif getattr(columns, modality, None):
            fields[modality] = FieldConfig(modality=modality)
    return fields


def _check_search_log(config: "Config") -> None:
    search = config.data.search_log
    if not search.log:
        if search.val:
            raise ConfigError("data.search_log.val: a held-out search log goes with data.search_log.log; "
                              "set the log to train on, or leave val empty")
        if config.loss.field_weights == "learned":
            raise ConfigError("loss.field_weights: learned weighs a product's fields in search-log training; "
                              "set data.search_log.log, or leave it fixed")
        return
    if config.loss.field_weights == "learned":
        weighed = [n for n, f in product_fields(config.model, config.data.columns).items() if f.weight > 0]
        if len(weighed) < 2:
            raise ConfigError(f"loss.field_weights: learned needs two or more fields of positive weight to weigh "
                              f"against each other; the product has {weighed or 'none'} (model.fields)")
    if not search.catalogue:
        raise ConfigError("data.search_log.catalogue: list the manifest(s) whose ids the log's items are")
    if search.max_positives < 1:
        raise ConfigError(f"data.search_log.max_positives: {search.max_positives} must be >= 1")
    if not 0 <= search.max_bad_fraction <= 1:
        raise ConfigError("data.search_log.max_bad_fraction must lie in [0, 1]")
    if config.data.max_negatives:
        raise ConfigError("data.max_negatives: explicit negative texts are for manifest pairs; with "
                          "data.search_log the batch's other products are the negatives (set it to 0)")
    if config.train.accum_steps != 1:
        raise ConfigError(f"train.accum_steps: {config.train.accum_steps}; search-log training runs one forward "
                          "per step for now (set train.accum_steps: 1 and raise data.batch_size instead)")


SEARCH_VAL_K = 10  # the cut of data.search_log.val's figures (ndcg@10, ...)


def best_metric_choices(config: "Config") -> Dict[str, List[str]]:
    """eval.json entry -> the figures ``train.best_metric`` may name in it (all: higher is better),
    for what this config evaluates: retrieval pairs on data.val / eval.split, the search log's
    data.search_log.val (all queries, and per query modality)."""
    choices: Dict[str, List[str]] = {}
    if config.eval.split or config.data.val:
        towers = list(config.model.towers)
        for a in towers:
            for b in towers:
                if a != b:
                    choices[f"{a}->{b}"] = [f"R@{k}" for k in config.eval.ks] + ["mAP"]
    if config.data.search_log.log and config.data.search_log.val:
        k = SEARCH_VAL_K
        for entry in ["search"] + [f"search-{m}" for m in config.model.towers]:
            choices[entry] = [f"ndcg@{k}", f"err@{k}", "mrr", f"recall@{k}", "rbp_p0.9"]
    return choices


def _check_best_metric(config: "Config") -> None:
    train = config.train
    if isinstance(train.patience, bool) or not isinstance(train.patience, int) or train.patience < 0:
        raise ConfigError(f"train.patience: {train.patience!r} must be a whole number >= 0 (0: never stop early)")
    if not train.best_metric:
        if train.patience:
            raise ConfigError("train.patience needs train.best_metric: name the evaluation figure that must improve, "
                              "e.g. search/ndcg@10 or text->image/R@1")
        return
    choices = best_metric_choices(config)
    if not choices:
        raise ConfigError(f"train.best_metric: {train.best_metric!r}, but nothing is evaluated during training; "
                          f"set data.val (or eval.split), or data.search_log.val for a search log")
    entry, _, name = train.best_metric.rpartition("/")
    if entry not in choices or name not in choices[entry]:
        listed = "; ".join(f"{e}/{{{','.join(names)}}}" for e, names in choices.items())
        raise ConfigError(f"train.best_metric: {train.best_metric!r} is not a figure this run evaluates; "
                          f"choose one of {listed}")


def _check_classify(classify: ClassifyConfig, towers: Dict[str, TowerConfig]) -> None:
    if not classify.column:
        return
    if "text" not in towers or classify.modality not in towers:
        raise ConfigError(f"eval.classify needs a text tower and a {classify.modality} tower "
                          f"(eval.classify.modality); the model has {', '.join(towers)}")
    if not classify.templates:
        raise ConfigError('eval.classify.templates: give at least one, e.g. ["a photo of a {}."]')
    for n, template in enumerate(classify.templates):
        if "{}" not in template:
            raise ConfigError(f"eval.classify.templates[{n}]: {template!r} has no {{}} for the class name")
    if not classify.ks or any(k < 1 for k in classify.ks):
        raise ConfigError("eval.classify.ks must be positive integers")


def _check_columns(columns: ColumnsConfig) -> None:
    if not columns.id:
        raise ConfigError("data.columns.id: the id column is required and cannot be empty")
    for name in ("image", "audio", "group", "category", "negatives"):
        if getattr(columns, name) == "":
            raise ConfigError(f"data.columns.{name}: '' names no column; write null to switch it off")
    if any(not column for column in columns.text):
        raise ConfigError(f"data.columns.text: {columns.text} holds an empty name; list the text columns, "
                          "or write [] to switch text off")


def to_dict(config: Any) -> Dict[str, Any]:
    """Plain nested dict (tower params flattened beside ``type``, as written in YAML)."""
    if isinstance(config, TowerConfig):
        generic = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "params"}
        return {**generic, **to_dict(config.params)}
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    return config


def save_config(config: Any, path: str) -> None:
    with atomic_open(path) as handle:
        yaml.safe_dump(to_dict(config), handle, sort_keys=False)
