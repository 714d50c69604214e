"""BatchProcessor behaviour with a recording fake runner (no model): order, budget, sorting, prefetch, cancel,
failures, bounds, shutdown, metrics."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest
from prometheus_client import REGISTRY

from backend.errors import (
    InvalidRequestError,
    ModelExecutionError,
    NonFiniteOutputError,
    OverloadedError,
    ShuttingDownError,
)
from backend.providers.batch_queue import padded_cost, select_run
from backend.providers.batching import BatchProcessor, WorkItem


class Recorder:
    """Records what was collated and forwarded; payload "block" holds the device until `gate` is set."""

    def __init__(self) -> None:
        self.collated: list[list[str]] = []
        self.forwarded: list[list[str]] = []
        self.threads: set[str] = set()
        self.gate = threading.Event()
        self.in_forward = threading.Event()

    def collate(self, payloads: list[str]) -> list[str]:
        if "bad-collate" in payloads:
            raise ValueError("cannot collate")
        self.collated.append(list(payloads))
        return list(payloads)

    def forward(self, batch: list[str]) -> list[object]:
        self.threads.add(threading.current_thread().name)
        self.forwarded.append(batch)
        if "block" in batch:
            self.in_forward.set()
            assert self.gate.wait(10)
        if "boom" in batch:
            raise RuntimeError("CUDA error: device-side assert")
        if "typed" in batch:
            raise NonFiniteOutputError("NaN in output")
        if "oom" in batch:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if "short" in batch:
            return batch[:-1]
        return [ValueError(f"bad item {p}") if p == "nan" else f"r:{p}" for p in batch]

    @property
    def forwarded_payloads(self) -> list[str]:
        return [p for batch in self.forwarded for p in batch]


def items(*payloads: str, cost: int = 1, group: object = None) -> list[WorkItem[str]]:
    return [WorkItem(p, cost, group) for p in payloads]


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.002)


def make(runner: Recorder, **kw: object) -> BatchProcessor[str, str]:
    opts: dict[str, object] = {"name": "test", "max_batch_tokens": 1000, "max_batch_size": 8}
    opts.update(max_queue_items=1000, max_queue_tokens=100_000)
    opts.update(kw)
    return BatchProcessor(runner, **opts)  # type: ignore[arg-type]


def accepted(proc: BatchProcessor[str, str], runner: Recorder) -> int:
    """Items waiting or already collated, not counting the blocking item."""
    return proc.queue_depth + sum(len(c) for c in runner.collated) - 1


async def block_device(proc: BatchProcessor[str, str], runner: Recorder) -> asyncio.Task[list[str]]:
    task = asyncio.create_task(proc.submit(items("block")))
    await asyncio.to_thread(runner.in_forward.wait, 5)
    return task


# --- pure selection ----------------------------------------------------------------------------------------
def test_select_run_keeps_anchor_and_fits_budget() -> None:
    costs = [1, 1, 2, 10, 10, 10, 50]
    lo, hi = select_run(costs, 4, max_tokens=30, max_size=8, batch_cost=padded_cost)
    assert (lo, hi) == (3, 5)  # three 10s = 30 padded tokens; shorter ones would also fit but add padding last
    lo, hi = select_run(costs, 6, max_tokens=10, max_size=8, batch_cost=padded_cost)
    assert (lo, hi) == (6, 6)  # over budget alone: runs alone
    lo, hi = select_run(costs, 0, max_tokens=1000, max_size=3, batch_cost=padded_cost)
    assert hi - lo + 1 == 3 and lo <= 0 <= hi
    assert select_run([5, 5, 5], 1, max_tokens=15, max_size=8, batch_cost=sum) == (0, 2)


# --- order, splitting, budget, groups ----------------------------------------------------------------------
async def test_results_in_input_order_for_any_size() -> None:
    runner = Recorder()
    proc = make(runner, max_batch_size=7)
    payloads = [f"p{i}" for i in range(100)]
    out = await proc.submit([WorkItem(p, 1 + (i * 37) % 11) for i, p in enumerate(payloads)])
    assert out == [f"r:{p}" for p in payloads]
    assert sorted(runner.forwarded_payloads) == sorted(payloads)
    assert all(len(b) <= 7 for b in runner.forwarded)
    assert await proc.submit([]) == []
    await proc.close()


async def test_batches_respect_token_budget_size_and_groups() -> None:
    runner = Recorder()
    proc = make(runner, max_batch_tokens=40, max_batch_size=5)
    blocker = await block_device(proc, runner)
    reqs = [
        asyncio.create_task(proc.submit([WorkItem(f"{g}{i}", c, g) for i, c in enumerate([3, 9, 20, 1, 7, 12])]))
        for g in ("a", "b")
    ]
    await until(lambda: accepted(proc, runner) == 12)
    runner.gate.set()
    await asyncio.gather(blocker, *reqs)
    cost_of = {f"{g}{i}": c for g in "ab" for i, c in enumerate([3, 9, 20, 1, 7, 12])}
    for batch in runner.forwarded[1:]:
        assert len(batch) <= 5
        assert padded_cost([cost_of[p] for p in batch]) <= 40
        assert len({p[0] for p in batch}) == 1  # never mixes groups
    await proc.close()


async def test_waiting_items_are_length_sorted_before_the_cut() -> None:
    runner = Recorder()
    proc = make(runner, max_batch_tokens=400, max_batch_size=4)
    blocker = await block_device(proc, runner)
    # Arrival order alternates short and long; sorted cuts give pure short and pure long batches.
    req = asyncio.create_task(
        proc.submit([WorkItem(f"{'s' if i % 2 else 'l'}{i}", 1 if i % 2 else 100) for i in range(8)])
    )
    await until(lambda: accepted(proc, runner) == 8)
    runner.gate.set()
    await asyncio.gather(blocker, req)
    kinds = [{p[0] for p in batch} for batch in runner.forwarded[1:]]
    assert kinds == [{"l"}, {"s"}] or kinds == [{"s"}, {"l"}]
    await proc.close()


# --- no idle timer, accumulation, prefetch, time cap -------------------------------------------------------
async def test_busy_device_accumulates_and_batches_concurrent_requests() -> None:
    runner = Recorder()
    proc = make(runner, max_batch_size=64, max_batch_tokens=10_000)
    assert await proc.submit(items("alone")) == ["r:alone"]  # idle device: dispatched at once, alone
    assert runner.forwarded == [["alone"]]
    blocker = await block_device(proc, runner)
    reqs = [asyncio.create_task(proc.submit(items(f"q{i}"))) for i in range(20)]
    await until(lambda: proc.queue_depth == 20)
    await asyncio.sleep(0.05)
    assert len(runner.collated) == 2  # the partial batch waits: no cut while busy, no timer
    runner.gate.set()
    results = await asyncio.gather(*reqs)
    await blocker
    assert results == [[f"r:q{i}"] for i in range(20)]
    assert len(runner.forwarded) == 3  # alone, block, then all 20 in one batch
    await proc.close()


async def test_full_batch_is_prefetched_while_the_device_is_busy() -> None:
    runner = Recorder()
    proc = make(runner, max_batch_size=4)
    blocker = await block_device(proc, runner)
    req = asyncio.create_task(proc.submit(items("a", "b", "c", "d", "e", "f", "g", "h", "i", "j")))
    await until(lambda: len(runner.collated) == 2)  # one full batch collated during the forward...
    await asyncio.sleep(0.05)
    assert len(runner.collated) == 2  # ...and only one (prefetch depth 1)
    assert len(runner.forwarded) == 1
    runner.gate.set()
    assert await req == [f"r:{p}" for p in "abcdefghij"]
    await blocker
    await proc.close()


async def test_max_queue_time_caps_the_wait_of_a_partial_batch() -> None:
    runner = Recorder()
    proc = make(runner, max_batch_size=64, max_queue_time_s=0.05)
    blocker = await block_device(proc, runner)
    req = asyncio.create_task(proc.submit(items("late")))
    await until(lambda: len(runner.collated) == 2)  # cut after the cap although the device is still busy
    assert runner.collated[1] == ["late"] and len(runner.forwarded) == 1
    runner.gate.set()
    assert await req == ["r:late"]
    await blocker
    await proc.close()


# --- cancellation -------------------------------------------------------------------------------------------
async def test_cancelled_request_never_reaches_the_model() -> None:
    runner = Recorder()
    proc = make(runner, max_batch_size=4)
    blocker = await block_device(proc, runner)
    prefetched = asyncio.create_task(proc.submit(items("x1", "x2", "x3", "x4")))  # full: collated into the slot
    queued = asyncio.create_task(proc.submit(items("y1", "y2")))  # waits in the queue
    await until(lambda: len(runner.collated) == 2 and proc.queue_depth == 2)
    prefetched.cancel()
    queued.cancel()
    other = asyncio.create_task(proc.submit(items("z")))
    await asyncio.sleep(0.01)
    runner.gate.set()
    assert await other == ["r:z"]
    await blocker
    for task in (prefetched, queued):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert not {"x1", "x2", "x3", "x4", "y1", "y2"} & set(runner.forwarded_payloads)
    await proc.close()


# --- failures ---------------------------------------------------------------------------------------------
async def test_failing_batch_fails_only_its_requests_and_the_worker_goes_on() -> None:
    runner = Recorder()
    proc = make(runner)
    with pytest.raises(ModelExecutionError) as info:
        await proc.submit(items("boom", "fine-in-same-batch"))
    assert isinstance(info.value.__cause__, RuntimeError) and "device-side assert" in str(info.value)
    with pytest.raises(NonFiniteOutputError):  # a BackendError passes through unchanged
        await proc.submit(items("typed"))
    with pytest.raises(ModelExecutionError, match="returned 1 results for 2 inputs"):
        await proc.submit(items("short", "x"))
    with pytest.raises(ModelExecutionError, match="collating"):
        await proc.submit(items("bad-collate"))
    with pytest.raises(ModelExecutionError, match=r"budget \(MAX_BATCH_TOKENS, now \d+\) does not fit"):
        await proc.submit(items("oom"))  # an out-of-memory names the setting to lower
    assert await proc.submit(items("next")) == ["r:next"]
    await proc.close()


async def test_failed_batch_does_not_touch_other_batches_in_flight() -> None:
    runner = Recorder()
    proc = make(runner, max_batch_size=2)
    blocker = await block_device(proc, runner)
    bad = asyncio.create_task(proc.submit(items("boom", "b2")))
    good = asyncio.create_task(proc.submit(items("g1", "g2")))
    await until(lambda: accepted(proc, runner) == 4)
    runner.gate.set()
    with pytest.raises(ModelExecutionError):
        await bad
    assert await good == ["r:g1", "r:g2"]
    await blocker
    await proc.close()


async def test_an_exception_result_fails_only_that_item() -> None:
    runner = Recorder()
    proc = make(runner)
    blocker = await block_device(proc, runner)
    bad = asyncio.create_task(proc.submit(items("nan", "ok1")))
    good = asyncio.create_task(proc.submit(items("ok2")))
    await until(lambda: proc.queue_depth == 3)
    runner.gate.set()
    with pytest.raises(ValueError, match="bad item nan"):
        await bad
    assert await good == ["r:ok2"]
    await blocker
    assert len(runner.forwarded) == 2  # both requests shared one batch
    await proc.close()


# --- bounds -----------------------------------------------------------------------------------------------
async def test_full_queue_raises_overloaded_and_oversized_request_is_refused() -> None:
    runner = Recorder()
    proc = make(runner, max_queue_items=5, max_queue_tokens=50, env_prefix="EMBEDDING_")
    blocker = await block_device(proc, runner)
    waiting = asyncio.create_task(proc.submit(items("a", "b", "c")))
    await until(lambda: proc.queue_depth == 3)
    with pytest.raises(OverloadedError, match="EMBEDDING_MAX_QUEUE_ITEMS=5") as info:
        await proc.submit(items("d", "e", "f"))
    assert info.value.status_code == 429
    with pytest.raises(OverloadedError, match="EMBEDDING_MAX_QUEUE_TOKENS=50"):
        await proc.submit(items("big", cost=48))
    with pytest.raises(InvalidRequestError, match="EMBEDDING_MAX_QUEUE_ITEMS=5"):
        await proc.submit(items(*"abcdef"))
    runner.gate.set()
    assert await waiting == ["r:a", "r:b", "r:c"]
    await blocker
    assert await proc.submit(items("d", "e", "f")) == ["r:d", "r:e", "r:f"]  # room again
    await proc.close()


async def test_item_over_the_budget_runs_alone() -> None:
    runner = Recorder()
    proc = make(runner, max_batch_tokens=10)
    assert await proc.submit([WorkItem("huge", 50), WorkItem("s1", 2), WorkItem("s2", 2)]) == [
        "r:huge",
        "r:s1",
        "r:s2",
    ]
    assert ["huge"] in runner.forwarded
    proc.set_max_batch_tokens(1000)
    await proc.submit([WorkItem("h2", 50), WorkItem("s3", 2)])
    assert runner.forwarded[-1] == ["s3", "h2"]
    await proc.close()


# --- shutdown, device thread, metrics -----------------------------------------------------------------------
async def test_close_refuses_new_work_and_drains_accepted_work() -> None:
    runner = Recorder()
    proc = make(runner, max_batch_size=2)
    blocker = await block_device(proc, runner)
    requests = [asyncio.create_task(proc.submit(items(f"w{i}", f"v{i}"))) for i in range(3)]
    await until(lambda: accepted(proc, runner) == 6)
    closing = asyncio.create_task(proc.close())
    await asyncio.sleep(0.01)
    with pytest.raises(ShuttingDownError) as info:
        await proc.submit(items("late"))
    assert info.value.status_code == 503
    assert not closing.done()
    runner.gate.set()
    await closing
    assert [await t for t in requests] == [[f"r:w{i}", f"r:v{i}"] for i in range(3)]
    await blocker
    await proc.close()  # idempotent


async def test_forward_and_run_exclusive_share_one_device_thread() -> None:
    runner = Recorder()
    proc = make(runner, name="thread-test")
    await proc.submit(items("a"))
    name = await proc.run_exclusive(lambda: threading.current_thread().name)
    assert runner.threads == {name} and name.startswith("thread-test-device")
    assert name != threading.current_thread().name
    await proc.close()


async def test_metrics_are_exported_per_processor() -> None:
    runner = Recorder()
    proc = make(runner, name="metrics-test")
    before = REGISTRY.get_sample_value("batcher_batch_size_count", {"processor": "metrics-test"}) or 0
    await proc.submit([WorkItem("a", 2), WorkItem("b", 4)])
    assert REGISTRY.get_sample_value("batcher_batch_size_count", {"processor": "metrics-test"}) == before + 1
    assert REGISTRY.get_sample_value("batcher_batch_tokens_sum", {"processor": "metrics-test"}) >= 8
    assert REGISTRY.get_sample_value("batcher_forward_seconds_count", {"processor": "metrics-test"}) >= 1
    assert REGISTRY.get_sample_value("batcher_queue_items", {"processor": "metrics-test"}) == 0
    with pytest.raises(ModelExecutionError):
        await proc.submit(items("boom"))
    assert REGISTRY.get_sample_value("batcher_failures_total", {"processor": "metrics-test", "reason": "batch"}) >= 1
    await proc.close()
