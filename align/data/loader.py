"""One entry point for training and evaluation data: ``build_loader(spec, processor, ...)``.

``spec`` is a manifest (.csv/.jsonl/.parquet, read by align/data/manifest.py) or a shard spec
(.tar paths, ``{000..099}`` brace patterns, ``pipe:`` commands, sources joined by ``::``; read
by align/data/shards.py). Either way the result is a loader object with

* ``len(loader)``: batches per epoch on this rank, the same on every rank (so DDP steps match);
* ``loader.iterate(epoch, skip_batches=0)``: collated batches (align.data.sample.collate),
  a function of (seed, epoch, rank) only; ``skip_batches=k`` yields exactly what an
  uninterrupted pass would yield after its first k batches (resume mid-epoch);
* ``loader.bad``: a ``BadSampleTally`` of skipped samples (``counts``, ``total``, ``seen``,
  ``examples``); above ``max_bad_fraction`` it raises ``TooManyBadSamples``.

The loader is *not* passed through ``accelerator.prepare``: each rank reads its own rows or
shards: Accelerate's default would have rank 0 read every batch and broadcast it.

Manifest mode, design: epoch ``e`` orders the rows by a permutation drawn from (seed, e)
(identity order for evaluation); global step ``j`` takes the next ``world_size * batch_size``
rows of that order and rank ``r`` takes its ``r``-th slice. With ``drop_last`` the tail that
does not fill a global step is left out for that epoch (a different tail each epoch); without
it the last step is split evenly across ranks (smaller batches). Resuming skips whole steps in
the index order without decoding anything. Workers decode and process; a bad sample is dropped
inside ``collate_with_report`` and its record travels in ``batch["bad"]``, which the loader
removes and adds to ``loader.bad``. A batch whose every sample is bad is still yielded, as an
*empty batch* (``ids == []``, zero-row masks, no inputs; see ``align.data.sample.empty_batch``),
so that every rank makes the same number of steps and no collective op hangs; the training
step still takes part in the gathers. Batches can therefore be smaller than ``batch_size`` and differ
in size across ranks at the same step: gathers must allow unequal sizes.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Protocol, Sequence

import numpy as np
import torch

from align.config import ColumnsConfig
from align.data.bad_samples import BadSampleTally, take_bad_report
from align.data.manifest import ManifestDataset, is_manifest
from align.data.sample import collate_with_report
from align.data.transforms import with_image_decode, with_image_pipeline, with_jpeg_draft
from align.errors import ConfigError, RunError

if TYPE_CHECKING:
    from align.config import Config, DataConfig


class Loader(Protocol):
    """What training and evaluation use of a loader; ``ManifestLoader`` and
    ``align.data.shards.ShardLoader`` both provide it (see the module docstring)."""

    bad: BadSampleTally
    rows: int  # samples an epoch draws from, over all ranks (manifest rows; shard samples)

    def __len__(self) -> int: ...

    def iterate(self, epoch: int, skip_batches: int = 0, count_bad: bool = True) -> Iterator[Dict[str, Any]]: ...


def step_slices(order: np.ndarray, batch_size: int, rank: int, world_size: int, drop_last: bool) -> List[np.ndarray]:
    """This rank's batches (index arrays) when global steps take ``world_size * batch_size`` rows of ``order``.

    The last, partial step (without ``drop_last``) is split into ``world_size`` near-equal parts,
    so every rank makes the same number of steps.
    """
    per_step = batch_size * world_size
    steps = len(order) // per_step if drop_last else -(-len(order) // per_step)
    batches = []
    for step in range(steps):
        rows = order[step * per_step:(step + 1) * per_step]
        batches.append(np.array_split(rows, world_size)[rank])
    return batches


class _IndexBatches(torch.utils.data.Sampler):
    """Batch sampler over precomputed index batches; items are (row index, epoch) keys."""

    def __init__(self, batches: Sequence[np.ndarray], epoch: int) -> None:
        self.batches, self.epoch = batches, epoch

    def __iter__(self):
        for rows in self.batches:
            yield [(int(i), self.epoch) for i in rows]

    def __len__(self) -> int:
        return len(self.batches)


class ManifestLoader:
    """Manifest rows -> batches for one rank (design in the module docstring)."""

    def __init__(self, dataset: ManifestDataset, *, batch_size: int, num_workers: int, train: bool, seed: int,
                 rank: int = 0, world_size: int = 1, max_bad_fraction: float = 0.05, drop_last: bool = True,
                 pin_memory: bool = False, collate: Any = collate_with_report) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.dataset = dataset
        self.batch_size, self.num_workers = batch_size, num_workers
        self.train, self.seed, self.rank, self.world_size = train, seed, rank, world_size
        self.drop_last, self.pin_memory = drop_last, pin_memory
        self.collate = collate  # processed samples -> batch + its "bad" report (collate_with_report's contract)
        self.bad = BadSampleTally(max_bad_fraction, source=dataset.path)

    def order(self, epoch: int) -> np.ndarray:
        """Row order of an epoch: a permutation from (seed, epoch) when training, else file order."""
        if not self.train:
            return np.arange(len(self.dataset))
        generator = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch, 0x5EED])
        return generator.permutation(len(self.dataset))

    def batches(self, epoch: int) -> List[np.ndarray]:
        return step_slices(self.order(epoch), self.batch_size, self.rank, self.world_size, self.drop_last)

    @property
    def rows(self) -> int:
        return len(self.dataset)

    def __len__(self) -> int:
        per_step = self.batch_size * self.world_size
        n = len(self.dataset)
        return n // per_step if self.drop_last else -(-n // per_step)

    def iterate(self, epoch: int, skip_batches: int = 0, count_bad: bool = True) -> Iterator[Dict[str, Any]]:
        """This rank's batches of ``epoch`` after its first ``skip_batches``; each one's bad samples
        are counted in ``bad`` as it is yielded, or, with ``count_bad=False``, left in
        ``batch["bad"]`` for the consumer to count when it uses the batch (``take_bad_report``):
        a consumer that reads ahead then counts only what it used."""
        batches = self.batches(epoch)[skip_batches:]
        if not batches:
            return
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=_IndexBatches(batches, epoch), num_workers=self.num_workers,
            collate_fn=self.collate, persistent_workers=False,
            pin_memory=self.pin_memory, prefetch_factor=4 if self.num_workers else None,
            # its own generator: otherwise DataLoader draws a base seed from the global one,
            # shifting the trainer's random stream (dropout, ...) on every epoch
            generator=torch.Generator().manual_seed(self.seed))
        for batch in loader:
            yield take_bad_report(batch, self.bad) if count_bad else batch


def build_loader(spec: str, processor: Any, *, batch_size: int, num_workers: int, train: bool, seed: int,
                 rank: int = 0, world_size: int = 1, columns: Optional[ColumnsConfig] = None, root: Optional[str] = None,
                 shuffle_buffer: int = 1000, resampled: bool = False, epoch_samples: Optional[int] = None,
                 weights: Optional[Sequence[float]] = None, max_bad_fraction: float = 0.05,
                 drop_last: bool = True, pin_memory: bool = False) -> Loader:
    """A manifest or shard loader for one rank (see the module docstring).

    Args:
        spec: manifest path, or shard spec (tars, brace patterns, ``pipe:``, ``::``-joined sources).
        processor: picklable ``SampleProcessor`` applied in the workers.
        batch_size: per rank. num_workers: dataloader worker processes (0: in the caller).
        train: shuffle (and, for shards, follow ``resampled``); False: file order, every sample once.
        seed: with the epoch, fixes the order and the random augmentations.
        rank, world_size: this process among the data-parallel ones.
        columns, root: manifest columns and the base of relative media paths.
        shuffle_buffer: shards only, samples held for shuffling in each worker.
        resampled, epoch_samples, weights: shards only, sampling with replacement (see shards.py).
        max_bad_fraction: error once more than this fraction of the samples seen was skipped.
        drop_last: drop the tail that does not fill a step on every rank (training).
        pin_memory: hand out batches in page-locked memory (for fast, asynchronous copies to CUDA).
    """
    spec = os.fspath(spec)
    if is_manifest(spec):
        if resampled:
            raise ConfigError(f"data.resampled is for shard specs, not for the manifest {spec}")
        dataset = ManifestDataset(spec, processor, columns or ColumnsConfig(), root, seed=seed)
        return ManifestLoader(dataset, batch_size=batch_size, num_workers=num_workers, train=train, seed=seed,
                              rank=rank, world_size=world_size, max_bad_fraction=max_bad_fraction,
                              drop_last=drop_last, pin_memory=pin_memory)
    from align.data.shards import ShardLoader

    return ShardLoader(spec, processor, batch_size=batch_size, num_workers=num_workers, train=train, seed=seed,
                       rank=rank, world_size=world_size, shuffle_buffer=shuffle_buffer, resampled=resampled,
                       epoch_samples=epoch_samples, weights=weights, max_bad_fraction=max_bad_fraction,
                       drop_last=drop_last, pin_memory=pin_memory)


def worker_processor(processor: Any, data: "DataConfig") -> Any:
    """What the dataloader workers run for a run's ``data`` section: ``processor`` with
    ``data.jpeg_draft``, ``data.image_pipeline`` and ``data.image_decode`` applied (every training
    reader uses this)."""
    processor = with_jpeg_draft(processor, data.jpeg_draft)  # before the pipeline swap: it reads the transform
    processor = with_image_pipeline(processor, data.image_pipeline)  # device: the workers only decode
    return with_image_decode(processor, data.image_decode)  # device: nor that, for JPEGs


def loader_from_config(config: "Config", processor: Any, *, rank: int = 0, world_size: int = 1, train: bool = True,
                       spec: Optional[str] = None, pin_memory: bool = False) -> Loader:
    """``build_loader`` with the ``data`` section of a run config: the training split (``train``)
    or, with ``train=False``, an evaluation pass over ``spec`` in file order at ``eval.batch_size``.

    This is where a run first opens its data, so what the readers refuse ends here as one of the
    errors the cli reports without a traceback: a setting that does not fit the data (an id
    column the manifest lacks, ``data.weights`` for other sources) stays a ``ConfigError`` (exit
    2); bad data (a repeated or empty id, a broken line, shards without a ``sizes.json``) becomes a
    ``RunError`` (exit 1) with the reader's message, which names the file and row.
    """
    data = config.data
    try:
        return build_loader(
            spec or data.train, worker_processor(processor, data),
            batch_size=data.batch_size if train else config.eval.batch_size,
            num_workers=data.num_workers, train=train, seed=config.train.seed, rank=rank, world_size=world_size,
            columns=data.columns, root=data.root, shuffle_buffer=data.shuffle_buffer, resampled=data.resampled and train,
            epoch_samples=data.epoch_samples or None, weights=data.weights or None,
            max_bad_fraction=data.max_bad_fraction, drop_last=train, pin_memory=pin_memory,
        )
    except ConfigError:
        raise
    except (ValueError, FileNotFoundError) as error:
        raise RunError(str(error)) from None
