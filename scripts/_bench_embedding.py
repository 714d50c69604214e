"""The embedding sections of benchmark_local_embedding.py: seed design vs ours, in one run."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any

from _common import median, ratio


@dataclass
class Context:
    """What every section needs: arguments, report, device, the settings group and the model folder."""

    args: Any
    report: Any
    device: str
    config: Any
    path: Any
    geometry: str | None
    ceiling: float
    sections: set[str] | None
    bound: float | None
    results: dict[str, Any] = field(default_factory=dict)

    def want(self, name: str) -> bool:
        return self.sections is None or name in self.sections

    @property
    def enforce(self) -> bool:
        """Targets are checks (exit 1 when missed) only for the geometry they were set for, on a GPU."""
        return self.device.startswith("cuda") and self.geometry in ("qwen3-embedding-4b", "qwen3-reranker-4b",
                                                                    "gme-qwen2-vl-2b")


@dataclass
class Pool:
    """Texts with their token counts as the model sees them (text tokens + the end token)."""

    texts: list[str]
    tokens: list[int]

    def request(self, seed: int, size: int) -> tuple[list[str], int, int]:
        rng = random.Random(seed)
        picks = [rng.randrange(len(self.texts)) for _ in range(size)]
        return [self.texts[i] for i in picks], size, sum(self.tokens[i] for i in picks)


def make_pools(ctx: Context) -> dict[str, Pool]:
    import _providers as pv
    import _random_weights as rw

    args = ctx.args
    size = max(args.bulk_texts, 64)
    out: dict[str, Pool] = {}
    specs = {"docs": (64, 512, size), "queries": (8, 48, size), "long": (2000, args.long_max, args.long_docs),
             "idle": (16, 16, 1)}
    maker = rw.TextMaker(rw.load_tokenizer(ctx.path), seed=7) if ctx.path else None
    for name, (low, high, n) in specs.items():
        if args.quick and name == "long":
            low = min(low, high // 2)
        texts = maker.texts(low, high, n) if maker else pv.texts_for(None, n, low, high, seed=7)
        tokens = [maker.count(t) + 1 for t in texts] if maker else [len(t.split()) + 1 for t in texts]
        out[name] = Pool(texts, tokens)
    return out


async def closed_loops(ctx: Context, call: Any, pools: dict[str, Pool], label: str) -> list[dict[str, Any]]:
    import _bench_harness as bh

    rows = []
    for workload in ("docs", "queries"):
        for clients in [int(c) for c in ctx.args.clients.split(",")]:
            pool = pools[workload]
            res = await bh.closed_loop(call, lambda i, p=pool: p.request(i, 4), clients, ctx.args.duration,
                                       ctx.args.warmup)
            rows.append({"design": label, "workload": workload, **res.row()})
            print(f"  {label} {workload} {clients} clients: {rows[-1]['texts/s']:.1f} texts/s, "
                  f"p50 {rows[-1]['p50_ms']:.1f} ms", flush=True)
    return rows


async def long_under_load(ctx: Context, call: Any, pools: dict[str, Pool], long_clients: int = 8,
                          background_clients: int = 4) -> dict[str, Any]:
    """Long documents sent by `long_clients` while `background_clients` send 4-doc requests; peak memory."""
    import _providers as pv

    pv.reset_peak(ctx.device)
    queue = list(range(len(pools["long"].texts)))
    stop = asyncio.Event()
    stats = {"long_done": 0, "long_errors": 0, "background_requests": 0, "background_errors": 0,
             "error": ""}

    async def long_client() -> None:
        while queue:
            index = queue.pop()
            try:
                await call([pools["long"].texts[index]])
                stats["long_done"] += 1
            except Exception as exc:
                stats["long_errors"] += 1
                stats["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"

    async def background(seed: int) -> None:
        count = 0
        while not stop.is_set():
            try:
                await call(pools["docs"].request(seed * 7919 + count, 4)[0])
                stats["background_requests"] += 1
            except Exception:
                stats["background_errors"] += 1
            count += 1

    began = time.perf_counter()
    bg = [asyncio.create_task(background(i)) for i in range(background_clients)]
    await asyncio.gather(*(long_client() for _ in range(long_clients)))
    seconds = time.perf_counter() - began
    stop.set()
    await asyncio.gather(*bg)
    mem = pv.memory(ctx.device)
    tokens = sum(pools["long"].tokens)
    return {**stats, "seconds": seconds, "long_tokens": tokens, "peak_gib": mem["peak_gib"]}


async def seed_phase(ctx: Context, pools: dict[str, Pool]) -> dict[str, Any]:
    import _providers as pv
    import _seed_baseline as sb
    import torch

    cfg = ctx.config
    st = sb.load_sentence_transformer(str(ctx.path or cfg.model_source), ctx.device, cfg.resolved_dtype(),
                                      cfg.attn_implementation)
    out: dict[str, Any] = {}
    try:
        st.encode(pools["docs"].texts[:8], batch_size=8)  # warm-up
        if ctx.want("closed_loop"):
            batcher = sb.SeedBatcher(st)
            await batcher.start()
            out["closed_loop"] = await closed_loops(ctx, batcher.embed, pools, "seed")
            await batcher.close()
        if ctx.want("bulk"):
            out["bulk"] = {}
            for workload in ("docs", "queries"):
                texts = pools[workload].texts[: ctx.args.bulk_texts]
                began = time.perf_counter()
                st.encode(texts, batch_size=32, normalize_embeddings=True, show_progress_bar=False)
                pv.synchronize(ctx.device)
                out["bulk"][workload] = time.perf_counter() - began
        if ctx.want("idle"):
            model, tok = st[0].auto_model, st.tokenizer
            enc = tok(pools["idle"].texts, return_tensors="pt", padding=True).to(ctx.device)
            out["idle_tokens"] = int(enc["input_ids"].shape[1])

            async def bare() -> None:
                with torch.inference_mode():
                    hidden = model(**enc).last_hidden_state[:, -1]
                    torch.nn.functional.normalize(hidden.float(), dim=-1).cpu()

            import _bench_harness as bh

            out["idle_bare_ms"] = await bh.timed_repeats(bare, ctx.args.repeats)
        if ctx.want("long"):
            batcher = sb.SeedBatcher(st)
            await batcher.start()
            out["long"] = await long_under_load(ctx, batcher.embed, pools)
            await batcher.close()
    finally:
        del st
        pv.release_memory()
    return out


async def ours_phase(ctx: Context, pools: dict[str, Pool]) -> dict[str, Any]:
    import _bench_harness as bh
    import _providers as pv

    out: dict[str, Any] = {}
    pv.release_memory()
    with bh.Ballast(ctx.device, ctx.args.card_gib) as ballast:
        out["ballast_gib"] = ballast.bytes / 2**30
        out["allocated_before_load_gib"] = ballast.leftover_gib
        pv.reset_peak(ctx.device)
        began = time.perf_counter()
        provider = await pv.open_provider("embedding", ctx.config)
        out["load_warmup_s"] = time.perf_counter() - began
        mem = pv.memory(ctx.device)
        out["after_warmup_gib"] = ballast.gib(mem["allocated_gib"])
        out["warmup_peak_gib"] = ballast.gib(mem["peak_gib"])
        out["info"] = provider.info().as_dict()

        async def call(texts: list[str]) -> Any:
            return await provider.embed(texts)

        try:
            if ctx.want("closed_loop"):
                out["closed_loop"] = await closed_loops(ctx, call, pools, "ours")
            if ctx.want("bulk"):
                out["bulk"] = {}
                for workload in ("docs", "queries"):
                    texts = pools[workload].texts[: ctx.args.bulk_texts]
                    began = time.perf_counter()
                    await provider.embed(texts)
                    out["bulk"][workload] = time.perf_counter() - began
            if ctx.want("idle"):
                out["idle_ms"] = await bh.timed_repeats(lambda: provider.embed(pools["idle"].texts), ctx.args.repeats)
            if ctx.want("long"):
                out["long"] = await long_under_load(ctx, call, pools)
                out["long"]["peak_gib"] = ballast.gib(out["long"]["peak_gib"])
            out["peak_gib"] = ballast.gib(pv.memory(ctx.device)["peak_gib"])
        finally:
            await pv.close_provider(provider)
    return out


async def run(ctx: Context) -> None:
    pools = make_pools(ctx)
    ctx.report.info["pools"] = {k: {"texts": len(p.texts), "min_tokens": min(p.tokens), "max_tokens": max(p.tokens),
                                    "mean_tokens": sum(p.tokens) / len(p.tokens)} for k, p in pools.items()}
    # Ours first, under the emulated card; the seed afterwards on the whole GPU (it needs no ballast, and nothing it
    # leaves behind can shrink our budget).
    ours = await ours_phase(ctx, pools)
    seed = {} if ctx.args.no_seed else await seed_phase(ctx, pools)
    import _bench_summary

    _bench_summary.embedding_tables(ctx, pools, seed, ours)


__all__ = ["Context", "Pool", "median", "ratio", "run"]
