"""``align embed``: embed every item of a catalogue once with a trained model, into a folder that
retrieval and recommendation read (``load_item_embeddings``); ``--append`` adds cold items to it
later, and replaces re-embedded ones, without embedding the rest again.

The folder's format, and reading, writing, appending and cutting it: ``align/index/vectors.py``.

Every manifest row gets a row here. Each (item, modality) is embedded as a sample of its own, so a
missing or corrupt media file costs its item that modality only (zero row, mask False): the loader
skips and counts the file as in training (align/data/bad_samples.py; the checkpoint's
``data.max_bad_fraction`` still stops a broken catalogue, counted over the (item, modality)
samples of every manifest and shard one process embeds),
and the command prints which ids lost which modality and why. An item left with no modality at all
(empty cells, or every file unreadable) keeps zero rows and ``mask.fused`` False, and is reported.

The manifests are read as ``align eval`` reads a split, with the ``data`` section saved with the
checkpoint (columns, media root, workers); the checkpoint is read through align/loading.py:
safetensors, YAML and JSON only, nothing here is ever unpickled.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from align.data.loader import loader_from_config
from align.data.manifest import is_manifest
from align.data.transforms import SampleProcessor
from align.errors import MODALITIES, ConfigError, RunError, write_json_atomic
from align.encoding import Processes, embed_split, join_processes
from align.config import FieldConfig
from align.fields import field_weights
from align.index.vectors import (FORMAT, FUSED, IDS_FILE, TENSORS_FILE, ItemEmbeddings, append_item_embeddings,
                                 check_fusion_weights, check_same_space, embedded_at_metadata, fuse,
                                 fusion_metadata, fusion_weights_of, id_list, load_item_embeddings,
                                 parse_fusion_weights, save_item_embeddings, truncate_embeddings)
from align.loading import load_model, model_folder, read_json, read_saved_config, read_tensors, write_tensors
from align.model import check_prefix_dim


class _ProgressLoader:
    """A loader whose batches pass through a tqdm bar: ``embed_split`` takes any loader and draws none."""

    def __init__(self, loader: Any, label: str, position: int = 0) -> None:
        self.loader, self.label, self.bad, self.position = loader, label, loader.bad, position

    def __len__(self) -> int:
        return len(self.loader)

    def iterate(self, epoch: int, skip_batches: int = 0) -> Iterator[Dict[str, Any]]:
        from tqdm import tqdm

        yield from tqdm(self.loader.iterate(epoch, skip_batches), total=len(self.loader) - skip_batches,
                        desc=f"embed {self.label}", unit="batch", leave=False, position=self.position)


Sample = Tuple[int, str]  # (row in its manifest, modality): one file (or text) to encode


@dataclass
class Catalogue:
    """The manifests to embed, read once: their rows and the order in which their samples are encoded.

    Each manifest's samples run modality after modality (the model's order), rows in file order
    within a modality; consecutive runs of ``batch_size`` of them are the batches, per manifest.
    Shards are runs of whole batches, so a sample meets the same batch-mates however the catalogue
    is sharded, and its vector comes out bit for bit the same (a transformer's float32 output
    depends on its batch: the text tower cuts the padding after the batch's longest text, and
    matmul kernels block by batch size).

    Attributes:
        manifests: the paths, in order; ``rows`` their read_manifest rows.
        offsets: the catalogue row of each manifest's first row.
        ids: every item id in catalogue row order (unique).
        samples: per manifest, its samples in encoding order.
        loaders: per manifest, a loader with the checkpoint's data settings (None when only merging).
    """

    manifests: List[str]
    rows: List[List[Dict[str, Any]]]
    offsets: List[int]
    ids: List[str]
    samples: List[List[Sample]]
    batch_size: int
    loaders: Optional[List[Any]] = None

    def batches(self) -> List[Tuple[int, int, int]]:
        """(manifest, first sample, end sample) of every batch, manifest after manifest."""
        return [(k, start, min(start + self.batch_size, len(samples)))
                for k, samples in enumerate(self.samples) for start in range(0, len(samples), self.batch_size)]


def read_catalogue(manifests: Sequence[str], modalities: Sequence[str], batch_size: int, read_rows: Any,
                   loaders: Optional[List[Any]] = None) -> Catalogue:
    """A ``Catalogue`` from ``read_rows(manifest) -> rows``; an id in two manifests is a ``RunError``."""
    rows, offsets, source = [], [], {}
    for manifest in manifests:  # all read (and their ids checked) before anything is embedded
        offsets.append(len(source))
        rows.append(read_rows(manifest))
        for row in rows[-1]:
            if row["id"] in source:
                raise RunError(f"item id {row['id']!r} is in {source[row['id']]} and {row['_where']}; ids must be "
                               f"unique over the manifests (embed the later one with --append to replace the item)")
            source[row["id"]] = row["_where"]
    samples = [[(n, m) for m in modalities for n, row in enumerate(items) if row.get(m) is not None] for items in rows]
    return Catalogue(list(manifests), rows, offsets, list(source), samples, batch_size, loaders)


@dataclass
class Part:
    """The vectors of one shard: per modality, the catalogue rows it read and their vectors, and the
    rows whose file could not be read (unreadable-file reports name them)."""

    rows: Dict[str, torch.Tensor]  # modality -> (n_m,) int64 catalogue rows
    vectors: Dict[str, torch.Tensor]  # modality -> (n_m, D) float32
    lost: Dict[str, List[int]]  # modality -> catalogue rows left without that modality


def _embed_portion(model: Any, catalogue: Catalogue, k: int, start: int, stop: int, device: torch.device,
                   progress: Optional[str], position: int, run: Any) -> Part:
    """Encode samples ``start:stop`` of manifest ``k`` (whole batches) into a ``Part``, report the
    files that could not be read, and add them to ``run``, the process's ``BadSampleTally``: its
    ``data.max_bad_fraction`` holds over every portion, however small each is."""
    from align.data.bad_samples import BadSampleTally

    loader, items, offset = catalogue.loaders[k], catalogue.rows[k], catalogue.offsets[k]
    dataset, samples = loader.dataset, catalogue.samples[k][start:stop]
    # One sample per (item, modality): the loader drops a whole sample when one of its files is bad,
    # and a broken image must not cost the item its text. The rows are swapped on the loader's own
    # dataset, so that columns, media root and workers stay the config's; the bad-sample tally
    # (and its data.max_bad_fraction) counts this portion's samples.
    dataset.rows = [{**items[n], **{other: None for other in MODALITIES if other != m}} for n, m in samples]
    loader.bad = BadSampleTally(loader.bad.max_bad_fraction, source=dataset.path)
    try:
        embedded = embed_split(model, loader if progress is None else _ProgressLoader(loader, progress, position),
                               device, require_samples=False)
    finally:
        dataset.rows = items
    row_of = {row["id"]: n for n, row in enumerate(items)}
    part = Part({}, {}, {})
    for m in model.modalities:
        got = embedded["masks"][m]  # (R,): the samples of modality m that were read
        read = [row_of[item] for item, has in zip(embedded["ids"], got.tolist()) if has]
        part.rows[m] = torch.tensor(read, dtype=torch.long) + offset
        part.vectors[m] = embedded["embeddings"][m][got]
        wanted = [n for n, modality in samples if modality == m]
        part.lost[m] = sorted(set(wanted) - set(read))
    if any(part.lost.values()):
        lost = {m: [items[n]["id"] for n in rows] for m, rows in part.lost.items()}
        print(_unreadable_report(dataset.path, lost, loader.bad), flush=True)
    run.add(loader.bad)
    part.lost = {m: [n + offset for n in rows] for m, rows in part.lost.items()}
    return part


def run_tally(catalogue: Catalogue) -> Any:
    """A ``BadSampleTally`` for every portion one process embeds of ``catalogue`` (its loaders'
    ``data.max_bad_fraction``; ``embed_batches(..., run=)``)."""
    from align.data.bad_samples import BadSampleTally

    return BadSampleTally(catalogue.loaders[0].bad.max_bad_fraction,
                          source=" and ".join(catalogue.manifests) if len(catalogue.manifests) < 4
                          else f"{len(catalogue.manifests)} manifests ({catalogue.manifests[0]}, ...)")


def embed_batches(model: Any, catalogue: Catalogue, batches: Sequence[Tuple[int, int, int]], device: torch.device,
                  progress: Optional[str] = None, position: int = 0, run: Any = None) -> Part:
    """Encode the catalogue's ``batches`` (consecutive ones, from ``Catalogue.batches``) into one ``Part``.
    ``progress``: a label for a tqdm bar per manifest (None: no bar); ``position``: the bar's line;
    ``run``: the tally the unreadable files count in (default: ``run_tally`` of these batches)."""
    run = run_tally(catalogue) if run is None else run
    portions: Dict[int, List[int]] = {}  # manifest -> [first sample, end sample]
    for k, start, stop in batches:
        span = portions.setdefault(k, [start, stop])
        span[0], span[1] = min(span[0], start), max(span[1], stop)
    def label(k: int) -> Optional[str]:
        return None if progress is None else f"{progress} {os.path.basename(catalogue.manifests[k])}".strip()

    pieces = [_embed_portion(model, catalogue, k, start, stop, device, label(k), position, run)
              for k, (start, stop) in portions.items()]
    dim = model.embed_dim
    return Part({m: torch.cat([p.rows[m] for p in pieces] + [torch.zeros(0, dtype=torch.long)])
                 for m in model.modalities},
                {m: torch.cat([p.vectors[m] for p in pieces] + [torch.zeros(0, dim)]) for m in model.modalities},
                {m: [n for p in pieces for n in p.lost[m]] for m in model.modalities})


def merge_parts(catalogue: Catalogue, parts: Sequence[Part], modalities: Sequence[str], dim: int,
                metadata: Dict[str, str], fusion_weights: Optional[Dict[str, float]] = None) -> ItemEmbeddings:
    """The catalogue's ``ItemEmbeddings`` from the parts of all its shards (rows in catalogue order,
    zero rows and mask False where an item lacks a modality or its file could not be read), fused."""
    count = len(catalogue.ids)
    vectors = {m: torch.zeros(count, dim) for m in modalities}  # (N, D) each
    masks = {m: torch.zeros(count, dtype=torch.bool) for m in modalities}  # (N,) each
    for part in parts:
        for m in modalities:
            vectors[m][part.rows[m]] = part.vectors[m]
            masks[m][part.rows[m]] = True
    vectors[FUSED], masks[FUSED] = fuse(vectors, masks, fusion_weights)
    return ItemEmbeddings(list(catalogue.ids), vectors, masks, dict(metadata))


def _unreadable_report(manifest: str, lost: Dict[str, List[str]], tally: Any) -> str:
    """Which items lost which modality to an unreadable file, why, and an example with its path."""
    reasons = ", ".join(f"{reason}: {n}" for reason, n in Counter(tally.counts).most_common())
    lines = [f"{manifest}: {sum(map(len, lost.values()))} media files could not be read ({reasons}); "
             f"those items keep their other modalities (mask False for the lost one):"]
    lines += [f"  {m} ({len(ids)}): {id_list(ids)}" for m, ids in lost.items() if ids]
    lines += [f"  e.g. {e.sample_id!r} at {e.where or '?'}: {e.reason} {e.detail[:160]}" for e in tally.examples[:3]]
    return "\n".join(lines)


def _check_inputs(checkpoint: str, manifests: Sequence[str], batch_size: int) -> None:
    """``ConfigError`` for a path or value that cannot be used, before the model is loaded."""
    if not os.path.isdir(checkpoint):
        raise ConfigError(f"checkpoint {checkpoint}: no such folder")
    if not manifests:
        raise ConfigError("no manifest to embed: give at least one")
    for manifest in manifests:
        if not is_manifest(manifest):
            raise ConfigError(f"{manifest}: not a manifest (.csv, .jsonl or .parquet); shards are not embedded here")
        if not os.path.isfile(manifest):
            raise ConfigError(f"{manifest}: no such manifest")
    if batch_size < 1:
        raise ConfigError(f"batch size {batch_size}: must be positive")


def _space_metadata(folder: str, model: Any, fusion_weights: Optional[Dict[str, float]], batch_size: int,
                    device: torch.device, manifests: Sequence[str], started_ns: int) -> Dict[str, str]:
    """What the vectors are (model, space, fusion), how they were computed (the same batch size on
    the same device type and torch gives the same vectors bit for bit) and when: ``started_ns``,
    taken before the model and the manifests were read."""
    return {"format": FORMAT, "checkpoint": os.path.abspath(folder), "dim": str(model.embed_dim),
            "modalities": ",".join(model.modalities), **fusion_metadata(fusion_weights),
            "batch_size": str(batch_size), "device": device.type, "torch": torch.__version__,
            **embedded_at_metadata(manifests, started_ns)}


def _load_checked(checkpoint: str, manifests: Sequence[str], batch_size: int, device: torch.device,
                  fusion_weights: Optional[Dict[str, float]], model: Optional[Any] = None) -> Tuple[str, Any, Any]:
    """(model folder, saved config with ``eval.batch_size``, model): every path and value checked
    before the model is loaded; ``model`` (already loaded from ``checkpoint``) is used as it is."""
    _check_inputs(checkpoint, manifests, batch_size)
    folder = model_folder(checkpoint)
    config = read_saved_config(folder, [f"eval.batch_size={batch_size}"])
    if model is None:
        model = load_model(folder, device=device)
    check_fusion_weights(fusion_weights, model.modalities)  # before the long part
    return folder, config, model


def _manifest_loaders(config: Any, model: Any, manifests: Sequence[str], device: torch.device) -> List[Any]:
    """An evaluation loader per manifest, with ``config``'s data settings. A manifest the reader
    refuses is an error with the reader's message, naming the file and its rows (``loader_from_config``:
    a ``RunError`` for bad rows such as a repeated id, a ``ConfigError`` for a column the config
    names and the file lacks): bad input, not a bug to show a traceback for."""
    processor = SampleProcessor(model.preprocessors(train=False))
    return [loader_from_config(config, processor, train=False, spec=manifest, pin_memory=device.type == "cuda")
            for manifest in manifests]


def _modality_catalogue(config: Any, model: Any, manifests: Sequence[str], batch_size: int,
                        device: torch.device) -> Catalogue:
    """The manifests as one ``Catalogue`` of all the model's modalities, a loader per manifest."""
    loaders = _manifest_loaders(config, model, manifests, device)
    rows = iter([loader.dataset.rows for loader in loaders])
    return read_catalogue(manifests, model.modalities, batch_size, lambda _: next(rows), loaders)


def load_for_embedding(checkpoint: str, manifests: Sequence[str], batch_size: int, device: torch.device,
                       fusion_weights: Optional[Dict[str, float]] = None) -> Tuple[Any, Catalogue, Dict[str, str]]:
    """(model, catalogue with its loaders, embeddings metadata) for ``checkpoint`` and ``manifests``,
    every input checked first (see ``embed_manifests``)."""
    started = time.time_ns()
    folder, config, model = _load_checked(checkpoint, manifests, batch_size, device, fusion_weights)
    catalogue = _modality_catalogue(config, model, manifests, batch_size, device)
    return model, catalogue, _space_metadata(folder, model, fusion_weights, batch_size, device, manifests, started)


# ---------------------------------------------------------------- multi-field products
# A model trained with ``model.fields`` (search-log fine-tuning) was taught that an item is the
# weighted mean of its field vectors, each text field embedded on its own (align/fields.py). Its
# catalogue is embedded the same way: one pass of the catalogue encoder per text field (the
# manifests read with ``data.columns.text`` set to that field's columns, so the text is joined as
# in training) and one per media field, then fused with the field weights. The result is an
# ``ItemEmbeddings`` like any other: ``image``/``audio`` per item, ``text`` the weighted mean of its
# text fields, ``fused`` the weighted mean over all fields (what the index holds); its metadata
# says ``fusion: fields`` and the weights, so an append with other fields is refused.

def fields_metadata(fields: Mapping[str, FieldConfig]) -> Dict[str, str]:
    """The metadata entries that say how a catalogue embedded by ``fields`` is fused (compared
    before an --append: other fields or weights make other vectors)."""
    described = ",".join(f"{name}:{spec.modality}{'[' + '+'.join(spec.columns) + ']' if spec.columns else ''}"
                         f"={spec.weight:g}" for name, spec in fields.items())
    return {"fusion": "fields", "fields": described}


def embed_fields(model: Any, config: Any, manifests: Sequence[str], batch_size: int, device: torch.device,
                 fields: Mapping[str, FieldConfig], progress: Optional[str] = None
                 ) -> Tuple[list, Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(ids, vectors, masks) of every item of ``manifests``: per modality and ``fused`` (module doc)."""
    passes: Dict[str, Tuple[str, Any]] = {}  # field -> (modality, config it is read with)
    for name, spec in fields.items():
        if spec.modality == "text":
            columns = dataclasses.replace(config.data.columns, text=list(spec.columns))
            passes[name] = ("text", dataclasses.replace(config, data=dataclasses.replace(config.data, columns=columns)))
        else:
            passes[name] = (spec.modality, config)
    ids = None
    vectors: Dict[str, torch.Tensor] = {}
    masks: Dict[str, torch.Tensor] = {}
    for name, (modality, read_config) in passes.items():
        loaders = _manifest_loaders(read_config, model, manifests, device)
        rows = iter([loader.dataset.rows for loader in loaders])
        catalogue = read_catalogue(manifests, [modality], batch_size, lambda _: next(rows), loaders)
        part = embed_batches(model, catalogue, catalogue.batches(), device,
                             None if progress is None else f"{progress} {name}")
        ids = catalogue.ids if ids is None else ids
        count = len(ids)
        vectors[name] = torch.zeros(count, model.embed_dim)
        masks[name] = torch.zeros(count, dtype=torch.bool)
        vectors[name][part.rows[modality]] = part.vectors[modality]
        masks[name][part.rows[modality]] = True
    weights = field_weights(fields)
    out_vectors: Dict[str, torch.Tensor] = {}
    out_masks: Dict[str, torch.Tensor] = {}
    for modality in model.modalities:  # per modality: its fields fused (text: title + description + ...)
        own = [name for name, spec in fields.items() if spec.modality == modality and weights[name] > 0]
        if own:
            out_vectors[modality], out_masks[modality] = fuse({n: vectors[n] for n in own},
                                                              {n: masks[n] for n in own}, {n: weights[n] for n in own})
        else:
            out_vectors[modality] = torch.zeros(len(ids), model.embed_dim)
            out_masks[modality] = torch.zeros(len(ids), dtype=torch.bool)
    out_vectors[FUSED], out_masks[FUSED] = fuse(vectors, masks, weights)
    return list(ids), out_vectors, out_masks


def embed_manifests(checkpoint: str, manifests: Sequence[str], batch_size: int = 256,
                    device: Optional[Union[str, torch.device]] = None,
                    fusion_weights: Optional[Dict[str, float]] = None, progress: bool = True,
                    fields: Optional[Dict[str, Any]] = None, model: Optional[Any] = None) -> ItemEmbeddings:
    """Embed every item of ``manifests`` (rows in order, manifest after manifest) with the model in
    ``checkpoint`` (a checkpoint or its ``model/`` folder), and fuse the modalities (``fuse``), in
    memory. A checkpoint trained with ``model.fields`` (or ``fields`` given here) is embedded
    field by field and fused with the field weights instead (align/index/fields.py). The vectors are bit for bit those of ``align embed`` at the same batch size, sharded
    or not (``Catalogue``).

    Args:
        checkpoint: read through align/loading.py (safetensors, YAML and JSON only).
        manifests: CSV, JSONL or Parquet files read with the checkpoint's ``data.columns`` and
            ``data.root``; item ids must be unique over all of them.
        batch_size: samples per batch (each sample is one modality of one item).
        device: "cpu", "cuda", ...; default cuda when available.
        fusion_weights: modality -> weight, see ``fuse``; None: equal weights.
        progress: a tqdm bar over each manifest's batches.
        fields: product fields to embed with instead of the checkpoint's ``model.fields``.
        model: the model of ``checkpoint``, already loaded on ``device`` (e.g. a ``QueryEncoder``'s),
            so that a caller that also encodes queries loads it once; None: loaded here.
    Raises:
        ConfigError for a path or value that cannot be used (before the model is loaded),
        RunError for an id in two manifests or a catalogue with too many unreadable files.
    """
    started = time.time_ns()
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    folder, config, model = _load_checked(checkpoint, manifests, batch_size, target, fusion_weights, model)
    metadata = _space_metadata(folder, model, fusion_weights, batch_size, target, manifests, started)
    return embed_catalogue(model, config, manifests, batch_size, target, metadata,
                           fusion_weights=fusion_weights, progress=progress, fields=fields)


def embed_catalogue(model: Any, config: Any, manifests: Sequence[str], batch_size: int, device: torch.device,
                    metadata: Dict[str, str], *, fusion_weights: Optional[Dict[str, float]] = None,
                    progress: bool = False, fields: Optional[Dict[str, Any]] = None) -> ItemEmbeddings:
    """``embed_manifests`` with the model and its run config in hand (the trainer's validation
    embeds with the model it is training): by fields when ``fields`` or ``config.model.fields``
    name some, else by modality; ``model`` in eval mode, on ``device``."""
    fields = dict(config.model.fields) if fields is None else dict(fields)
    if fields:  # each field pass reads the manifests itself: no catalogue of the model's modalities
        if fusion_weights is not None:
            raise ConfigError("fusion weights and model.fields both say how to fuse; the fields' weights are used, "
                              "drop the fusion weights")
        ids, vectors, masks = embed_fields(model, config, manifests, batch_size, device, fields,
                                           "" if progress else None)
        return ItemEmbeddings(ids, vectors, masks, {**metadata, **fields_metadata(fields)})
    catalogue = _modality_catalogue(config, model, manifests, batch_size, device)
    part = embed_batches(model, catalogue, catalogue.batches(), device, "" if progress else None)
    return merge_parts(catalogue, [part], model.modalities, model.embed_dim, metadata, fusion_weights)


# --- shards on disk: plan, parts, merge -----------------------------------------------------------

PARTS = "parts"  # <out>/parts/: plan.json and the parts of an unfinished `align embed`
PLAN_FILE = "plan.json"
PLAN_FORMAT = "align-embed-plan/1"
PART_FORMAT = "align-embed-part/1"
MERGE_LOCK = "merge.lock"
SHARD_SAMPLES = 50_000  # default shard size, in (item, modality) samples: minutes of work on one GPU


def part_paths(parts: str, shard: int, shards: int) -> Tuple[str, str]:
    """(tensors, listing) of shard ``shard`` of ``shards``: ``part-00003-of-00008.safetensors`` and ``.json``."""
    stem = os.path.join(parts, f"part-{shard:05d}-of-{shards:05d}")
    return stem + ".safetensors", stem + ".json"


def shard_batches(batches: Sequence[Tuple[int, int, int]], shards: int) -> List[List[Tuple[int, int, int]]]:
    """The batches cut into ``shards`` runs of consecutive batches, near-equal in count (some may be empty)."""
    return [list(batches[j * len(batches) // shards:(j + 1) * len(batches) // shards]) for j in range(shards)]


def default_shards(catalogue: Catalogue, workers: int) -> int:
    """About ``SHARD_SAMPLES`` samples a shard, and a multiple of ``workers`` so that each has as many."""
    wanted = max(1, math.ceil(sum(map(len, catalogue.samples)) / SHARD_SAMPLES))
    return workers * math.ceil(wanted / workers)


def _stamp(path: str) -> Dict[str, Any]:
    status = os.stat(path)
    return {"path": os.path.abspath(path), "bytes": status.st_size, "mtime_ns": status.st_mtime_ns}


def embedding_plan(catalogue: Catalogue, folder: str, metadata: Dict[str, str], shards: int) -> Dict[str, Any]:
    """What a folder of parts was made from, and its digest: a part is reused only under the same
    digest. The inputs are the manifests and the model's files (path, size and modification time),
    the fusion, the batch size, the device type, torch's version and the shard count: each changes
    which vectors a part holds (the last three in float32 rounding: parts of two devices or two
    torch versions would make a folder whose rows were not all computed alike)."""
    inputs = {"manifests": [_stamp(m) for m in catalogue.manifests],
              "model": [_stamp(os.path.join(folder, name)) for name in ("model.safetensors", "config.yaml")],
              "fusion": _fusion_entries(metadata), "batch_size": catalogue.batch_size,
              "device": metadata["device"], "torch": metadata["torch"], "shards": shards}
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    return {"format": PLAN_FORMAT, "digest": digest, "shards": shards, "items": len(catalogue.ids),
            "batches": len(catalogue.batches()), "dim": int(metadata["dim"]),
            "modalities": metadata["modalities"].split(","), "metadata": metadata, "inputs": inputs}


def _fusion_entries(metadata: Dict[str, str]) -> Dict[str, str]:
    """The entries of ``metadata`` that say how ``fused`` is made (``fusion_metadata``)."""
    return {k: v for k, v in metadata.items() if k.startswith("fusion")}


def _differences(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """What changed between two plans' inputs, in words."""
    changed = []
    for key in new:
        if key in ("manifests", "model"):
            before = {item["path"]: item for item in old.get(key, [])}
            for item in new[key]:
                if before.get(item["path"]) != item:
                    changed.append(f"{item['path']} is new or changed (size or modification time)")
            gone = set(before) - {item["path"] for item in new[key]}
            changed += [f"{path} is no longer given" for path in sorted(gone)]
        elif old.get(key) != new[key]:
            changed.append(f"{key} was {old.get(key)!r}, now {new[key]!r}")
    return changed or ["the plan's format"]


def read_plan(parts: str) -> Optional[Dict[str, Any]]:
    """The plan.json in ``parts``, or None when there is none."""
    path = os.path.join(parts, PLAN_FILE)
    return read_json(path) if os.path.isfile(path) else None


def check_plan(parts: str, plan: Dict[str, Any], restart: bool) -> None:
    """A ``ConfigError`` when ``parts`` holds parts of other inputs and ``restart`` is off."""
    old = read_plan(parts)
    if old is None or restart or old.get("digest") == plan["digest"]:
        return
    changes = "; ".join(_differences(old.get("inputs", {}), plan["inputs"]))
    raise ConfigError(f"{os.path.join(parts, PLAN_FILE)}: its parts were embedded from other inputs ({changes}); "
                      f"give the same inputs to resume, or add --restart to discard them and embed again")


def start_plan(parts: str, plan: Dict[str, Any], restart: bool) -> None:
    """Write ``plan`` into ``parts`` (after ``check_plan``); ``restart`` first removes the old parts."""
    if restart and os.path.isdir(parts):
        shutil.rmtree(parts)
    old = read_plan(parts)
    if old is None or old.get("digest") != plan["digest"]:
        write_json_atomic(plan, os.path.join(parts, PLAN_FILE))


def part_done(parts: str, shard: int, plan: Dict[str, Any]) -> bool:
    """Whether the part of ``shard`` was written whole for this plan (its listing, written last, names
    the plan's digest and the byte size of its tensors)."""
    tensors, listing = part_paths(parts, shard, plan["shards"])
    if not (os.path.isfile(tensors) and os.path.isfile(listing)):
        return False
    try:
        info = read_json(listing)
        size = os.path.getsize(tensors)
    except (RunError, OSError):  # gone meanwhile: another job merged and removed parts/
        return False
    return isinstance(info, dict) and info.get("digest") == plan["digest"] and info.get("bytes") == size


def write_part(parts: str, shard: int, plan: Dict[str, Any], part: Part, ids: Sequence[str]) -> None:
    """The part of ``shard``, tensors first then its listing (ids of its rows, ids it lost), both atomic."""
    tensors, listing = part_paths(parts, shard, plan["shards"])
    write_tensors({**{f"rows.{m}": part.rows[m] for m in part.rows}, **{f"vectors.{m}": part.vectors[m]
                                                                        for m in part.vectors}},
                  tensors, metadata={"format": PART_FORMAT, "digest": plan["digest"], "shard": str(shard)})
    write_json_atomic({"format": PART_FORMAT, "shard": shard, "shards": plan["shards"], "digest": plan["digest"],
                       "bytes": os.path.getsize(tensors),
                       "ids": {m: [ids[r] for r in rows.tolist()] for m, rows in part.rows.items()},
                       "lost": {m: [ids[r] for r in rows] for m, rows in part.lost.items()}}, listing)


def read_part(parts: str, shard: int, plan: Dict[str, Any], catalogue: Catalogue) -> Part:
    """The part of ``shard``, checked against the plan and the catalogue (``RunError`` naming the file)."""
    tensors_path, listing_path = part_paths(parts, shard, plan["shards"])
    if not part_done(parts, shard, plan):
        raise RunError(f"{listing_path}: missing, unfinished or of another plan; embed shard {shard} again "
                       f"(run the same `align embed` command without --merge-only)")
    tensors, _ = read_tensors(tensors_path)
    info = read_json(listing_path)
    dim, row_of, part = plan["dim"], None, Part({}, {}, {})
    for m in plan["modalities"]:
        rows, vectors = tensors.get(f"rows.{m}"), tensors.get(f"vectors.{m}")
        if (rows is None or vectors is None or rows.dtype != torch.long or vectors.dtype != torch.float32
                or tuple(vectors.shape) != (rows.shape[0], dim)):
            raise RunError(f"{tensors_path}: rows.{m} and vectors.{m} must be int64 (n,) and float32 (n, {dim}); "
                           f"embed shard {shard} again (remove the file)")
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= len(catalogue.ids)
                             or [catalogue.ids[r] for r in rows.tolist()] != info["ids"].get(m)):
            raise RunError(f"{tensors_path}: its {m} rows are not the items {listing_path} lists in this catalogue; "
                           f"embed with --restart")
        row_of = row_of or {item: n for n, item in enumerate(catalogue.ids)}
        part.rows[m], part.vectors[m] = rows, vectors
        part.lost[m] = [row_of[item] for item in info.get("lost", {}).get(m, []) if item in row_of]
    return part


def _take_merge_lock(parts: str) -> Optional[int]:
    """One `--part` job merges: the one that holds an exclusive lock on ``parts/merge.lock`` (its
    descriptor, returned; None when another job holds it, or merged and removed ``parts/``). The
    lock dies with its holder, so a merging job killed midway (a time limit, a preemption) does not
    keep the next one from merging."""
    import fcntl

    try:
        handle = os.open(os.path.join(parts, MERGE_LOCK), os.O_CREAT | os.O_WRONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(handle)
        return None
    return handle


def parse_part(text: str) -> Tuple[int, int]:
    """``"2/8"`` -> (2, 8) (``--part``: this job takes the shards j with j % 8 == 2)."""
    index, _, count = text.partition("/")
    try:
        value = (int(index), int(count))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected i/n, e.g. 0/4 for the first of four jobs") from None
    if not 0 <= value[0] < value[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: i must lie in 0 .. n-1")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align embed", description=__doc__ + SHARDING_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint or its model/ folder (model.safetensors)")
    parser.add_argument("--manifest", required=True, nargs="+", help="CSV, JSONL or Parquet catalogue(s), in row order")
    parser.add_argument("--out", required=True, help="folder for embeddings.safetensors and ids.json")
    parser.add_argument("--batch-size", type=int, default=256, help="samples per batch (one modality of one item each)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available; under a multi-process "
                                         "launch each rank's own GPU, or cpu for all)")
    parser.add_argument("--fusion-weights", type=parse_fusion_weights,
                        help="weighted mean for the fused vector, e.g. text=1,image=2,audio=0 (default: equal)")
    parser.add_argument("--dim", type=int, help="keep the first DIM coordinates of every vector, renormalised "
                                                "(Matryoshka; at most the model's embed_dim; default: all)")
    parser.add_argument("--append", action="store_true",
                        help="merge into the embeddings already in --out: new ids added, repeated ids replaced")
    parser.add_argument("--shards", type=int, help=f"cut the catalogue into this many shards (default: one per "
                                                   f"~{SHARD_SAMPLES} samples, or what <out>/parts/plan.json says)")
    parser.add_argument("--part", type=parse_part, help="i/n: embed only the shards j with j %% n == i (one job of n, "
                                                        "e.g. a SLURM array); the job that finds all parts merges")
    parser.add_argument("--merge-only", action="store_true", help="merge the parts in <out>/parts; embed nothing")
    parser.add_argument("--restart", action="store_true", help="discard parts made from other inputs and start again")
    parser.add_argument("--keep-parts", action="store_true", help="keep <out>/parts after merging")
    return parser


SHARDING_HELP = """
Shards: the catalogue's batches are cut into S runs (--shards; a shard's part is written to
<out>/parts/part-0000j-of-0000S.safetensors + .json, atomically, as soon as it is done), then merged
in row order into the two files above, and parts/ is removed (--keep-parts keeps it). A rerun skips
the parts already written for the same inputs (recorded in <out>/parts/plan.json; other inputs are
refused unless --restart). Under `accelerate launch` rank r embeds the shards j with j % world == r
and rank 0 merges; --part i/n runs one job of n (the last one to finish merges, or --merge-only).
A sample meets the same batch-mates however the catalogue is sharded, so the vectors are the same
bit for bit as one process's (same device type, threads and --batch-size).
"""


def _summary(emb: ItemEmbeddings, seconds: float) -> List[str]:
    counts = "  ".join(f"{name}: {int(emb.masks[name].sum())}" for name in emb.vectors)
    has_any = torch.stack([emb.masks[m] for m in emb.modalities]).any(dim=0)  # (N,)
    bare = [emb.ids[i] for i in (~has_any).nonzero().flatten().tolist()]
    lines = [f"embedded {len(emb.ids)} items in {seconds:.1f} s", f"  with {counts}"]
    lines.append(f"  items without any modality: {len(bare)}" + (f" (zero rows, mask False): {id_list(bare)}"
                                                                    if bare else ""))
    return lines


def _check_arguments(args: argparse.Namespace) -> None:
    from align.index.build import INFO_FILE

    if not os.path.isdir(args.checkpoint):  # before its config is read (--dim, --append)
        raise ConfigError(f"checkpoint {args.checkpoint}: no such folder")
    if os.path.isfile(os.path.join(args.out, INFO_FILE)):  # both folders keep their ids in ids.json
        raise ConfigError(f"--out {args.out}: holds an index ({INFO_FILE}, written by `align index`), whose "
                          f"{IDS_FILE} the item vectors' would overwrite; give the vectors a folder of their own")
    if args.dim is not None:  # before any work
        check_prefix_dim(args.dim, read_saved_config(model_folder(args.checkpoint)).model.embed_dim)
    if args.shards is not None and args.shards < 1:
        raise ConfigError(f"--shards {args.shards}: must be positive")
    if args.restart and (args.part or args.merge_only):
        raise ConfigError("--restart with --part or --merge-only would discard other jobs' parts; remove "
                          "<out>/parts yourself before starting the jobs again")


def _fusion_to_record(args: argparse.Namespace) -> Dict[str, str]:
    """How the vectors this run writes will be fused, as their metadata will say: by the checkpoint's
    ``model.fields``, by the plan of the parts that --merge-only merges (``_merge_weights``), or by
    --fusion-weights."""
    fields = read_saved_config(model_folder(args.checkpoint)).model.fields
    if fields:
        return fields_metadata(fields)
    plan = read_plan(os.path.join(args.out, PARTS)) if args.merge_only else None
    if plan is not None and args.fusion_weights is None:
        return _fusion_entries(plan["metadata"])
    return fusion_metadata(args.fusion_weights)


def _existing(args: argparse.Namespace) -> Optional[ItemEmbeddings]:
    """With --append, the embeddings already in --out, checked against the new inputs before any work."""
    if not args.append:
        return None
    if not os.path.isfile(os.path.join(args.out, TENSORS_FILE)):
        raise ConfigError(f"--append: {args.out} holds no {TENSORS_FILE}; leave out --append to create it")
    existing = load_item_embeddings(args.out)
    expected = {"checkpoint": os.path.abspath(model_folder(args.checkpoint)), **_fusion_to_record(args)}
    check_same_space(existing.metadata, expected, ("checkpoint", "fusion", "fusion_weights", "fields"),
                     f"--append {args.out}")
    width = int(existing.vectors[FUSED].shape[-1])
    if width != (args.dim or int(existing.metadata.get("full_dim", width))):
        raise ConfigError(f"--append {args.out}: its vectors have dim {width}; embed with --dim {width} to add to them")
    return existing


def _embed_shards(args: argparse.Namespace, processes: Processes, worker: int, workers: int) -> Dict[str, Any]:
    """Embed this worker's shards that are not done yet; returns the plan."""
    model, catalogue, metadata = load_for_embedding(args.checkpoint, args.manifest, args.batch_size,
                                                    processes.device, args.fusion_weights)
    parts = os.path.join(args.out, PARTS)
    old = None if args.restart else read_plan(parts)
    shards = args.shards or (old or {}).get("shards") or default_shards(catalogue, workers)
    plan = embedding_plan(catalogue, model_folder(args.checkpoint), metadata, shards)
    check_plan(parts, plan, args.restart)  # every rank, so that all stop alike
    if processes.main:
        start_plan(parts, plan, args.restart)
    processes.barrier()
    cut = shard_batches(catalogue.batches(), shards)
    mine = [j for j in range(shards) if j % workers == worker]
    done = [j for j in mine if part_done(parts, j, plan)]
    if done:
        print(f"{len(done)} of this job's {len(mine)} shards were already embedded; they are kept", flush=True)
    run = run_tally(catalogue)  # one over this process's shards
    for j in mine:
        if j in done:
            continue
        start = time.perf_counter()
        label = f"[rank {processes.rank}] shard {j + 1}/{shards}" if processes.world > 1 else f"shard {j + 1}/{shards}"
        part = embed_batches(model, catalogue, cut[j], processes.device, label, position=processes.rank, run=run)
        write_part(parts, j, plan, part, catalogue.ids)
        samples = sum(len(v) for v in part.rows.values())
        print(f"{label}: {samples} samples in {time.perf_counter() - start:.1f} s -> "
              f"{part_paths(parts, j, shards)[0]}", flush=True)
    return plan


def _merge(args: argparse.Namespace, existing: Optional[ItemEmbeddings], start: float) -> None:
    """Merge every part in <out>/parts into the embeddings (appended to ``existing``), then remove parts/."""
    parts = os.path.join(args.out, PARTS)
    plan = read_plan(parts)
    if plan is None:
        raise RunError(f"{parts}: no {PLAN_FILE}; nothing to merge (embed without --merge-only first)")
    weights = _merge_weights(plan, args.fusion_weights, parts)
    columns = read_saved_config(model_folder(args.checkpoint)).data.columns
    catalogue = read_catalogue(args.manifest, plan["modalities"], args.batch_size,
                               lambda manifest: read_manifest_rows(manifest, columns))
    current = embedding_plan(catalogue, model_folder(args.checkpoint), plan["metadata"], plan["shards"])
    check_plan(parts, current, restart=False)
    missing = [j for j in range(plan["shards"]) if not part_done(parts, j, plan)]
    if missing:
        raise RunError(f"{parts}: shards {missing} of {plan['shards']} are not embedded yet; run the jobs that embed "
                       f"them (--part), then merge")
    loaded = [read_part(parts, j, plan, catalogue) for j in range(plan["shards"])]
    emb = merge_parts(catalogue, loaded, plan["modalities"], plan["dim"], plan["metadata"], weights)
    if args.dim is not None:  # the parts stay full width, so another --dim reuses them
        emb = truncate_embeddings(emb, args.dim)
    lines = _summary(emb, time.perf_counter() - start)
    if args.dim is not None:
        lines.append(f"  vectors cut to their first {args.dim} of {plan['dim']} coordinates, renormalised (--dim)")
    lost = {m: sum(len(p.lost[m]) for p in loaded) for m in plan["modalities"]}
    if any(lost.values()):
        lines.append("  unreadable files (reported per shard above): "
                     + "  ".join(f"{m}: {n}" for m, n in lost.items() if n))
    if existing is not None:
        known = existing.row_of()
        replaced = sum(1 for item in emb.ids if item in known)
        emb = append_item_embeddings(existing, emb)
        lines.append(f"  appended to {len(known)} items: {len(emb.ids) - len(known)} new, {replaced} replaced, "
                     f"{len(emb.ids)} now")
    save_item_embeddings(emb, args.out)
    if not args.keep_parts:
        shutil.rmtree(parts)
    print("\n".join(lines + [f"  -> {os.path.join(args.out, TENSORS_FILE)}, {IDS_FILE}"]), flush=True)


def _merge_weights(plan: Dict[str, Any], given: Optional[Dict[str, float]], parts: str) -> Optional[Dict[str, float]]:
    """The fusion weights that merge ``plan``'s parts: the plan's own, which the folder's metadata
    will record. --fusion-weights that say otherwise are a ``ConfigError``: the folder would say
    one fusion and hold another."""
    planned = _fusion_entries(plan["metadata"])
    if given is None:
        return fusion_weights_of(planned)
    if fusion_metadata(given) != planned:
        described = planned.get("fusion_weights") or f"equal weights (fusion {planned.get('fusion')})"
        raise ConfigError(f"--fusion-weights {fusion_metadata(given)['fusion_weights']}: the parts in {parts} were "
                          f"planned with {described}; leave out --fusion-weights to merge them so, or embed "
                          f"again into another --out with these weights")
    return given


def _embed_by_fields(args: argparse.Namespace, existing: Optional[ItemEmbeddings], start: float) -> int:
    """``align embed`` of a checkpoint trained with ``model.fields``: field by field, in one process
    (``embed_manifests``), then cut (``--dim``), appended and saved as the sharded path does."""
    if args.part or args.merge_only or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"{args.checkpoint} embeds products field by field (model.fields); --part, --merge-only "
                          f"and several processes are not supported for such checkpoints yet: run one process")
    emb = embed_manifests(args.checkpoint, args.manifest, args.batch_size, args.device,
                          fusion_weights=args.fusion_weights)
    if args.dim is not None:
        emb = truncate_embeddings(emb, args.dim)
    lines = _summary(emb, time.perf_counter() - start) + [f"  fused from the fields {emb.metadata['fields']}"]
    if existing is not None:
        emb = append_item_embeddings(existing, emb)
        lines.append(f"  appended: {len(emb.ids)} items now")
    save_item_embeddings(emb, args.out)
    print("\n".join(lines + [f"  -> {os.path.join(args.out, TENSORS_FILE)}, {IDS_FILE}"]), flush=True)
    return 0


def read_manifest_rows(manifest: str, columns: Any) -> List[Dict[str, Any]]:
    """A manifest's rows as the loader reads them with ``columns`` (``data.columns``), without
    loading the model. A manifest the reader refuses (a repeated id, no id column) is a ``RunError``
    (or a ``ConfigError``) with its message, naming the file and rows, as ``_manifest_loaders`` does."""
    from align.data.manifest import read_manifest

    try:
        return read_manifest(manifest, columns)
    except ConfigError:  # a column the config names and the file lacks: exit 2, as training says it
        raise
    except ValueError as error:
        raise RunError(str(error)) from None


def main(argv: Optional[List[str]] = None) -> int:
    """``align embed``; a ``ConfigError`` or ``RunError`` is left to align/cli.py to report."""
    args = _parser().parse_args(argv)
    _check_arguments(args)
    start = time.perf_counter()
    existing = _existing(args)  # checked before the long embedding
    if read_saved_config(model_folder(args.checkpoint)).model.fields:
        return _embed_by_fields(args, existing, start)
    processes = join_processes(args.device)
    index, count = args.part or (0, 1)
    worker, workers = index * processes.world + processes.rank, count * processes.world
    if args.merge_only:
        if processes.main:
            _merge(args, existing, start)
        return 0
    plan = _embed_shards(args, processes, worker, workers)
    processes.barrier()
    parts = os.path.join(args.out, PARTS)
    if processes.world > 1 and not processes.main:
        return 0
    if args.part:
        waiting = [j for j in range(plan["shards"]) if not part_done(parts, j, plan)]
        if waiting:
            print(f"job {index}/{count} done; {len(waiting)} of {plan['shards']} shards still to embed by the other "
                  f"jobs (the last one merges; or run this command with --merge-only)", flush=True)
            return 0
        lock = _take_merge_lock(parts)
        # Under the lock, look again: a job that merged before us has removed parts/.
        if lock is None or not all(part_done(parts, j, plan) for j in range(plan["shards"])):
            print(f"job {index}/{count} done; another job merges or has merged ({parts})", flush=True)
            return 0
        try:
            _merge(args, existing, start)
        finally:
            os.close(lock)
        return 0
    _merge(args, existing, start)
    return 0
