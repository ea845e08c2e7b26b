"""``align embed``: embed every item of a catalogue once with a trained model, into a folder that
retrieval and recommendation read (``load_item_embeddings``); ``--append`` adds cold items to it
later, and replaces re-embedded ones, without embedding the rest again.

Folder format ``align-item-embeddings/1``::

    <out>/embeddings.safetensors
        text, image, audio   float32 (N, D)  only the modalities the model has; L2-normalised rows,
                                             zero rows where the item lacks that modality
        fused                float32 (N, D)  normalised (weighted) mean of the item's modality
                                             vectors (``fuse``); a zero row when it has none
        mask.text, ...,      bool (N,)       the row is a real embedding (the item has it)
        mask.fused
        metadata (strings)   format "align-item-embeddings/1", checkpoint (absolute path of the
                             model folder), dim "D", modalities "text,image,audio",
                             fusion "mean" | "weighted_mean" (then also fusion_weights "image=2,text=1")
    <out>/ids.json           {"ids": [item ids in row order], "modalities": [...], "dim": D, "count": N}

Rows follow the manifests' rows, manifest after manifest in the order given; an id may appear once.
Both files are written atomically (a temporary file renamed over the old one), the tensors first;
``load_item_embeddings`` refuses a pair whose counts or keys disagree.

Every manifest row gets a row here. Each (item, modality) is embedded as a sample of its own, so a
missing or corrupt media file costs its item that modality only (zero row, mask False): the loader
skips and counts the file as in training (align/data/bad_samples.py; the checkpoint's
``data.max_bad_fraction`` still stops a broken catalogue, counted over (item, modality) samples),
and the command prints which ids lost which modality and why. An item left with no modality at all
(empty cells, or every file unreadable) keeps zero rows and ``mask.fused`` False, and is reported.

The manifests are read as ``align eval`` reads a split, with the ``data`` section saved with the
checkpoint (columns, media root, workers); the checkpoint is read through align/loading.py:
safetensors, YAML and JSON only, nothing here is ever unpickled.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from align.data.loader import loader_from_config
from align.data.manifest import is_manifest
from align.data.transforms import SampleProcessor
from align.errors import MODALITIES, ConfigError, RunError, write_json_atomic
from align.eval.runner import embed_split
from align.loading import load_model, model_folder, read_json, read_saved_config, read_tensors, write_tensors

FORMAT = "align-item-embeddings/1"
TENSORS_FILE = "embeddings.safetensors"
IDS_FILE = "ids.json"
FUSED = "fused"
MASK = "mask."  # prefix of the mask tensors' names
SHOWN_IDS = 20  # ids listed per line of a report; the masks hold every one


@dataclass
class ItemEmbeddings:
    """A catalogue's item embeddings, one row per item (format in the module docstring).

    Attributes:
        ids: item ids in row order, unique.
        vectors: modality or ``"fused"`` -> (N, D) float32; unit rows, zero rows where masked out.
        masks: modality or ``"fused"`` -> (N,) bool; True where the row is a real embedding.
        metadata: the safetensors metadata (``format``, ``checkpoint``, ``dim``, ``modalities``, ``fusion``).
    """

    ids: List[str]
    vectors: Dict[str, torch.Tensor]
    masks: Dict[str, torch.Tensor]
    metadata: Dict[str, str]

    @property
    def modalities(self) -> List[str]:
        """The model's modalities held here, in order, without ``"fused"``."""
        return [name for name in self.vectors if name != FUSED]

    def row_of(self) -> Dict[str, int]:
        """Item id -> its row."""
        return {item: row for row, item in enumerate(self.ids)}

    def select(self, rows: Union[Sequence[int], torch.Tensor]) -> "ItemEmbeddings":
        """The items at ``rows``, in that order, with the same metadata."""
        index = torch.as_tensor(rows, dtype=torch.long).reshape(-1)  # (M,)
        return ItemEmbeddings([self.ids[i] for i in index.tolist()],
                              {name: v[index] for name, v in self.vectors.items()},
                              {name: m[index] for name, m in self.masks.items()}, dict(self.metadata))


def check_fusion_weights(weights: Optional[Dict[str, float]], modalities: Sequence[str]) -> None:
    """A ``ConfigError`` unless ``weights`` is None or gives every one of ``modalities`` a weight >= 0."""
    if weights is None:
        return
    if set(weights) != set(modalities):
        raise ConfigError(f"fusion weights name {sorted(weights)}; give exactly the modalities {list(modalities)} "
                          f"a weight each (0 leaves one out of the fused vector)")
    bad = {m: w for m, w in weights.items() if not (math.isfinite(w) and w >= 0)}
    if bad or not any(weights.values()):
        raise ConfigError(f"fusion weights {weights}: each must be finite and >= 0, and one > 0")


def fuse(vectors: Dict[str, torch.Tensor], masks: Dict[str, torch.Tensor],
         weights: Optional[Dict[str, float]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One vector per item: the normalised weighted mean of the modality vectors it has,

        fused_i = normalize( sum_m w_m [i has m] v_im / sum_m w_m [i has m] ),   v_im = normalize(row)

    Args:
        vectors: modality -> (N, D); a ``"fused"`` entry is ignored.
        masks: modality -> (N,) bool, the item has that modality.
        weights: modality -> weight >= 0 for every modality of ``vectors``; None: equal weights.
            The weights are fixed numbers: learning them (from interactions, say) is out of scope.
    Returns:
        (fused (N, D) float32 with unit rows, zero rows where the item has no modality of positive
        weight; mask (N,) bool, True where the row is real).
    """
    names = [name for name in vectors if name != FUSED]
    if not names:
        raise ValueError("fuse needs at least one modality's vectors")
    check_fusion_weights(weights, names)
    first = vectors[names[0]]
    total = torch.zeros(first.shape, dtype=torch.float32, device=first.device)  # (N, D)
    weight_sum = torch.zeros(first.shape[0], dtype=torch.float32, device=first.device)  # (N,)
    for name in names:
        weight = masks[name].float() * (1.0 if weights is None else float(weights[name]))  # (N,)
        total += weight[:, None] * F.normalize(vectors[name].float(), dim=-1)
        weight_sum += weight
    present = weight_sum > 0
    mean = total / weight_sum.clamp_min(1e-12)[:, None]  # (N, D); rows without a modality stay zero
    return F.normalize(mean, dim=-1), present


def fusion_metadata(weights: Optional[Dict[str, float]]) -> Dict[str, str]:
    """The metadata entries that say how ``fused`` was made (compared before an append)."""
    if weights is None:
        return {"fusion": "mean"}
    return {"fusion": "weighted_mean", "fusion_weights": ",".join(f"{m}={weights[m]:g}" for m in sorted(weights))}


class _ProgressLoader:
    """A loader whose batches pass through a tqdm bar: ``embed_split`` takes any loader and draws none."""

    def __init__(self, loader: Any, label: str) -> None:
        self.loader, self.label, self.bad = loader, label, loader.bad

    def __len__(self) -> int:
        return len(self.loader)

    def iterate(self, epoch: int, skip_batches: int = 0) -> Iterator[Dict[str, Any]]:
        from tqdm import tqdm

        yield from tqdm(self.loader.iterate(epoch, skip_batches), total=len(self.loader) - skip_batches,
                        desc=f"embed {self.label}", unit="batch", leave=False)


def _embed_manifest(model: Any, loader: Any, device: torch.device,
                    progress: bool) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """Embed the items of one manifest loader: ({modality: (N, D)}, {modality: (N,) bool}), rows in
    manifest order. Media that cannot be read leave their (item, modality) masked out and are reported."""
    dataset = loader.dataset
    items = dataset.rows  # read_manifest rows, manifest order
    row_of = {row["id"]: n for n, row in enumerate(items)}
    vectors = {m: torch.zeros(len(items), model.embed_dim) for m in model.modalities}  # (N, D) each
    masks = {m: torch.zeros(len(items), dtype=torch.bool) for m in model.modalities}  # (N,) each
    # One sample per (item, modality): the loader drops a whole sample when one of its files is bad,
    # and a broken image must not cost the item its text. Modality after modality, so that batches
    # stay single-modality and each tower still gets full batches. The rows are swapped on the loader's
    # own dataset, so that columns, media root, workers and the bad-sample tally stay the config's.
    dataset.rows = [{**row, **{other: None for other in MODALITIES if other != m}}
                    for m in model.modalities for row in items if row[m] is not None]
    if dataset.rows:
        embedded = embed_split(model, _ProgressLoader(loader, os.path.basename(dataset.path)) if progress else loader,
                               device)
        for m in model.modalities:
            got = embedded["masks"][m]  # (R,): the samples of modality m that were read
            rows = torch.tensor([row_of[item] for item, has in zip(embedded["ids"], got.tolist()) if has],
                                dtype=torch.long)
            vectors[m][rows] = embedded["embeddings"][m][got]
            masks[m][rows] = True
    dataset.rows = items
    lost = {m: [row["id"] for row in items if row[m] is not None and not masks[m][row_of[row["id"]]]]
            for m in model.modalities}
    if any(lost.values()):
        print(_unreadable_report(dataset.path, lost, loader.bad), flush=True)
    return vectors, masks


def _id_list(ids: Sequence[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:SHOWN_IDS])
    return shown + (f" ... and {len(ids) - SHOWN_IDS} more" if len(ids) > SHOWN_IDS else "")


def _unreadable_report(manifest: str, lost: Dict[str, List[str]], tally: Any) -> str:
    """Which items lost which modality to an unreadable file, why, and an example with its path."""
    reasons = ", ".join(f"{reason}: {n}" for reason, n in Counter(tally.counts).most_common())
    lines = [f"{manifest}: {sum(map(len, lost.values()))} media files could not be read ({reasons}); "
             f"those items keep their other modalities (mask False for the lost one):"]
    lines += [f"  {m} ({len(ids)}): {_id_list(ids)}" for m, ids in lost.items() if ids]
    lines += [f"  e.g. {e.sample_id!r} at {e.where or '?'}: {e.reason} {e.detail[:160]}" for e in tally.examples[:3]]
    return "\n".join(lines)


def embed_manifests(checkpoint: str, manifests: Sequence[str], batch_size: int = 256,
                    device: Optional[Union[str, torch.device]] = None,
                    fusion_weights: Optional[Dict[str, float]] = None, progress: bool = True) -> ItemEmbeddings:
    """Embed every item of ``manifests`` (rows in order, manifest after manifest) with the model in
    ``checkpoint`` (a checkpoint or its ``model/`` folder), and fuse the modalities (``fuse``).

    Args:
        checkpoint: read through align/loading.py (safetensors, YAML and JSON only).
        manifests: CSV, JSONL or Parquet files read with the checkpoint's ``data.columns`` and
            ``data.root``; item ids must be unique over all of them.
        batch_size: samples per batch (each sample is one modality of one item).
        device: "cpu", "cuda", ...; default cuda when available.
        fusion_weights: modality -> weight, see ``fuse``; None: equal weights.
        progress: a tqdm bar over each manifest's batches.
    Raises:
        ConfigError for a path or value that cannot be used (before the model is loaded),
        RunError for an id in two manifests or a catalogue with too many unreadable files.
    """
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
    folder = model_folder(checkpoint)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = read_saved_config(folder, [f"eval.batch_size={batch_size}"])
    model = load_model(folder, device=target)
    check_fusion_weights(fusion_weights, model.modalities)  # before the long part
    processor = SampleProcessor(model.preprocessors(train=False))
    loaders, source = [], {}
    for manifest in manifests:  # all read (and their ids checked) before anything is embedded
        loader = loader_from_config(config, processor, train=False, spec=manifest, pin_memory=target.type == "cuda")
        for row in loader.dataset.rows:
            if row["id"] in source:
                raise RunError(f"item id {row['id']!r} is in {source[row['id']]} and {row['_where']}; ids must be "
                               f"unique over the manifests (embed the later one with --append to replace the item)")
            source[row["id"]] = row["_where"]
        loaders.append(loader)
    parts = [_embed_manifest(model, loader, target, progress) for loader in loaders]
    vectors = {m: torch.cat([p[0][m] for p in parts]) for m in model.modalities}  # (N, D) each
    masks = {m: torch.cat([p[1][m] for p in parts]) for m in model.modalities}  # (N,) each
    vectors[FUSED], masks[FUSED] = fuse(vectors, masks, fusion_weights)
    metadata = {"format": FORMAT, "checkpoint": os.path.abspath(folder), "dim": str(model.embed_dim),
                "modalities": ",".join(model.modalities), **fusion_metadata(fusion_weights)}
    return ItemEmbeddings(list(source), vectors, masks, metadata)


def _check_ids(ids: Sequence[str], where: str) -> None:
    if not all(isinstance(item, str) for item in ids):
        raise RunError(f"{where}: every item id must be a string")
    if len(set(ids)) != len(ids):
        repeated = [item for item, n in Counter(ids).items() if n > 1]
        raise RunError(f"{where}: item ids repeat: {_id_list(repeated)}; each item may have one row")


def _check_tensors(emb: ItemEmbeddings, where: str) -> None:
    """A ``RunError`` naming ``where`` unless every vector is (N, D) float32 with an (N,) bool mask."""
    rows = len(emb.ids)
    if FUSED not in emb.vectors or set(emb.vectors) != set(emb.masks):
        raise RunError(f"{where}: vectors {sorted(emb.vectors)} and masks {sorted(emb.masks)} must name the same "
                       f"modalities and {FUSED!r}")
    dim = emb.vectors[FUSED].shape[-1]
    for name, vector in emb.vectors.items():
        mask = emb.masks[name]
        if vector.dtype != torch.float32 or tuple(vector.shape) != (rows, dim):
            raise RunError(f"{where}: {name} is {vector.dtype} {tuple(vector.shape)}, expected float32 {(rows, dim)} "
                           f"(one row per id)")
        if mask.dtype != torch.bool or tuple(mask.shape) != (rows,):
            raise RunError(f"{where}: {MASK}{name} is {mask.dtype} {tuple(mask.shape)}, expected bool ({rows},)")


def save_item_embeddings(emb: ItemEmbeddings, folder: str) -> None:
    """Write ``emb`` into ``folder`` (format in the module docstring), each file atomically."""
    _check_ids(emb.ids, folder)
    _check_tensors(emb, folder)
    tensors = {}
    for name in emb.vectors:
        tensors[name] = emb.vectors[name]
        tensors[MASK + name] = emb.masks[name]
    write_tensors(tensors, os.path.join(folder, TENSORS_FILE), metadata={k: str(v) for k, v in emb.metadata.items()})
    write_json_atomic({"ids": list(emb.ids), "modalities": emb.modalities, "dim": int(emb.vectors[FUSED].shape[-1]),
                       "count": len(emb.ids)}, os.path.join(folder, IDS_FILE))


def load_item_embeddings(folder: str) -> ItemEmbeddings:
    """The embeddings ``align embed`` wrote into ``folder`` (safetensors and JSON only, nothing
    unpickled). A missing or unreadable file, a tensor of the wrong shape or type, or an ids.json that
    does not fit the tensors is a ``RunError`` naming the file."""
    tensors_path, ids_path = os.path.join(folder, TENSORS_FILE), os.path.join(folder, IDS_FILE)
    for path in (tensors_path, ids_path):
        if not os.path.isfile(path):
            raise RunError(f"{path}: missing; write the folder with `align embed`")
    tensors, metadata = read_tensors(tensors_path)
    if metadata.get("format") != FORMAT:
        raise RunError(f"{tensors_path}: format {metadata.get('format')!r}, expected {FORMAT!r}; "
                       f"write the folder with `align embed`")
    modalities = [m for m in metadata.get("modalities", "").split(",") if m]
    names = modalities + [FUSED]
    missing = [key for name in names for key in (name, MASK + name) if key not in tensors]
    if not modalities or missing:
        raise RunError(f"{tensors_path}: modalities {modalities} in its metadata, tensors {missing} missing")
    listing = read_json(ids_path)
    if not isinstance(listing, dict) or not isinstance(listing.get("ids"), list) or "count" not in listing:
        raise RunError(f"{ids_path}: expected {{\"ids\": [...], \"modalities\": [...], \"dim\": D, \"count\": N}}")
    rows = tensors[FUSED].shape[0]
    if not listing["count"] == len(listing["ids"]) == rows:
        raise RunError(f"{ids_path}: {len(listing['ids'])} ids (count {listing['count']}) for the {rows} rows of "
                       f"{tensors_path}; the files come from different runs: write the folder again with `align embed`")
    if listing.get("modalities") != modalities or str(listing.get("dim")) != metadata.get("dim"):
        raise RunError(f"{ids_path}: modalities {listing.get('modalities')} and dim {listing.get('dim')} differ from "
                       f"{tensors_path} ({modalities}, {metadata.get('dim')}); "
                       f"write the folder again with `align embed`")
    _check_ids(listing["ids"], ids_path)
    emb = ItemEmbeddings(listing["ids"], {name: tensors[name] for name in names},
                         {name: tensors[MASK + name] for name in names}, metadata)
    _check_tensors(emb, tensors_path)
    return emb


APPEND_KEYS = ("checkpoint", "dim", "modalities", "fusion", "fusion_weights")


def check_same_space(existing: Dict[str, str], new: Dict[str, str], keys: Sequence[str] = APPEND_KEYS,
                     where: str = "append") -> None:
    """A ``RunError`` unless the two metadata agree on ``keys``: vectors of two models, or fused
    differently, cannot share one catalogue."""
    for key in keys:
        if existing.get(key) != new.get(key):
            raise RunError(f"{where}: {key} is {existing.get(key)!r} in the existing embeddings and {new.get(key)!r} "
                           f"in the new ones; embed the whole catalogue again with one checkpoint and one fusion")


def append_item_embeddings(existing: ItemEmbeddings, new: ItemEmbeddings) -> ItemEmbeddings:
    """``existing`` with the items of ``new``: an id in both takes the new row in place (a
    re-embedded item), the other new ids follow in ``new``'s order. Dimension, modalities,
    checkpoint and fusion must agree (``RunError`` otherwise)."""
    old_dim, new_dim = existing.vectors[FUSED].shape[-1], new.vectors[FUSED].shape[-1]
    if old_dim != new_dim:
        raise RunError(f"append: the existing embeddings have dim {old_dim}, the new ones {new_dim}")
    if set(existing.vectors) != set(new.vectors):
        raise RunError(f"append: the existing embeddings hold {sorted(existing.vectors)}, the new ones "
                       f"{sorted(new.vectors)}")
    check_same_space(existing.metadata, new.metadata)
    _check_ids(new.ids, "append: the new embeddings")
    row_of = existing.row_of()
    replaced = [(row_of[item], j) for j, item in enumerate(new.ids) if item in row_of]
    added = torch.tensor([j for j, item in enumerate(new.ids) if item not in row_of], dtype=torch.long)
    old_rows = torch.tensor([r for r, _ in replaced], dtype=torch.long)
    new_rows = torch.tensor([j for _, j in replaced], dtype=torch.long)

    def merged(old: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
        out = old.clone()
        out[old_rows] = fresh[new_rows]
        return torch.cat([out, fresh[added]])

    return ItemEmbeddings(existing.ids + [new.ids[j] for j in added.tolist()],
                          {name: merged(existing.vectors[name], new.vectors[name]) for name in existing.vectors},
                          {name: merged(existing.masks[name], new.masks[name]) for name in existing.masks},
                          {**existing.metadata, **new.metadata})


def parse_fusion_weights(text: str) -> Dict[str, float]:
    """``"text=1,image=2"`` -> {"text": 1.0, "image": 2.0} (``--fusion-weights``)."""
    weights = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r}: expected modality=weight pairs, e.g. text=1,image=2") from None
        if name.strip() not in MODALITIES:
            raise argparse.ArgumentTypeError(f"{name.strip()!r}: not a modality; known: {', '.join(MODALITIES)}")
    return weights


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align embed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint or its model/ folder (model.safetensors)")
    parser.add_argument("--manifest", required=True, nargs="+", help="CSV, JSONL or Parquet catalogue(s), in row order")
    parser.add_argument("--out", required=True, help="folder for embeddings.safetensors and ids.json")
    parser.add_argument("--batch-size", type=int, default=256, help="samples per batch (one modality of one item each)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--fusion-weights", type=parse_fusion_weights,
                        help="weighted mean for the fused vector, e.g. text=1,image=2,audio=0 (default: equal)")
    parser.add_argument("--append", action="store_true",
                        help="merge into the embeddings already in --out: new ids added, repeated ids replaced")
    return parser


def _summary(emb: ItemEmbeddings, seconds: float) -> List[str]:
    counts = "  ".join(f"{name}: {int(emb.masks[name].sum())}" for name in emb.vectors)
    has_any = torch.stack([emb.masks[m] for m in emb.modalities]).any(dim=0)  # (N,)
    bare = [emb.ids[i] for i in (~has_any).nonzero().flatten().tolist()]
    lines = [f"embedded {len(emb.ids)} items in {seconds:.1f} s", f"  with {counts}"]
    lines.append(f"  items without any modality: {len(bare)}" + (f" (zero rows, mask False): {_id_list(bare)}"
                                                                    if bare else ""))
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    """``align embed``; a ``ConfigError`` or ``RunError`` is left to align/cli.py to report."""
    args = _parser().parse_args(argv)
    start = time.perf_counter()
    existing = None
    if args.append:  # checked before the long embedding
        if not os.path.isfile(os.path.join(args.out, TENSORS_FILE)):
            raise ConfigError(f"--append: {args.out} holds no {TENSORS_FILE}; leave out --append to create it")
        existing = load_item_embeddings(args.out)
        expected = {"checkpoint": os.path.abspath(model_folder(args.checkpoint)),
                    **fusion_metadata(args.fusion_weights)}
        check_same_space(existing.metadata, expected, ("checkpoint", "fusion", "fusion_weights"),
                         f"--append {args.out}")
    emb = embed_manifests(args.checkpoint, args.manifest, args.batch_size, args.device, args.fusion_weights)
    lines = _summary(emb, time.perf_counter() - start)
    if existing is not None:
        known = existing.row_of()
        replaced = sum(1 for item in emb.ids if item in known)
        emb = append_item_embeddings(existing, emb)
        lines.append(f"  appended to {len(known)} items: {len(emb.ids) - len(known)} new, {replaced} replaced, "
                     f"{len(emb.ids)} now")
    save_item_embeddings(emb, args.out)
    print("\n".join(lines + [f"  -> {os.path.join(args.out, TENSORS_FILE)}, {IDS_FILE}"]), flush=True)
    return 0
