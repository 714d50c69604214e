"""The waiting room of the BatchProcessor: bounded admission, per-item entries, and the length-sorted batch cut.

Only the BatchProcessor's event-loop tasks touch a BatchQueue (no locks: asyncio is single-threaded).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from backend.errors import InvalidRequestError, OverloadedError
from backend.providers.batch_metrics import CANCELLED, QUEUE_DEPTH, QUEUE_TOKENS, REJECTED

logger = logging.getLogger(__name__)

P = TypeVar("P")

# How many batches' worth of the oldest waiting items are length-sorted before a cut (Infinity sorts 8).
SORT_WINDOW_BATCHES = 8


@dataclass(frozen=True)
class WorkItem(Generic[P]):
    """One unit of work: `payload` for the runner's collate(), `cost` in tokens, `group` that batches may not mix."""

    payload: P
    cost: int
    group: Hashable = None


def padded_cost(costs: list[int]) -> int:
    """Cost of a padded batch: longest item x count (what a padded forward pays)."""
    return max(costs) * len(costs) if costs else 0


def select_run(
    costs: list[int], anchor: int, max_tokens: int, max_size: int, batch_cost: Callable[[list[int]], int]
) -> tuple[int, int]:
    """Given ascending `costs`, the inclusive range [lo, hi] around `anchor` to batch.

    Grows one neighbour at a time, taking the side that adds the least padding, while the batch cost stays
    within `max_tokens` and the count within `max_size`. The anchor (the oldest item) is always included, so no
    item starves behind shorter arrivals; it runs alone when it alone exceeds the budget.
    """
    lo = hi = anchor
    run = [costs[anchor]]
    padded = batch_cost is padded_cost  # fast path: longest x count on a sorted run
    while hi - lo + 1 < max_size:
        best: tuple[int, int] | None = None  # (added padding, side)
        base = run[-1] * len(run) if padded else batch_cost(run)
        for side, j in ((-1, lo - 1), (1, hi + 1)):
            if 0 <= j < len(costs):
                cost = costs[j]
                if padded:
                    new = max(run[-1], cost) * (len(run) + 1)
                else:
                    new = batch_cost(run + [cost] if side > 0 else [cost] + run)
                if new <= max_tokens and (best is None or new - base - cost < best[0]):
                    best = (new - base - cost, side)
        if best is None:
            break
        if best[1] < 0:
            lo -= 1
            run.insert(0, costs[lo])
        else:
            hi += 1
            run.append(costs[hi])
    return lo, hi


@dataclass(eq=False)
class QueueEntry:
    """One waiting item and the future its request awaits."""

    item: WorkItem[Any]
    future: asyncio.Future[Any]
    enqueued_at: float
    queued: bool = True  # still counted in the queue's item/token totals

    @property
    def dead(self) -> bool:
        return self.future.done() or not self.queued


class BatchQueue:
    """A bounded deque of QueueEntry with item and token accounting."""

    def __init__(self, name: str, *, max_items: int, max_tokens: int, env_prefix: str = "") -> None:
        self.name = name
        self.max_items = max_items
        self.max_tokens = max_tokens
        self._prefix = env_prefix
        self._entries: deque[QueueEntry] = deque()
        self.tokens = 0  # cost of the entries still counted

    def __len__(self) -> int:
        return len(self._entries)

    def oldest(self) -> QueueEntry | None:
        return self._entries[0] if self._entries else None

    def admit(self, items: Sequence[WorkItem[Any]]) -> None:
        """InvalidRequestError if the request alone exceeds the bounds; OverloadedError if it does not fit now."""
        tokens = sum(item.cost for item in items)
        for count, limit, setting in (
            (len(items), self.max_items, "MAX_QUEUE_ITEMS"),
            (tokens, self.max_tokens, "MAX_QUEUE_TOKENS"),
        ):
            if count > limit:
                raise InvalidRequestError(
                    f"This request alone needs {count} {'items' if 'ITEMS' in setting else 'tokens'} in the "
                    f"{self.name} queue, more than it holds ({self._prefix}{setting}={limit}); split it",
                    limit=limit,
                    received=count,
                )
        if len(self._entries) + len(items) > self.max_items or self.tokens + tokens > self.max_tokens:
            REJECTED.labels(self.name).inc()
            raise OverloadedError(
                f"The {self.name} queue is full ({len(self._entries)} items / {self.tokens} tokens waiting; limits "
                f"{self._prefix}MAX_QUEUE_ITEMS={self.max_items}, {self._prefix}MAX_QUEUE_TOKENS={self.max_tokens})"
                "; retry later",
                queued_items=len(self._entries),
                queued_tokens=self.tokens,
            )

    def push(self, entries: list[QueueEntry]) -> None:
        self._entries.extend(entries)
        self.tokens += sum(entry.item.cost for entry in entries)
        self.update_gauges()

    def release(self, entry: QueueEntry) -> None:
        """Take an entry out of the accounting, exactly once (when cut, cancelled or failed)."""
        if entry.queued:
            entry.queued = False
            self.tokens -= entry.item.cost

    def _discard(self, entry: QueueEntry) -> None:
        if entry.future.cancelled():
            CANCELLED.labels(self.name).inc()
        self.release(entry)

    def drop_dead_front(self) -> None:
        """Drop cancelled/finished entries at the head, so `oldest()` is live."""
        while self._entries and self._entries[0].dead:
            self._discard(self._entries.popleft())
        self.update_gauges()

    def update_gauges(self) -> None:
        QUEUE_DEPTH.labels(self.name).set(len(self._entries))
        QUEUE_TOKENS.labels(self.name).set(self.tokens)

    def cut(self, max_tokens: int, max_size: int, batch_cost: Callable[[list[int]], int]) -> list[QueueEntry]:
        """Length-sort a window of the oldest live items of the oldest item's group; take a run around it."""
        self.drop_dead_front()
        if not self._entries:
            return []
        anchor = self._entries[0]
        window: list[QueueEntry] = []
        others: list[QueueEntry] = []
        while self._entries and len(window) < max_size * SORT_WINDOW_BATCHES:
            entry = self._entries.popleft()
            if entry.dead:
                self._discard(entry)
            elif entry.item.group == anchor.item.group:
                window.append(entry)
            else:
                others.append(entry)
        ordered = sorted(window, key=lambda e: e.item.cost)
        lo, hi = select_run(
            [e.item.cost for e in ordered], ordered.index(anchor), max_tokens, max_size, batch_cost
        )
        chosen = ordered[lo : hi + 1]
        if len(chosen) == 1 and chosen[0].item.cost > max_tokens:
            logger.warning(
                "%s: an item of %d tokens exceeds the batch budget of %d; it runs alone",
                self.name,
                chosen[0].item.cost,
                max_tokens,
            )
        taken = {id(e) for e in chosen}
        rest = sorted((e for e in window + others if id(e) not in taken), key=lambda e: e.enqueued_at)
        self._entries.extendleft(reversed(rest))  # arrival order is kept for the next cut
        for entry in chosen:
            self.release(entry)
        self.update_gauges()
        return chosen

    def fail_all(self, error: BaseException) -> None:
        """Fail every waiting entry with `error` and empty the queue."""
        while self._entries:
            entry = self._entries.popleft()
            self.release(entry)
            if not entry.future.done():
                entry.future.set_exception(error)
        self.update_gauges()
