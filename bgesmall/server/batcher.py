"""Dynamic batching: requests that arrive together share one forward pass.

Each request hands the batcher its sequences as token ids (without [CLS]/[SEP], already validated and
truncated by the app) and awaits exactly its own rows back. A single worker coroutine packs waiting
sequences, oldest request first, into one call under a token budget. While a forward pass runs, new
requests queue up, so under load the next batch is whatever arrived meanwhile; an idle batcher gives the
first arrival at most `max_wait_ms` for company, and only when the previous pass was shared (a lone client
sending one request at a time pays no wait). The model runs on one worker thread (off the event loop), so
the server keeps accepting connections and the model never runs two batches at once.

A request whose caller has gone (the app cancels its `submit` when the client disconnects) is dropped: the
sequences of it that no forward pass has taken are never computed, and rows of it already in a running pass
are discarded; the requests beside it are not delayed beyond that pass.

If a packed batch fails as a whole, each request in it is retried on its own, so one bad request can only
fail itself. At most `max_queued_requests` requests wait or run at once; past that `submit` raises
`Overloaded` at once (the app answers 503 with Retry-After), so overload costs a quick retry instead of
unbounded memory and latency. With batching disabled every request is one forward pass on the same single worker thread,
which is the baseline `benchmarks/load.py` compares against.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# ids: list of token-id sequences without special tokens -> (len(ids), dim) float32, rows in order.
log = logging.getLogger("bgesmall.server")

EmbedFn = Callable[[Sequence[Sequence[int]]], np.ndarray]


@dataclass(frozen=True)
class BatchingConfig:
    enabled: bool = True
    # Upper bound on tokens (incl. [CLS]/[SEP]) in one forward pass: bounds how long a small request can
    # wait behind a large one (which is split into turns of this size). Far above what 32 short sentences
    # need; the engine itself spreads a pass over its worker threads.
    max_batch_tokens: int = 2048
    # Upper bound on sequences in one forward pass.
    max_batch_size: int = 256
    # How long the first request of an idle batcher waits for others to join (milliseconds). Under load
    # batches form while the previous forward pass runs, so this only costs latency at low concurrency.
    max_wait_ms: float = 2.0
    # Requests waiting or running at once; one more is refused (Overloaded) rather than queued.
    max_queued_requests: int = 256


class Overloaded(Exception):
    """`max_queued_requests` requests are already waiting or running: retry later."""


@dataclass(eq=False)
class _Job:
    ids: list[list[int]]
    future: asyncio.Future
    arrived: float
    out: np.ndarray | None = None
    scheduled: int = 0  # sequences handed to a forward pass so far
    finished: int = 0  # sequences whose rows are in `out`
    failed: bool = False

    @property
    def tokens_left(self) -> int:
        return sum(len(x) + 2 for x in self.ids[self.scheduled :])


@dataclass
class BatcherStats:
    requests: int = 0
    sequences: int = 0
    batches: int = 0
    largest_batch: int = 0
    retried_alone: int = 0
    refused: int = 0  # Overloaded
    abandoned: int = 0  # requests taken off the queue because their caller had gone
    dropped_sequences: int = 0  # their sequences that no forward pass took: never computed
    wasted_sequences: int = 0  # their sequences computed anyway (already in a pass when the caller left)


class Batcher:
    """Owns the model's worker thread. `await submit(ids)` -> (len(ids), dim) float32."""

    def __init__(self, embed_fn: EmbedFn, dim: int, config: BatchingConfig = BatchingConfig()):
        if (config.max_batch_tokens < 1 or config.max_batch_size < 1 or config.max_wait_ms < 0
                or config.max_queued_requests < 1):
            raise ValueError(f"invalid batching settings: {config}")
        self.embed_fn = embed_fn
        self.dim = dim
        self.config = config
        self.stats = BatcherStats()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="bgesmall-model")
        self._waiting: collections.deque[_Job] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._last_batch_requests = 0  # requests served by the previous forward pass
        self._admitted = 0  # requests inside submit(): waiting or running

    # -- lifecycle (called from the app's lifespan, on the event loop) --------------------------------------
    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        if self.config.enabled:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="bgesmall-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        for job in self._waiting:
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))
        self._waiting.clear()
        self._executor.shutdown(wait=True)

    @property
    def queued_requests(self) -> int:
        return len(self._waiting)

    @property
    def admitted_requests(self) -> int:
        return self._admitted

    # -- the request side ------------------------------------------------------------------------------------
    def check_capacity(self) -> None:
        """Raise Overloaded now if submit() would: lets the app refuse before tokenizing a request."""
        if self._admitted >= self.config.max_queued_requests:
            self.stats.refused += 1
            raise Overloaded(f"{self._admitted} requests are already waiting or running")

    async def submit(self, ids: list[list[int]]) -> np.ndarray:
        self.check_capacity()
        self._admitted += 1  # the event loop is the only thread here: no lock needed
        try:
            return await self._submit(ids)
        finally:
            self._admitted -= 1

    async def _submit(self, ids: list[list[int]]) -> np.ndarray:
        loop = asyncio.get_running_loop()
        self.stats.requests += 1
        self.stats.sequences += len(ids)
        if not self.config.enabled:
            self._count_batch(len(ids))
            return await loop.run_in_executor(self._executor, self.embed_fn, ids)
        if self._worker is None:
            raise RuntimeError("Batcher.start() was not awaited (the app's lifespan did not run)")
        job = _Job(ids=ids, future=loop.create_future(), arrived=time.monotonic())
        self._waiting.append(job)
        self._wakeup.set()
        return await job.future

    # -- the worker side -------------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            self._drop_abandoned()
            if not self._waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._wait_for_company()
            batch = self._pack()
            if not batch:
                continue
            try:
                await self._run_batch(batch)
            except Exception as exc:  # a bug here must fail its requests, not stall the server
                log.exception("batcher error")
                for job, _, _ in batch:
                    if not job.future.done():
                        job.failed = True
                        job.future.set_exception(exc)
                        self._forget(job)

    async def _run_batch(self, batch: list[tuple[_Job, int, int]]) -> None:
        self._last_batch_requests = len(batch)
        flat = [seq for job, start, stop in batch for seq in job.ids[start:stop]]
        self._count_batch(len(flat))
        try:
            vectors = await asyncio.get_running_loop().run_in_executor(self._executor, self.embed_fn, flat)
        except Exception:  # noqa: BLE001 - whoever caused it is found by running each request alone
            await self._retry_alone(batch)
            return
        if vectors.shape != (len(flat), self.dim):
            raise RuntimeError(f"the model returned {vectors.shape} for {len(flat)} inputs of width {self.dim}")
        row = 0
        for job, start, stop in batch:
            self._deliver(job, start, vectors[row : row + stop - start])
            row += stop - start

    async def _wait_for_company(self) -> None:
        """Give the oldest request up to max_wait_ms (from its arrival) for others to join it.

        Only when there is company to expect: if the previous forward pass served a single request and no
        other is waiting, clients are arriving one at a time and waiting would only add latency.
        """
        if self._last_batch_requests <= 1 and len(self._waiting) <= 1:
            return
        deadline = self._waiting[0].arrived + self.config.max_wait_ms / 1000.0
        while not self._budget_full():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _budget_full(self) -> bool:
        tokens = sequences = 0
        for job in self._waiting:
            if job.future.done():  # abandoned: _pack drops it
                continue
            tokens += job.tokens_left
            sequences += len(job.ids) - job.scheduled
            if tokens >= self.config.max_batch_tokens or sequences >= self.config.max_batch_size:
                return True
        return False

    def _pack(self) -> list[tuple[_Job, int, int]]:
        """Take sequences from the oldest requests first until the token or size budget is used up.

        A request larger than the budget is split over several forward passes, taking turns with the
        requests behind it; the first sequence of a batch is always taken, even when it alone exceeds the
        budget.
        """
        batch: list[tuple[_Job, int, int]] = []
        tokens = sequences = 0
        while self._waiting:
            job = self._waiting[0]
            if job.future.done():  # abandoned (client gone) before its turn
                self._drop(self._waiting.popleft())
                continue
            start = stop = job.scheduled
            while stop < len(job.ids):
                cost = len(job.ids[stop]) + 2
                if sequences and (
                    tokens + cost > self.config.max_batch_tokens or sequences >= self.config.max_batch_size
                ):
                    break
                tokens += cost
                sequences += 1
                stop += 1
            if stop == start:
                break  # the budget is used up: this job leads the next batch
            if job.out is None:
                job.out = np.empty((len(job.ids), self.dim), np.float32)
            batch.append((job, start, stop))
            job.scheduled = stop
            self._waiting.popleft()
            if job.scheduled < len(job.ids):
                # Budget used up in the middle of this job: the rest goes to the back of the line, so that
                # requests which arrived meanwhile are not stuck behind all of a large one.
                self._waiting.append(job)
                break
        return batch

    async def _retry_alone(self, batch: list[tuple[_Job, int, int]]) -> None:
        """The packed batch failed: run each request's part by itself so only the culprit fails."""
        loop = asyncio.get_running_loop()
        self.stats.retried_alone += 1
        for job, start, stop in batch:
            if job.failed or job.future.done():
                continue
            try:
                vectors = await loop.run_in_executor(self._executor, self.embed_fn, job.ids[start:stop])
            except Exception as exc:  # noqa: BLE001 - handed to exactly that caller
                job.failed = True
                job.future.set_exception(exc)
                self._forget(job)
                continue
            if vectors.shape != (stop - start, self.dim):
                raise RuntimeError(f"the model returned {vectors.shape} for {stop - start} inputs")
            self._deliver(job, start, vectors)

    def _deliver(self, job: _Job, start: int, vectors: np.ndarray) -> None:
        if job.failed:
            return
        if job.future.done():  # the caller left while this pass ran
            self.stats.wasted_sequences += len(vectors)
            return
        job.out[start : start + len(vectors)] = vectors
        job.finished += len(vectors)
        if job.finished == len(job.ids):
            job.future.set_result(job.out)

    def _forget(self, job: _Job) -> None:
        try:
            self._waiting.remove(job)
        except ValueError:
            pass

    def _drop_abandoned(self) -> None:
        while self._waiting and self._waiting[0].future.done():
            self._drop(self._waiting.popleft())

    def _drop(self, job: _Job) -> None:
        if job.failed:
            return
        self.stats.abandoned += 1
        self.stats.dropped_sequences += len(job.ids) - job.scheduled

    def _count_batch(self, n: int) -> None:
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, n)
