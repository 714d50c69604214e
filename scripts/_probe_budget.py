#!/usr/bin/env python3
"""Profiling helper: the embedding provider's boot budget vs the memory its batches really take.

Under the emulated card (--card-gib), builds the provider (logging its budget decision), then embeds one batch per
shape (rows x tokens, all texts of exactly that length) and records peak memory above the weights, both through
the provider (padded batch with an attention mask) and through the runner's synthetic probe (no mask), which is
what the boot measurement uses. Usage: python scripts/_probe_budget.py --random-weights qwen3-embedding-4b
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

import _common  # noqa: F401

SHAPES = [(1, 512), (16, 512), (1, 8192)]  # plus batches that fill the budget chosen at boot (see main)


async def main(args: argparse.Namespace) -> None:
    import _bench_harness as bh
    import _providers as pv
    import _random_weights as rw
    import torch

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = args.device
    bh.pascal_path(device)
    kind, overrides, path = pv.random_slot(args.random_weights, device=device, dtype="auto")
    config = pv.config_for(kind, pv.load_settings({pv.GROUP[kind]: overrides}))
    maker = rw.TextMaker(rw.load_tokenizer(path), seed=3)
    with bh.Ballast(device, args.card_gib) as ballast:
        if device.startswith("cuda"):
            print(f"ballast {ballast.bytes / 2**30:.2f} GiB, leftover {ballast.leftover_gib:.2f} GiB, free "
                  f"{torch.cuda.mem_get_info(device)[0] / 2**30:.2f} GiB")
        provider = await pv.open_provider("embedding", config)
        weights = ballast.gib(pv.memory(device)["allocated_gib"]) or 0.0
        print("info", provider.info().as_dict())
        print(f"after warm-up: allocated {weights:.2f} GiB, peak {ballast.gib(pv.memory(device)['peak_gib'])}")
        if args.idle:
            await idle_breakdown(provider, maker, device)
        budget = provider.processor.max_batch_tokens
        full = [(budget // n, n) for n in (160, 224, 512)] + [(2, min(budget // 2, provider.max_length))]
        for rows, tokens in ([] if args.idle else SHAPES + full):
            texts = [maker.text(tokens - 1) for _ in range(rows)]
            for label, fn in (("provider", lambda t=texts: provider.embed(t)),
                              ("probe", lambda r=rows, n=tokens: provider.processor.run_exclusive(
                                  lambda: provider.runner.probe_forward(r, n)))):
                pv.release_memory()
                pv.reset_peak(device)
                try:
                    await fn()
                    peak = ballast.gib(pv.memory(device)["peak_gib"])
                    print(f"{label:8s} {rows:3d} x {tokens:5d} = {rows * tokens:6d} tokens: peak {peak:.2f} GiB, "
                          f"{(peak - weights) * 2**30 / (rows * tokens) / 1024:.0f} KiB/token above the weights")
                except Exception as exc:
                    print(f"{label:8s} {rows:3d} x {tokens:5d}: {type(exc).__name__} {str(exc)[:100]}")
        await pv.close_provider(provider)


async def idle_breakdown(provider: Any, maker: Any, device: str, repeats: int = 30) -> None:
    """p50 of one 16-token text through each layer of the path: bare forward, runner, batcher, provider."""
    import statistics
    import time

    import torch

    runner = provider.runner
    text = maker.text(16)
    items = runner.tokenize([text], provider.max_length)
    batch = runner.collate([items[0].payload])
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)

    def bare() -> None:
        with torch.inference_mode():
            runner.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, -1].float().cpu()

    def run_forward() -> None:
        runner.forward(runner.collate([items[0].payload]))

    async def timed(fn: Any, is_async: bool) -> float:
        samples = []
        for i in range(repeats + 3):
            began = time.perf_counter()
            if is_async:
                await fn()
            else:
                fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            if i >= 3:
                samples.append((time.perf_counter() - began) * 1000)
        return statistics.median(samples)

    rows = {
        "bare model forward (main thread)": await timed(bare, False),
        "runner.forward incl. collate, pooling, cpu, NaN check": await timed(run_forward, False),
        "runner.tokenize": await timed(lambda: runner.tokenize([text], provider.max_length), False),
        "batcher.submit (queue, collate thread, device thread)": await timed(
            lambda: provider.processor.submit(items), True),
        "provider.embed (everything)": await timed(lambda: provider.embed([text]), True),
    }
    for name, ms in rows.items():
        print(f"idle p50 {ms:7.2f} ms  {name}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--random-weights", default="qwen3-embedding-4b")
    parser.add_argument("--card-gib", type=float, default=11.0)
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--idle", action="store_true", help="time one 16-token query through each layer instead")
    asyncio.run(main(parser.parse_args()))
    sys.exit(0)
