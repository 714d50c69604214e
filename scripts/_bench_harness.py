"""Measurement tools of the benchmarks: the Pascal path, the matmul ceiling, a smaller card, closed-loop clients.

- `pascal_path()`: what a GTX 1080 Ti can run: SDPA limited to the memory-efficient and math kernels (no flash,
  no cuDNN attention), no TF32, and nothing compiled (the providers never call torch.compile).
- `matmul_ceiling()`: fp16 GEMM TFLOP/s measured in the same run, the denominator of every efficiency.
- `Ballast`: occupies all but `card_gib` of the GPU so the providers size their "auto" budgets as on a small card;
  its bytes are subtracted from every memory figure.
- `closed_loop()`: N clients each sending a request, waiting for its answer, sending the next, for a fixed window.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from _common import percentiles

GTX_1080_TI = {"name": "GTX 1080 Ti", "tflops": 11.3, "gb_s": 484.0, "gib": 11.0}
# The seed project's targets on the 1080 Ti.
SEED_TARGETS = {"texts_per_s": 100.0, "p95_ms": 200.0, "rerank_10_ms": 500.0}


def pascal_path(device: str) -> dict[str, Any]:
    """Restrict attention kernels to what Pascal has; returns the flags in effect (for the report)."""
    import torch

    if not device.startswith("cuda"):
        return {"pascal_path": "cpu"}
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(True)
    torch.backends.cuda.enable_math_sdp(True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return {"flash_sdp": torch.backends.cuda.flash_sdp_enabled(), "cudnn_sdp": torch.backends.cuda.cudnn_sdp_enabled(),
            "mem_efficient_sdp": torch.backends.cuda.mem_efficient_sdp_enabled(),
            "math_sdp": torch.backends.cuda.math_sdp_enabled(), "tf32": False, "torch_compile": False}


def matmul_ceiling(device: str, n: int = 8192, repeats: int = 10) -> float:
    """TFLOP/s of an n^3 fp16 GEMM on random data (mean of `repeats` after 3 warm-ups); NaN on the CPU."""
    import torch

    if not device.startswith("cuda"):
        return float("nan")
    a = torch.randn(n, n, device=device, dtype=torch.float16)
    b = torch.randn(n, n, device=device, dtype=torch.float16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1000 / repeats
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / seconds / 1e12


class Ballast:
    """Holds all but `card_gib` GiB of the device (0 = off), so boot-time budgets see a small card's free memory."""

    def __init__(self, device: str, card_gib: float) -> None:
        self.device = device
        self.card_gib = card_gib
        self.bytes = 0
        self._block: Any = None
        self.leftover_gib = 0.0  # torch memory still allocated when the ballast was placed (should be ~0)

    def __enter__(self) -> Ballast:
        if self.card_gib and self.device.startswith("cuda"):
            import gc

            import torch

            gc.collect()  # whatever an earlier phase left (a baseline model) goes back to the driver first
            torch.cuda.empty_cache()
            self.leftover_gib = torch.cuda.memory_allocated(self.device) / 2**30
            free, total = torch.cuda.mem_get_info(self.device)
            used_outside = total - free - torch.cuda.memory_reserved(self.device)  # context, other processes
            # A card of card_gib with the same context: leave card_gib - context - what torch holds now free.
            keep = int(self.card_gib * 2**30) - used_outside - torch.cuda.memory_reserved(self.device)
            self.bytes = max(0, free - max(keep, 0))
            if self.bytes:
                self._block = torch.empty(self.bytes, dtype=torch.uint8, device=self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        self._block = None  # `bytes` keeps the size held, for the report
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def gib(self, value: float | None) -> float | None:
        """A memory figure (GiB) with the ballast taken out."""
        return None if value is None else value - self.bytes / 2**30


@dataclass
class LoopResult:
    clients: int
    seconds: float
    requests: int = 0
    texts: int = 0
    tokens: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        p = percentiles(self.latencies_ms)
        return {"clients": self.clients, "requests": self.requests, "texts/s": self.texts / self.seconds,
                "tokens/s": self.tokens / self.seconds, "p50_ms": p["p50"], "p95_ms": p["p95"],
                "p99_ms": p["p99"], "errors": self.errors}


async def closed_loop(call: Callable[[Any], Awaitable[Any]], make_request: Callable[[int], tuple[Any, int, int]],
                      clients: int, duration_s: float, warmup_s: float, drain_s: float = 60.0) -> LoopResult:
    """`clients` loops of request -> answer -> next request. Counts the requests that complete inside the window
    [warm-up end, warm-up end + duration] (latency from each one's own start); make_request(i) returns
    (request, texts, tokens)."""
    window = {"start": float("inf"), "end": float("inf")}
    result = LoopResult(clients=clients, seconds=duration_s)
    stop = asyncio.Event()

    async def client(index: int) -> None:
        counter = 0
        while not stop.is_set():
            request, n_texts, n_tokens = make_request(index * 1_000_003 + counter)
            counter += 1
            began = time.perf_counter()
            try:
                await call(request)
                ok = True
            except Exception:
                ok = False
            ended = time.perf_counter()
            if window["start"] <= ended <= window["end"]:
                if ok:
                    result.requests += 1
                    result.texts += n_texts
                    result.tokens += n_tokens
                    result.latencies_ms.append((ended - began) * 1000)
                else:
                    result.errors += 1

    tasks = [asyncio.create_task(client(i)) for i in range(clients)]
    await asyncio.sleep(warmup_s)
    window["start"] = time.perf_counter()
    window["end"] = window["start"] + duration_s
    await asyncio.sleep(duration_s)
    stop.set()
    done, pending = await asyncio.wait(tasks, timeout=drain_s)
    for task in pending:
        task.cancel()
    for task in done:
        task.result()
    return result


async def timed_repeats(fn: Callable[[], Awaitable[Any]], repeats: int, warmup: int = 3) -> list[float]:
    """Latencies (ms) of `repeats` sequential calls after `warmup` untimed ones."""
    for _ in range(warmup):
        await fn()
    out = []
    for _ in range(repeats):
        began = time.perf_counter()
        await fn()
        out.append((time.perf_counter() - began) * 1000)
    return out


def projection_rows(flops_per_text: dict[int, float], efficiency: float, weights_bytes: float) -> list[dict[str, Any]]:
    """1080 Ti texts/s at the measured efficiency, and the one-request floor (weights read once), per text length."""
    card = GTX_1080_TI
    rows = []
    for tokens, flops in flops_per_text.items():
        rate = efficiency * card["tflops"] * 1e12 / flops
        read_ms = weights_bytes / (card["gb_s"] * 1e9) * 1000
        rows.append({"tokens/text": tokens, "efficiency": efficiency, "texts/s (1080 Ti)": rate,
                     "1 text ms (compute)": 1000 / rate, "weights read ms": read_ms,
                     "seed target texts/s": SEED_TARGETS["texts_per_s"], "meets": rate >= SEED_TARGETS["texts_per_s"]})
    return rows
