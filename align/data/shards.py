"""Webdataset shards -> batches, deterministic from (seed, epoch), resumable mid-epoch.

A shard is a tar whose members ``{key}.{ext}`` form samples: ``{key}.jpg|jpeg|png|webp`` the
image, ``{key}.flac|wav|ogg`` the audio, ``{key}.json`` the metadata (``id``, ``text`` or the
``title``/``description`` fields, ``group``, ``negatives``), ``{key}.txt`` a caption (the
open_clip convention, used when the json has no text). ``data_prep/shards.py`` writes them,
with a ``sizes.json`` (shard file name -> sample count) next to them.

The pipeline, as stages (each runs in a dataloader worker, one *role* per worker)::

    plan      epoch order of shards + this role's range of sample positions   (main process)
    read      stream the tars (local files, ``pipe:`` commands, any webdataset URL), keep
              the role's range, undecoded; a truncated tar yields its shortfall as skips
    shuffle   per-role buffer of undecoded samples seeded by (seed, epoch, rank, role)
    batch     cut the stream into the role's planned batch sizes; drop skipped batches
    decode    image / audio / json -> raw sample (align/data/sample.py), processor under a
              per-sample seed; failures become ``Skipped`` records (never an exception)
    collate   align.data.sample.collate of the good samples + ``batch["bad"]`` report

**Epoch mode** (``resampled=False``), every sample exactly once per epoch across ranks: the
shards, in an order drawn from (seed, epoch) (file order for evaluation), make one sequence of
``N`` sample positions (counts from ``sizes.json``). Rank ``r`` takes a contiguous range of
``N // R`` or ``N // R + 1`` positions (so shard counts need not divide by ranks or workers; a
shard on a boundary is read by both neighbours, each keeping its part). Every rank makes
``T = ceil((N // R) / batch_size)`` steps: all batches are full except the rank's last one,
which holds the remainder (1 to ``batch_size + 1`` samples), so no sample is dropped and no rank
waits for another. With ``drop_last`` every batch is full instead: ``(N // R) // batch_size``
steps, and the last few positions of the epoch order (different shards each epoch) are left
out; exactly-once then means at most once. A rank's batch ``k`` comes from role ``k % W``
(``W = max(1, num_workers)``), which is how torch's DataLoader cycles through its workers; each
role reads one contiguous stretch of the rank's range, so a worker opens few shards.

**Resampled mode**: each role draws shards with replacement (a source of the ``::``-joined
spec with probability ``weights``, then a shard of it uniformly) from a generator seeded by
(seed, epoch, rank, role), forever; an epoch is ``epoch_samples // (R * batch_size)`` full
batches per rank. Without ``weights`` every shard is equally likely; ``weights`` apply only
here (epoch mode reads every source's shards once).

**Resume**: ``iterate(epoch, skip_batches=k)`` gives worker ``w`` the role ``(k + w) % W`` and
lets each role discard the samples of its batches before ``k`` undecoded, after the shuffle
buffer, so the buffer, the batches and the per-sample augmentation seeds are those of an
uninterrupted run.

Bad data (corrupt/truncated image or audio, empty text, missing keys, bad json, truncated shard)
is counted by reason in ``loader.bad`` (a ``BadSampleTally``: rate-limited warnings, error above
``max_bad_fraction``); it keeps its place in the plan, so batch boundaries never move, and a
batch whose samples were all bad is yielded empty (``ids == []``) so that ranks stay in step.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import tarfile
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from align.data.bad_samples import BadSampleTally, Skipped, take_bad_report
from align.data.manifest import open_image, seeded_sample
from align.data.sample import MODALITIES, BadSample, collate_with_report
from align.data.tar import TruncatedMember, tar_members
from align.errors import ConfigError, RunError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
AUDIO_EXTENSIONS = ("flac", "wav", "ogg")
SIZES_FILE = "sizes.json"


# ---------------------------------------------------------------- spec and sizes
def expand_spec(spec: str) -> List[List[str]]:
    """``"a-{000..009}.tar::pipe:cat b.tar"`` -> one list of URLs per ``::``-joined source."""
    import braceexpand

    sources = []
    for source in str(spec).split("::"):
        source = source.strip()
        if source:
            sources.append(list(braceexpand.braceexpand(os.path.expandvars(source))))
    if not sources or not any(sources):
        raise ValueError(f"shard spec {spec!r} names no shards")
    return sources


def local_path(url: str) -> Optional[str]:
    """The file behind a shard URL (``file:`` or a plain path); None for ``pipe:`` and remote URLs."""
    if url.startswith("file:"):
        return url[len("file:"):]
    return None if ":" in url.split("/")[0] else url


def read_sizes(urls: Sequence[str]) -> Dict[str, Optional[int]]:
    """Sample count of each shard from the ``sizes.json`` beside it (None when unknown).

    Raises ``RunError`` naming the file when a ``sizes.json`` is there but unusable (see
    ``sizes_file``)."""
    cache: Dict[str, Dict[str, int]] = {}
    sizes: Dict[str, Optional[int]] = {}
    for url in urls:
        path = local_path(url)
        if path is None:
            sizes[url] = None
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if folder not in cache:
            file = os.path.join(folder, SIZES_FILE)
            cache[folder] = sizes_file(file) if os.path.isfile(file) else {}
        sizes[url] = cache[folder].get(os.path.basename(path))
    return sizes


def sizes_file(file: str) -> Dict[str, int]:
    """A ``sizes.json``: shard file name -> sample count. A file cut short, edited by hand or of
    another format is a ``RunError`` naming it: the epoch plan rests on these counts, and a
    traceback from the JSON parser would not say which file or how to mend it."""
    remedy = "delete it and rerun `align prep shards` with the same --out to rewrite it"
    try:
        with open(file, encoding="utf-8") as handle:
            sizes = json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunError(f"{file}: not valid JSON ({error}); {remedy}") from None
    counts_ok = isinstance(sizes, dict) and all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in sizes.values())
    if not counts_ok:
        raise RunError(f"{file}: expected an object of shard name -> sample count (a whole number >= 0), "
                       f"got {json.dumps(sizes)[:120]}; {remedy}")
    return sizes


# ---------------------------------------------------------------- read stage
class _Item:
    """One undecoded sample: its epoch position (the seed of its augmentations) and its files."""

    __slots__ = ("position", "key", "files", "url")

    def __init__(self, position: Tuple[int, ...], key: str, files: Dict[str, bytes], url: str) -> None:
        self.position, self.key, self.files, self.url = position, key, files, url


def _open(url: str):
    local = local_path(url)
    if local is not None:
        return open(local, "rb")
    from webdataset.gopen import gopen  # pipe:, http(s):, s3 via commands ...

    return gopen(url, "rb")


def tar_samples(url: str) -> Iterator[Tuple[str, Dict[str, bytes]]]:
    """Stream ``(key, {extension: bytes})`` from a tar; raises ``TruncatedShard`` at a broken end.

    Members are grouped by key (the path up to the first dot of the file name), as webdataset
    does; a group cut short by the truncation is not yielded, the whole group before it is.
    """
    key, files, cut = None, {}, None
    try:
        with contextlib.closing(_open(url)) as stream:
            for path, data in tar_members(stream):
                member = _split_member(path)
                if member is None:
                    continue
                if member[0] != key:
                    if key is not None:
                        yield key, files
                    key, files = member[0], {}
                files[member[1]] = data
    except FileNotFoundError as error:
        raise TruncatedShard(url, f"shard not found: {error}", "missing_shard") from error
    except TruncatedMember as error:  # the member's header came whole: a group before it is complete
        cut = error
    except (tarfile.TarError, EOFError, OSError, ValueError) as error:
        raise TruncatedShard(url, repr(error)) from error
    if cut is not None:
        member = _split_member(cut.name)
        if key is not None and (member is None or member[0] != key):
            yield key, files
        raise TruncatedShard(url, repr(cut))
    if key is not None:
        yield key, files


def _split_member(path: str) -> Optional[Tuple[str, str]]:
    """(sample key, extension) of a member: the path up to the first dot of the file name, and the
    rest lower-cased; None for a name without a key (no dot, or a hidden file)."""
    folder, name = os.path.split(path)
    if "." not in name or name.startswith("."):
        return None
    stem, extension = name.split(".", 1)
    return os.path.join(folder, stem), extension.lower()


class TruncatedShard(Exception):
    """A shard that ended early (``truncated_shard``) or is not there (``missing_shard``)."""

    def __init__(self, url: str, detail: str, reason: str = "truncated_shard") -> None:
        self.url, self.detail, self.reason = url, detail, reason
        super().__init__(f"{url}: {detail}")


def _read_pieces(pieces: Sequence[Tuple[int, int, int]], urls: Sequence[str], epoch: int) -> Iterator[Any]:
    """Items of (shard index, first, end) pieces, in order; position = (epoch, shard, index).

    Samples before ``first`` are read but not kept (no decoding); a shard that ends early
    yields ``Skipped("truncated_shard")`` for each missing sample, so the plan's counts hold.
    """
    for shard, begin, end in pieces:
        url, index = urls[shard], 0
        detail, reason = "fewer samples than sizes.json says", "truncated_shard"
        try:
            for key, files in tar_samples(url):
                if index >= end:
                    break
                if index >= begin:
                    yield _Item((epoch, shard, index), key, files, url)
                index += 1
        except TruncatedShard as error:
            detail, reason = error.detail, error.reason
        for missing in range(max(index, begin), end):
            yield Skipped(f"{os.path.basename(url)}#{missing}", reason, url, detail[:200])


def _resample(sources: Sequence[Sequence[str]], weights: Sequence[float], rng: np.random.Generator,
              position_base: Tuple[int, ...]) -> Iterator[Any]:
    """Items from shards drawn with replacement, forever."""
    probabilities = np.asarray(weights, dtype=np.float64)
    probabilities = probabilities / probabilities.sum()
    counter, empty_draws = 0, 0
    while True:
        source = sources[int(rng.choice(len(sources), p=probabilities))]
        url = source[int(rng.integers(len(source)))]
        got = 0
        try:
            for key, files in tar_samples(url):
                yield _Item(position_base + (counter,), key, files, url)
                counter, got = counter + 1, got + 1
        except TruncatedShard as error:
            yield Skipped(f"{os.path.basename(url)}#{got}", error.reason, url, error.detail[:200])
            counter += 1
        empty_draws = 0 if got else empty_draws + 1
        if empty_draws >= 100:
            raise RuntimeError(f"100 shards in a row gave no samples (last {url}); check the shard spec")


# ---------------------------------------------------------------- shuffle and decode stages
def _shuffle(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Buffer shuffle: keep ``size`` items, emit a random one for each new one (then drain)."""
    if size <= 1:
        yield from items
        return
    buffer: List[Any] = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            index = rng.randrange(len(buffer))
            buffer[index], buffer[-1] = buffer[-1], buffer[index]
            yield buffer.pop()
    while buffer:
        index = rng.randrange(len(buffer))
        buffer[index], buffer[-1] = buffer[-1], buffer[index]
        yield buffer.pop()


def _text_of(meta: Dict[str, Any], files: Dict[str, bytes]) -> Optional[str]:
    """The json's ``text`` (null: an item without text; "": an empty text, counted as bad),
    else its title/description, else ``{key}.txt``."""
    if meta.get("text") is not None:
        return str(meta["text"])
    parts = [str(meta[f]).strip() for f in ("title", "description") if meta.get(f) not in (None, "")]
    if parts:
        return ". ".join(parts)
    if "txt" in files:
        return files["txt"].decode("utf-8", errors="replace")
    return None


def _negatives_of(value: Any) -> List[str]:
    if not value:
        return []
    if isinstance(value, str):
        value = value.split("|")
    return [str(v).strip() for v in value if v is not None and str(v).strip()]


def decode_sample(item: _Item, modalities: Sequence[str] = MODALITIES,
                  draft_side: Optional[int] = None, keep_jpeg: bool = False) -> Dict[str, Any]:
    """Undecoded files -> raw sample (align/data/sample.py); raises ``BadSample``.

    Only ``modalities`` are decoded (the others are None): a text-image model does not pay for
    (or trip over) the audio in tri-modal shards. ``draft_side``, ``keep_jpeg``: see
    ``manifest.open_image``.
    """
    from align.data.audio_io import load_audio

    files, where = item.files, f"{item.url}:{item.key}"
    meta: Dict[str, Any] = {}
    if "json" in files:
        try:
            meta = json.loads(files["json"])
            if not isinstance(meta, dict):
                raise ValueError(f"expected an object, got {type(meta).__name__}")
        except ValueError as error:
            raise BadSample(item.key, "bad_json", where, repr(error)[:200]) from error
    sample_id = str(meta.get("id") or item.key)
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
    audio_ext = next((e for e in AUDIO_EXTENSIONS if e in files), None)
    text = _text_of(meta, files)
    if image_ext is None and audio_ext is None and text is None:
        raise BadSample(sample_id, "missing_keys", where, f"members: {sorted(files)}")
    image_ext = image_ext if "image" in modalities else None
    audio_ext = audio_ext if "audio" in modalities else None
    image = audio = None
    if image_ext is not None:
        image = open_image(files[image_ext], sample_id, where, draft_side, keep_jpeg)  # BadSample "bad_image"
    if audio_ext is not None:
        try:
            audio = load_audio(files[audio_ext])
        except Exception as error:
            raise BadSample(sample_id, "bad_audio", where, repr(error)[:200]) from error
    return {"id": sample_id, "group": meta.get("group") or None, "text": text, "image": image, "audio": audio,
            "negatives": _negatives_of(meta.get("negatives")), "_where": where}


def process_item(item: Any, processor: Any, seed: int) -> Any:
    """Undecoded item -> processed sample, or a ``Skipped`` record."""
    if isinstance(item, Skipped):
        return item
    try:
        raw = decode_sample(item, tuple(getattr(processor, "preprocessors", None) or MODALITIES),
                            getattr(processor, "image_draft_side", None), getattr(processor, "image_keep_jpeg", False))
        with seeded_sample((seed,) + tuple(item.position), processor):
            return processor(raw)
    except BadSample as error:
        return Skipped.from_error(error, item.key, f"{item.url}:{item.key}")
    except Exception as error:  # a processor bug on one sample: counted, not fatal
        return Skipped(item.key, "processing_error", f"{item.url}:{item.key}", repr(error)[:200])


# ---------------------------------------------------------------- the plan
@dataclass(frozen=True)
class RolePlan:
    """What one (rank, role) reads and yields in one epoch.

    ``pieces``: (shard index, first sample, end sample) in reading order (epoch mode);
    ``batch_sizes``: raw samples per batch, in order (their sum is the pieces' length).
    """

    batch_sizes: Tuple[int, ...]
    pieces: Tuple[Tuple[int, int, int], ...] = ()


def split_counts(total: int, parts: int) -> List[int]:
    """``total`` into ``parts`` near-equal counts, larger first."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def rank_batch_sizes(total: int, batch_size: int, world_size: int, rank: int, drop_last: bool) -> List[int]:
    """Batch sizes of one rank's share of ``total`` samples; the same number of batches on every rank.

    ``drop_last``: full batches only (``total // world_size // batch_size`` of them; the tail of
    the epoch order is left out). Otherwise ``ceil((total // world_size) / batch_size)`` batches,
    the last holding the rank's remainder (1 to ``batch_size + 1`` samples; 0 on some ranks
    when there are fewer samples than ranks): nothing is dropped.
    """
    smallest = total // world_size
    if drop_last:
        return [batch_size] * (smallest // batch_size)
    share = split_counts(total, world_size)[rank]
    steps = -(-smallest // batch_size)
    if steps == 0:
        if total == 0:
            return []
        steps = 1  # fewer samples than ranks: one batch each, empty on some ranks
    return [batch_size] * (steps - 1) + [share - (steps - 1) * batch_size]


def shard_order(count: int, seed: int, epoch: int, shuffle: bool) -> List[int]:
    """The epoch's shard order: a permutation from (seed, epoch), or file order."""
    if not shuffle:
        return list(range(count))
    return [int(i) for i in np.random.default_rng([seed & 0xFFFFFFFF, epoch, 0x5A4D]).permutation(count)]


def epoch_plan(sizes: Sequence[int], *, seed: int, epoch: int, shuffle: bool, rank: int, world_size: int,
               num_workers: int, batch_size: int, drop_last: bool) -> List[RolePlan]:
    """Per-role plans of one rank for one epoch (the exactly-once design of the module docstring).

    The shards in epoch order form one sequence of positions; each rank takes a contiguous
    range (sized by ``rank_batch_sizes``), split over ``max(1, num_workers)`` roles so that
    batch ``k`` of the rank comes from role ``k % roles`` and each role reads one contiguous
    stretch. Across all ranks every position occurs at most once, and exactly once unless
    ``drop_last`` left out the epoch's tail.
    """
    total, roles = int(sum(sizes)), max(1, num_workers)
    per_rank = [sum(rank_batch_sizes(total, batch_size, world_size, r, drop_last)) for r in range(world_size)]
    start = sum(per_rank[:rank])
    batches = rank_batch_sizes(total, batch_size, world_size, rank, drop_last)
    # (shard index, first position) in epoch order, to cut position ranges into shard pieces
    layout, offset = [], 0
    for index in shard_order(len(sizes), seed, epoch, shuffle):
        layout.append((index, offset, int(sizes[index])))
        offset += int(sizes[index])
    plans = []
    for role in range(roles):
        role_batches = tuple(batches[role::roles])
        stop = start + sum(role_batches)
        pieces = tuple((index, max(start, first) - first, min(stop, first + size) - first)
                       for index, first, size in layout if first < stop and first + size > start)
        plans.append(RolePlan(role_batches, pieces))
        start = stop
    return plans


class _ShardStream(torch.utils.data.IterableDataset):
    """The per-worker pipeline of one (epoch, skip); each worker runs the role given by its id."""

    def __init__(self, loader: "ShardLoader", epoch: int, skip_batches: int) -> None:
        super().__init__()
        self.epoch, self.skip = epoch, skip_batches
        self.processor, self.seed, self.rank = loader.processor, loader.seed, loader.rank
        self.roles, self.train = loader.roles, loader.train
        self.shuffle_buffer = loader.shuffle_buffer if loader.train else 0
        self.resampled = loader.resampled
        self.sources, self.weights = loader.sources, loader.weights
        self.plans = loader.role_plans(epoch)
        self.urls = loader.urls

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        role = (self.skip + worker) % self.roles
        plan = self.plans[role]
        skip = len(range(role, self.skip, self.roles))  # this role's batches among the first `skip`
        seed_key = [self.seed & 0xFFFFFFFF, self.epoch, self.rank, role]
        if self.resampled:
            items = _resample(self.sources, self.weights, np.random.default_rng(seed_key + [1]),
                              (self.epoch, self.rank, role))
        else:
            items = _read_pieces(plan.pieces, self.urls, self.epoch)
        items = _shuffle(items, self.shuffle_buffer, random.Random(str(seed_key)))
        try:
            for index, size in enumerate(plan.batch_sizes):
                chunk = [item for _, item in zip(range(size), items)]
                if len(chunk) < size:  # the stream ended early (should not happen: reads pad)
                    chunk += [Skipped("?", "missing_samples", f"role {role}")] * (size - len(chunk))
                if index < skip:
                    continue  # resume: consumed undecoded, so the buffer matches the first run
                yield collate_with_report([process_item(item, self.processor, self.seed) for item in chunk])
        finally:
            if hasattr(items, "close"):
                items.close()


def _identity(batch: Any) -> Any:
    return batch


class ShardLoader:
    """Webdataset shards -> batches for one rank (design in the module docstring).

    Args: as ``align.data.loader.build_loader``; ``epoch_samples`` is global (all ranks).
    """

    def __init__(self, spec: str, processor: Any, *, batch_size: int, num_workers: int, train: bool, seed: int,
                 rank: int = 0, world_size: int = 1, shuffle_buffer: int = 1000, resampled: bool = False,
                 epoch_samples: Optional[int] = None, weights: Optional[Sequence[float]] = None,
                 max_bad_fraction: float = 0.05, drop_last: bool = True, pin_memory: bool = False) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.spec, self.processor = spec, processor
        self.batch_size, self.num_workers, self.train, self.seed = batch_size, num_workers, train, seed
        self.rank, self.world_size, self.roles = rank, world_size, max(1, num_workers)
        self.shuffle_buffer, self.resampled, self.drop_last = shuffle_buffer, resampled, drop_last
        self.pin_memory = pin_memory
        self.sources = expand_spec(spec)
        self.urls = [url for source in self.sources for url in source]
        self.sizes = read_sizes(self.urls)
        self.bad = BadSampleTally(max_bad_fraction, source=spec)
        if weights:
            if len(weights) != len(self.sources) or min(weights) < 0 or sum(weights) <= 0:
                raise ConfigError(f"data.weights {list(weights)} must be one non-negative weight per '::' source "
                                 f"({len(self.sources)} in {spec!r})")
            self.weights = [float(w) for w in weights]
        else:
            self.weights = [float(len(s)) for s in self.sources]  # every shard equally likely
        unknown = [u for u, n in self.sizes.items() if n is None]
        if resampled:
            if epoch_samples is None:
                if unknown:
                    raise ConfigError(f"resampled shards need data.epoch_samples: no {SIZES_FILE} count for "
                                     f"{unknown[:3]}")
                epoch_samples = sum(self.sizes.values())
            self.epoch_samples = int(epoch_samples)
        else:
            if unknown:
                raise ValueError(f"epoch mode needs each shard's sample count from {SIZES_FILE} beside it; missing "
                                 f"for {len(unknown)} shard(s), e.g. {unknown[:3]}. Write it with `align prep "
                                 f"shards`, or use data.resampled=true with data.epoch_samples")
            self.total = sum(self.sizes.values())

    @property
    def rows(self) -> int:
        """Samples per epoch over all ranks: every shard's count, or ``epoch_samples`` when resampled."""
        return self.epoch_samples if self.resampled else self.total

    def __len__(self) -> int:
        if self.resampled:
            return self.epoch_samples // (self.world_size * self.batch_size)
        return len(rank_batch_sizes(self.total, self.batch_size, self.world_size, self.rank, self.drop_last))

    def role_plans(self, epoch: int) -> List[RolePlan]:
        if self.resampled:
            return [RolePlan(tuple([self.batch_size] * len(range(role, len(self), self.roles))))
                    for role in range(self.roles)]
        return epoch_plan([self.sizes[u] for u in self.urls], seed=self.seed, epoch=epoch, shuffle=self.train,
                          rank=self.rank, world_size=self.world_size, num_workers=self.num_workers,
                          batch_size=self.batch_size, drop_last=self.drop_last)

    def iterate(self, epoch: int, skip_batches: int = 0, count_bad: bool = True) -> Iterator[Dict[str, Any]]:
        """This rank's batches of ``epoch``, after its first ``skip_batches`` (resume); ``count_bad``
        as in ``ManifestLoader.iterate``."""
        if skip_batches >= len(self):
            return
        stream = _ShardStream(self, epoch, skip_batches)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                                             collate_fn=_identity, prefetch_factor=4 if self.num_workers else None,
                                             pin_memory=self.pin_memory,
                                             # its own generator: DataLoader draws a base seed from the
                                             # global one otherwise, shifting the trainer's random stream
                                             generator=torch.Generator().manual_seed(self.seed))
        for batch in loader:
            yield take_bad_report(batch, self.bad) if count_bad else batch
