"""Micro-batching: queries that arrive together share one forward of their tower.

A tower's forward on 16 queries costs little more than on one (the weights are read once, the
matrix products are wider), so under load a server that encodes each request on its own spends
most of its time re-reading weights. ``MicroBatcher`` keeps an asyncio queue per modality and one
worker task per queue: the worker takes the first waiting query, then whatever else arrives within
``max_wait_ms`` (at most ``max_batch`` queries), runs ONE forward for all of them in a thread
(``run_in_executor``, so the event loop keeps accepting and parsing requests meanwhile) and hands
each request its own row. Queries that queue up while a forward runs form the next batch at once,
so the wait only costs anything when the server is idle.

Every forward runs on one single-thread executor shared by the modalities: the towers' own
intra-op threads (``torch.set_num_threads``, left to the user) already use the cores, and two
forwards side by side would only fight over them.

The inputs are already decoded and preprocessed (``QueryEncoder.prepare``), so an unreadable
upload fails its own request before it reaches a batch; an error in a forward fails every request
of that batch with it.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

EncodeBatch = Callable[[str, Sequence[Any]], Any]  # (modality, prepared inputs) -> (B, D) rows


@dataclass
class BatchStats:
    """What the batcher did: forwards run and query rows encoded, per modality."""

    forwards: Dict[str, int] = field(default_factory=dict)
    rows: Dict[str, int] = field(default_factory=dict)

    def record(self, modality: str, rows: int) -> None:
        self.forwards[modality] = self.forwards.get(modality, 0) + 1
        self.rows[modality] = self.rows.get(modality, 0) + rows

    def as_dict(self) -> Dict[str, Any]:
        """{"forwards", "rows", "mean_batch"} in total and per modality (JSON-ready)."""
        forwards, rows = sum(self.forwards.values()), sum(self.rows.values())
        per = {m: {"forwards": self.forwards[m], "rows": self.rows[m],
                   "mean_batch": round(self.rows[m] / self.forwards[m], 3)} for m in sorted(self.forwards)}
        return {"forwards": forwards, "rows": rows, "mean_batch": round(rows / forwards, 3) if forwards else None,
                "by_modality": per}


@dataclass
class _Pending:
    value: Any
    future: "asyncio.Future[np.ndarray]"


class MicroBatcher:
    """Batch concurrent encode requests per modality (see the module docstring).

    Args:
        encode_batch: (modality, list of prepared inputs) -> (B, D) rows (torch or numpy), one forward.
        modalities: the modalities that get a queue and a worker.
        max_batch: most queries in one forward.
        max_wait_ms: how long the first query of a batch waits for company (0: take only what is queued).
        executor: where forwards run; default a private single-thread pool.

    Use inside a running event loop::

        batcher = MicroBatcher(encoder.encode_prepared, encoder.modalities, max_batch=32, max_wait_ms=5)
        await batcher.start()
        vector = await batcher.encode("text", encoder.prepare("text", "red scarf"))  # (D,) float32
        await batcher.stop()
    """

    def __init__(self, encode_batch: EncodeBatch, modalities: Sequence[str], max_batch: int = 32,
                 max_wait_ms: float = 5.0, executor: Optional[concurrent.futures.Executor] = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch {max_batch}: must be at least 1")
        if not max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms {max_wait_ms}: must be >= 0")
        self.encode_batch = encode_batch
        self.modalities = list(modalities)
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self._own_executor = executor is None
        self.executor = executor or concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="align-forward")
        self.stats = BatchStats()
        self._queues: Dict[str, asyncio.Queue] = {}
        self._arrived: Dict[str, asyncio.Event] = {}
        self._workers: List[asyncio.Task] = []

    async def start(self) -> None:
        """Create the queues and workers in the running loop (the server's)."""
        self._queues = {m: asyncio.Queue() for m in self.modalities}
        self._arrived = {m: asyncio.Event() for m in self.modalities}
        self._workers = [asyncio.create_task(self._work(m), name=f"align-batcher-{m}") for m in self.modalities]

    async def stop(self) -> None:
        """Cancel the workers; requests still queued get a ``RuntimeError``."""
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        for queue in self._queues.values():
            while not queue.empty():
                pending = queue.get_nowait()
                if not pending.future.done():
                    pending.future.set_exception(RuntimeError("the server is shutting down"))
        if self._own_executor:
            self.executor.shutdown(wait=True)

    async def encode(self, modality: str, prepared: Any) -> np.ndarray:
        """The (D,) float32 vector of one prepared query, encoded in a batch with whatever else
        is waiting. Raises what the forward raised."""
        if modality not in self._queues:
            raise KeyError(f"no batcher for {modality!r}; it has {self.modalities}")
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queues[modality].put_nowait(_Pending(prepared, future))
        self._arrived[modality].set()
        return await future

    async def _gather(self, modality: str) -> List[_Pending]:
        """The first waiting query and those arriving within ``max_wait`` of it, ``max_batch`` at most."""
        queue, arrived = self._queues[modality], self._arrived[modality]
        batch = [await queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            if not queue.empty():
                batch.append(queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            arrived.clear()  # waiting on an event, not on queue.get: a timeout can never lose a query
            try:
                await asyncio.wait_for(arrived.wait(), remaining)
            except asyncio.TimeoutError:
                break
        return [p for p in batch if not p.future.done()]  # a client that went away was cancelled

    async def _work(self, modality: str) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather(modality)
            if not batch:
                continue
            try:
                rows = await loop.run_in_executor(self.executor, self._forward, modality, [p.value for p in batch])
            except Exception as error:  # the forward's failure is each of its requests' failure
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(error)
                continue
            self.stats.record(modality, len(batch))
            for pending, row in zip(batch, rows):
                if not pending.future.done():
                    pending.future.set_result(row)

    def _forward(self, modality: str, values: List[Any]) -> np.ndarray:
        rows = self.encode_batch(modality, values)
        rows = rows.numpy() if hasattr(rows, "numpy") else np.asarray(rows)
        return np.ascontiguousarray(rows, dtype=np.float32)  # (B, D)
