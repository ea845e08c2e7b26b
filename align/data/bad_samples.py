"""Counting the samples a loader skips, and stopping when there are too many.

Readers and processors raise ``BadSample`` (align/data/sample.py). Inside a dataloader worker the
failure becomes a ``Skipped`` record that travels with the batch to the main process, where a
``BadSampleTally`` adds it up by reason (``missing_file``, ``bad_image``, ``bad_audio``,
``empty_text`` ...), keeps the first few examples (sample id + file/row/shard), logs a
rate-limited warning, and raises ``TooManyBadSamples`` once the skipped fraction is above the
allowed one, so a broken dataset fails loudly instead of training on what little decodes.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping

from align.errors import RunError

logger = logging.getLogger("align.data")

MIN_SEEN_FOR_THRESHOLD = 50  # too few samples make the fraction meaningless


@dataclass(frozen=True)
class Skipped:
    """Picklable marker a worker yields in place of a sample it could not use."""

    sample_id: str
    reason: str
    where: str = ""
    detail: str = ""

    @classmethod
    def from_error(cls, error: Exception, sample_id: str = "?", where: str = "") -> "Skipped":
        """A marker from a ``BadSample`` (its reason) or any other error (reason from its type)."""
        reason = getattr(error, "reason", None)
        if reason is None:
            reason = "missing_file" if isinstance(error, FileNotFoundError) else f"error_{type(error).__name__}"
        return cls(str(getattr(error, "sample_id", sample_id)), reason, getattr(error, "where", "") or where,
                   str(getattr(error, "detail", "") or error)[:300])


class TooManyBadSamples(RunError):
    """More than ``max_bad_fraction`` of the samples seen so far could not be used."""


class BadSampleTally:
    """Totals of skipped samples by reason, with examples; shared by manifest and shard loaders.

    Attributes:
        counts: reason -> number of samples skipped for it.
        total: all skipped samples.
        seen: all samples looked at (used + skipped).
        examples: the first ``max_examples`` ``Skipped`` records (sample id, reason, where).
    """

    def __init__(self, max_bad_fraction: float = 0.05, max_examples: int = 10, warn_every_s: float = 30.0,
                 source: str = "") -> None:
        self.max_bad_fraction = max_bad_fraction
        self.max_examples = max_examples
        self.warn_every_s = warn_every_s
        self.source = source
        self.counts: Dict[str, int] = Counter()
        self.total = 0
        self.seen = 0
        self.examples: List[Skipped] = []
        self._last_warning = -float("inf")
        self._unwarned = 0

    def update(self, seen: int, skipped: Iterable[Skipped]) -> None:
        """Add one batch's figures (``seen`` includes the skipped ones), warn, check the threshold."""
        skipped = list(skipped)
        self.seen += seen
        for record in skipped:
            self.counts[record.reason] += 1
            self.total += 1
            if len(self.examples) < self.max_examples:
                self.examples.append(record)
        if skipped:
            self._warn(skipped)
        self.check()

    def add(self, other: "BadSampleTally") -> None:
        """Add another tally's figures and examples (a part of the same run), then check the
        threshold over both."""
        self.seen += other.seen
        self.total += other.total
        self.counts.update(other.counts)
        self.examples.extend(other.examples[:max(self.max_examples - len(self.examples), 0)])
        self.check()

    def state(self) -> Dict[str, Any]:
        """What a checkpoint keeps of the tally: {"seen", "total", "counts"} (examples are not kept)."""
        return {"seen": self.seen, "total": self.total, "counts": dict(self.counts)}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Go on from a checkpoint's ``state()``: a resumed run counts, and checks the allowed
        fraction, over every sample since the run began, not only those of this launch."""
        self.seen, self.total = int(state["seen"]), int(state["total"])
        self.counts = Counter({str(reason): int(n) for reason, n in state["counts"].items()})

    def _warn(self, skipped: List[Skipped]) -> None:
        # The first few get a line each; after that one summary line per ``warn_every_s``.
        self._unwarned += len(skipped)
        now = time.monotonic()
        if self.total <= 5 or now - self._last_warning >= self.warn_every_s:
            first = skipped[0]
            logger.warning("skipped %d bad sample(s) (%d of %d so far: %s); e.g. %r in %s: %s %s",
                           self._unwarned, self.total, self.seen, dict(self.counts), first.sample_id,
                           first.where or "?", first.reason, first.detail[:120])
            self._last_warning, self._unwarned = now, 0

    def check(self) -> None:
        """Raise ``TooManyBadSamples`` when over the allowed fraction (after enough samples)."""
        if self.seen < MIN_SEEN_FOR_THRESHOLD or self.total <= self.max_bad_fraction * self.seen:
            return
        raise TooManyBadSamples(self.describe())

    def describe(self) -> str:
        top = ", ".join(f"{reason}: {n}" for reason, n in Counter(self.counts).most_common(5))
        examples = "; ".join(f"{e.sample_id!r} in {e.where or '?'} ({e.reason}{': ' + e.detail[:80] if e.detail else ''})"
                             for e in self.examples[:5])
        source = f" in {self.source}" if self.source else ""
        return (f"{self.total} of {self.seen} samples{source} could not be used "
                f"({self.total / max(self.seen, 1):.1%} > max_bad_fraction={self.max_bad_fraction:.1%}). "
                f"Top reasons: {top}. Examples: {examples}. Fix or remove these files, or raise "
                f"data.max_bad_fraction if this is expected.")

    def __repr__(self) -> str:
        return f"BadSampleTally(total={self.total}, seen={self.seen}, counts={dict(self.counts)})"


def split_bad(items: List[object]) -> "tuple[list, list]":
    """Separate worker outputs into (good samples, ``Skipped`` records)."""
    good, bad = [], []
    for item in items:
        (bad if isinstance(item, Skipped) else good).append(item)
    return good, bad


def take_bad_report(batch: Dict[str, Any], tally: BadSampleTally) -> Dict[str, Any]:
    """Move ``batch["bad"]`` (see ``align.data.sample.collate_with_report``) into ``tally``; return the batch."""
    report = batch.pop("bad")
    tally.update(report["seen"], report["skipped"])
    return batch
