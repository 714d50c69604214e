"""BatchProcessor: the token-budget dynamic batcher shared by every local model (embedding, reranker, multimodal).

Design (after TEI's queue.rs and Infinity's batch handler):
- `submit(items)` splits a request into per-item queue entries, each with its own future, and reassembles the
  results in input order. A request of any size shares batches with every other request.
- One owner task (the *collator*) holds the queue (`BatchQueue`). It cuts a batch by length-sorting the waiting
  items of one `group` and taking a run around the oldest item that fits `max_batch_tokens` (padded cost,
  `runner.batch_cost`, default longest x count) and `max_batch_size`, then collates it in a thread. A second task
  hands collated batches to the device's single worker thread (`ThreadPoolExecutor(max_workers=1)`): forward
  passes never run on the event loop and never overlap on one device.
- Exactly one batch is prefetched: batch N+1 is cut and collated while batch N runs.
- No idle timer. When the device is idle, whatever waits is cut at once (a lone request goes alone). While it is
  busy, arrivals accumulate; a batch is cut early only when it is full (it then waits, collated, for the device)
  or when the oldest waiting item has waited `max_queue_time_s` (> 0). 0 = no time cap: a partial batch is cut
  when the device frees up.
- Cancelled requests are dropped before batching; a collated batch whose requests were all cancelled never
  reaches the device.
- A failing batch fails only its own futures (non-`BackendError` exceptions are wrapped in `ModelExecutionError`
  with the cause chained); a runner may return an exception instance in place of one result to fail just that
  item (e.g. a NaN row). The worker goes on.
- Bounded queue: beyond `max_queue_items` / `max_queue_tokens`, `submit` raises `OverloadedError` (HTTP 429); a
  request larger than the whole queue on its own raises `InvalidRequestError` (422): waiting cannot help it.
- An item whose cost alone exceeds `max_batch_tokens` runs alone in a batch of one (documented choice: providers
  truncate to their max length and check `max_batch_tokens >= max_length` at boot, so this only happens when a
  runner's cost exceeds its max length, e.g. image tokens; refusing it would make such an input unservable).
- `close()` refuses new work with `ShuttingDownError`, finishes everything already accepted, then returns.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from backend.config import ModelConfig
from backend.errors import BackendError, ModelExecutionError, ShuttingDownError
from backend.providers.batch_metrics import (
    BATCH_SIZE,
    BATCH_TOKENS,
    CANCELLED,
    FAILURES,
    FORWARD_SECONDS,
    PADDING_RATIO,
)
from backend.providers.batch_queue import BatchQueue, QueueEntry, WorkItem, padded_cost

__all__ = ["BatchProcessor", "BatchRunner", "WorkItem", "padded_cost"]

logger = logging.getLogger(__name__)

P = TypeVar("P")
R = TypeVar("R")
T = TypeVar("T")
P_contra = TypeVar("P_contra", contravariant=True)
R_co = TypeVar("R_co", covariant=True)


class BatchRunner(Protocol[P_contra, R_co]):
    """What a model plugs into the BatchProcessor. `batch_cost(costs) -> int` is optional (default padded_cost)."""

    def collate(self, payloads: list[P_contra]) -> Any:
        """CPU side: pad and build tensors. Runs in a thread, prefetched while the previous batch runs."""
        ...

    def forward(self, batch: Any) -> Sequence[R_co | BaseException]:
        """Device side, in this device's one worker thread: one result per payload, in order.

        An exception instance in place of a result fails only that item."""
        ...


@dataclass
class _Job:
    entries: list[QueueEntry]
    batch: Any
    padded_tokens: int
    real_tokens: int


class BatchProcessor(Generic[P, R]):
    """Dynamic token-budget batcher in front of one device. See the module docstring for the behaviour."""

    def __init__(
        self,
        runner: BatchRunner[P, R],
        *,
        name: str,
        max_batch_tokens: int,
        max_batch_size: int,
        max_queue_items: int,
        max_queue_tokens: int,
        max_queue_time_s: float = 0.0,
        env_prefix: str = "",
    ) -> None:
        """`env_prefix` (e.g. "EMBEDDING_") lets error messages name the settings that bound the queue."""
        if min(max_batch_tokens, max_batch_size, max_queue_items, max_queue_tokens) < 1 or max_queue_time_s < 0:
            raise ValueError("batch and queue limits must be positive")
        self.runner = runner
        self.name = name
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.max_queue_time_s = max_queue_time_s
        self._batch_cost: Callable[[list[int]], int] = getattr(runner, "batch_cost", None) or padded_cost
        self._env_prefix = env_prefix
        self._queue = BatchQueue(name, max_items=max_queue_items, max_tokens=max_queue_tokens, env_prefix=env_prefix)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-device")
        self._wake = asyncio.Event()  # collator's wake-up: arrivals, device state, slot freed, close
        self._filled = asyncio.Event()  # device task's wake-up: a batch is in the slot, or closing
        self._slot: _Job | None = None  # the one prefetched batch
        self._tasks: list[asyncio.Task[None]] = []
        self._device_busy = False
        self._closing = False
        self._closed = False
        self.forward_count = 0  # forward passes run (observability and tests)

    @classmethod
    def from_config(
        cls, runner: BatchRunner[P, R], config: ModelConfig, *, name: str, max_batch_tokens: int
    ) -> BatchProcessor[P, R]:
        """A processor bounded by a model slot's settings (batch size, queue limits and wait, error names)."""
        return cls(
            runner,
            name=name,
            max_batch_tokens=max_batch_tokens,
            max_batch_size=config.max_batch_size,
            max_queue_items=config.max_queue_items,
            max_queue_tokens=config.max_queue_tokens,
            max_queue_time_s=config.max_queue_time_ms / 1000.0,
            env_prefix=config.env_prefix(),
        )

    # --- public API ------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the owner tasks on the running loop. Idempotent."""
        if self._tasks:
            return
        if self._closing:
            raise ShuttingDownError(f"The {self.name} batch processor is shut down")
        self._tasks = [
            asyncio.create_task(self._collate_loop(), name=f"{self.name}-collator"),
            asyncio.create_task(self._device_loop(), name=f"{self.name}-device"),
        ]

    async def submit(self, items: Sequence[WorkItem[P]]) -> list[R]:
        """Run `items` through the model; results in input order.

        Raises OverloadedError when the queue is full, InvalidRequestError when the request alone exceeds the
        queue bounds, ShuttingDownError after close(), and the batch's error when its forward failed.
        Cancelling the caller cancels its pending items; they never reach the device.
        """
        if self._closing:
            raise ShuttingDownError(f"The {self.name} model is shutting down; no new work is accepted")
        if not items:
            return []
        await self.start()
        self._queue.admit(items)
        loop = asyncio.get_running_loop()
        now = loop.time()
        entries = [QueueEntry(item, loop.create_future(), now) for item in items]
        self._queue.push(entries)
        self._wake.set()
        try:
            return list(await asyncio.gather(*(entry.future for entry in entries)))
        except BaseException:
            # Cancelled, or one item failed: nothing of this request is needed any more.
            for entry in entries:
                if not entry.future.done():
                    entry.future.cancel()
                self._queue.release(entry)
            self._queue.update_gauges()
            raise

    async def run_exclusive(self, fn: Callable[[], T]) -> T:
        """Run `fn` in the device worker thread, between batches (warm-up, memory measurement)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def set_max_batch_tokens(self, n: int) -> None:
        """Change the token budget (after the boot measurement); takes effect at the next cut."""
        if n < 1:
            raise ValueError("max_batch_tokens must be positive")
        self.max_batch_tokens = n
        self._wake.set()

    @property
    def queue_depth(self) -> int:
        """Items waiting (not yet cut into a batch)."""
        return len(self._queue)

    async def close(self) -> None:
        """Refuse new work (ShuttingDownError), finish everything already accepted, stop the worker. Idempotent."""
        self._closing = True
        self._wake.set()
        self._filled.set()
        loop = asyncio.get_running_loop()
        tasks = [task for task in self._tasks if task.get_loop() is loop]  # those of a finished loop are gone
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if not self._closed:
            self._closed = True
            await asyncio.to_thread(self._executor.shutdown, wait=True)

    # --- the collator (owner of the queue) --------------------------------------------------------------------
    def _cut_now(self, now: float) -> tuple[bool, float | None]:
        """Whether to cut now, else how long to wait at most (None = until something changes)."""
        oldest = self._queue.oldest()
        if oldest is None or self._slot is not None:
            return False, None
        if not self._device_busy:
            return True, None
        if len(self._queue) >= self.max_batch_size or self._queue.tokens >= self.max_batch_tokens:
            return True, None
        if self.max_queue_time_s > 0:
            waited = now - oldest.enqueued_at
            if waited >= self.max_queue_time_s:
                return True, None
            return False, self.max_queue_time_s - waited
        return False, None

    async def _collate_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._wake.clear()
                self._queue.drop_dead_front()
                if self._closing and not len(self._queue) and self._slot is None:
                    return
                cut, timeout = self._cut_now(loop.time())
                if not cut:
                    try:
                        await asyncio.wait_for(self._wake.wait(), timeout)
                    except asyncio.TimeoutError:
                        pass
                    continue
                entries = self._queue.cut(self.max_batch_tokens, self.max_batch_size, self._batch_cost)
                if entries:
                    job = await self._collate(entries)
                    if job is not None:
                        self._slot = job
                        self._filled.set()
        except BaseException as exc:  # cancelled, or an internal bug: fail what waits rather than leave it hanging
            if isinstance(exc, asyncio.CancelledError):
                error: BackendError = ShuttingDownError(f"The {self.name} batch processor was stopped")
            else:
                logger.exception("%s: batch collator stopped", self.name)
                error = ModelExecutionError(f"The {self.name} batch processor stopped: {exc!r}")
            self._queue.fail_all(error)
            if self._slot is not None:
                self._fail(self._slot.entries, error)
                self._slot = None
            raise
        finally:
            self._closing = True
            self._filled.set()

    async def _collate(self, entries: list[QueueEntry]) -> _Job | None:
        costs = [e.item.cost for e in entries]
        try:
            batch = await asyncio.to_thread(self.runner.collate, [e.item.payload for e in entries])
        except Exception as exc:
            FAILURES.labels(self.name, "collate").inc()
            self._fail(entries, self._wrap(exc, "collating", len(entries), sum(costs)))
            return None
        return _Job(entries, batch, self._batch_cost(costs), sum(costs))

    # --- the device task ------------------------------------------------------------------------------------
    async def _device_loop(self) -> None:
        loop = asyncio.get_running_loop()
        collator = self._tasks[0]
        while True:
            self._filled.clear()
            job, self._slot = self._slot, None
            if job is None:
                if collator.done():
                    return
                await self._filled.wait()
                continue
            live = [e for e in job.entries if not e.future.done()]
            if not live:
                CANCELLED.labels(self.name).inc(len(job.entries))
                self._wake.set()
                continue
            self._device_busy = True
            self._wake.set()  # the slot is free: the collator may prefetch the next batch
            try:
                results, seconds = await loop.run_in_executor(self._executor, self._timed_forward, job.batch)
            except Exception as exc:
                FAILURES.labels(self.name, "batch").inc()
                logger.warning("%s: a batch of %d inputs failed: %r", self.name, len(job.entries), exc)
                self._fail(job.entries, self._wrap(exc, "running", len(job.entries), job.real_tokens))
            else:
                self._record(job, seconds)
                self._deliver(job.entries, results)
            finally:
                self._device_busy = False
                self._wake.set()

    def _timed_forward(self, batch: Any) -> tuple[Sequence[Any], float]:
        start = time.perf_counter()
        results = self.runner.forward(batch)
        return results, time.perf_counter() - start

    def _record(self, job: _Job, seconds: float) -> None:
        self.forward_count += 1
        BATCH_SIZE.labels(self.name).observe(len(job.entries))
        BATCH_TOKENS.labels(self.name).observe(job.padded_tokens)
        PADDING_RATIO.labels(self.name).observe(job.padded_tokens / max(job.real_tokens, 1))
        FORWARD_SECONDS.labels(self.name).observe(seconds)

    def _deliver(self, entries: list[QueueEntry], results: Sequence[Any]) -> None:
        if len(results) != len(entries):
            FAILURES.labels(self.name, "result_count").inc()
            message = f"The {self.name} runner returned {len(results)} results for {len(entries)} inputs"
            self._fail(entries, ModelExecutionError(message))
            return
        for entry, result in zip(entries, results, strict=True):
            if entry.future.done():
                continue
            if isinstance(result, BaseException):
                FAILURES.labels(self.name, "item").inc()
                entry.future.set_exception(result)
            else:
                entry.future.set_result(result)

    def _wrap(self, exc: Exception, stage: str, items: int, tokens: int) -> BackendError:
        if isinstance(exc, BackendError):
            return exc
        hint = ""
        if "out of memory" in str(exc).lower():
            FAILURES.labels(self.name, "out_of_memory").inc()
            hint = (
                f" The batch budget ({self._env_prefix}MAX_BATCH_TOKENS, now {self.max_batch_tokens}) does not fit "
                "the device's memory: lower it, or raise the AUTO_BATCH_MEMORY_MARGIN of an auto budget."
            )
        error = ModelExecutionError(
            f"The {self.name} model failed {stage} a batch of {items} inputs ({tokens} tokens): "
            f"{type(exc).__name__}: {exc}.{hint}",
            stage=stage,
        )
        error.__cause__ = exc
        return error

    @staticmethod
    def _fail(entries: list[QueueEntry], error: BaseException) -> None:
        for entry in entries:
            if not entry.future.done():
                entry.future.set_exception(error)
