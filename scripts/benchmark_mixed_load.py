#!/usr/bin/env python3
"""One model per GPU, all three serving at once: per-model throughput alone vs under mixed load, per-device memory.

Starts the backend with EMBEDDING_DEVICE / RERANKER_DEVICE / MULTIMODAL_EMBEDDING_DEVICE (default cuda:0 / cuda:1 /
cuda:2: the 3-GPU layout), random weights in the real geometries (Qwen3-Embedding-4B, Qwen3-Reranker-4B,
GME-Qwen2-VL-2B), fp16. Then, through the HTTP API, closed-loop clients per model for a bounded time:
  1. each model alone (embed: 4 docs of 64-512 tokens per request; rerank: query + 10 docs of 256 tokens;
     multimodal: one 640x480 image);
  2. all three together.
Reports each model's requests/s mixed vs alone (target >= 0.9x when the models are on distinct GPUs: no
interference through the event loop or the GIL), /api/health's device per model, and per-device memory
(torch allocated and peak when in-process, nvidia-smi used): each model only on its card, each <= 11 GB peak.

Examples:
    python scripts/benchmark_mixed_load.py --output mixed.json                    # 3 GPUs
    python scripts/benchmark_mixed_load.py --devices cuda:0,cuda:1,cuda:1         # 2 GPUs
    python scripts/benchmark_mixed_load.py --tiny --devices cpu,cpu,cpu --duration 1 --in-process   # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
from typing import Any

from _common import Report, base_parser, ratio, run_script

GEOMETRIES = {"embedding": "qwen3-embedding-4b", "reranker": "qwen3-reranker-4b", "multimodal": "gme-qwen2-vl-2b"}
TINY = {"embedding": "tiny-qwen3-embedding", "reranker": "tiny-qwen3-reranker", "multimodal": "tiny-gme"}
PEAK_BOUND_GIB = 11e9 / 2**30  # "each <= 11 GB peak"
MIXED_TARGET = 0.9


def build_parser() -> argparse.ArgumentParser:
    import _server

    parser = base_parser(__doc__ or "")
    parser.add_argument("--devices", default="cuda:0,cuda:1,cuda:2",
                        help="embedding,reranker,multimodal devices (default: one GPU each)")
    parser.add_argument("--tiny", action="store_true", help="tiny random geometries (CPU smoke run)")
    parser.add_argument("--skip", default="", help="comma list of models to leave out (embedding,reranker,"
                                                   "multimodal)")
    parser.add_argument("--clients", type=int, default=8, help="closed-loop clients per model")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load before each measured window")
    _server.add_arguments(parser)
    return parser


def environment(args: argparse.Namespace, kinds: list[str], data_dir: str) -> tuple[dict[str, str], dict[str, Any]]:
    """Environment of the backend: one random-weight model per slot on its device, Milvus Lite in a temp dir."""
    import _providers as pv
    import _random_weights as rw

    devices = dict(zip(("embedding", "reranker", "multimodal"), args.devices.split(","), strict=True))
    # Not MILVUS_URI: pymilvus reads that variable at import and rejects a local path. The default store is
    # <BACKEND_DATA_DIR>/milvus.db (Milvus Lite).
    env = {"BACKEND_DATA_DIR": data_dir, "RERANKER_ENABLED": "false",
           "MULTIMODAL_EMBEDDING_ENABLED": "false", "BACKEND_ENV_FILE": "/dev/null"}
    folders = {}
    for kind in kinds:
        geometry = (TINY if args.tiny else GEOMETRIES)[kind]
        _, _, path = pv.random_slot(geometry, device=devices[kind], dtype="auto",
                                    build_device=devices[kind])
        folders[kind] = path
        env.update(rw.slot_environment(geometry, path, device=devices[kind]))
    return env, {"devices": devices, "folders": {k: str(v) for k, v in folders.items()}}


def request_makers(folders: dict[str, str], tiny: bool) -> dict[str, Any]:
    import _providers as pv
    import _server

    docs = pv.texts_for(folders.get("embedding") or folders.get("reranker"), 256, 64, 512 if not tiny else 96, 1)
    rr_docs = pv.texts_for(folders.get("reranker") or folders.get("embedding"), 64, 256 if not tiny else 32,
                           256 if not tiny else 32, 2)
    query = pv.texts_for(folders.get("reranker") or folders.get("embedding"), 1, 20, 20, 3)[0]
    size = (640, 480) if not tiny else (64, 48)
    images = [_server.image_b64(*size, seed=i) for i in range(8)]

    def embed(seed: int) -> tuple[str, dict[str, Any], int]:
        rng = random.Random(seed)
        return "/api/embed", {"texts": [rng.choice(docs) for _ in range(4)]}, 4

    def rerank(seed: int) -> tuple[str, dict[str, Any], int]:
        rng = random.Random(seed)
        return "/api/rerank", {"query": query, "documents": rng.sample(rr_docs, 10)}, 10

    def multimodal(seed: int) -> tuple[str, dict[str, Any], int]:
        return "/api/embed/multimodal", {"images": [images[seed % len(images)]]}, 1

    return {"embedding": embed, "reranker": rerank, "multimodal": multimodal}


async def phase(client: Any, makers: dict[str, Any], kinds: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Closed-loop clients for every model in `kinds` at once; per-model requests/s, items/s, latency."""
    import _bench_harness as bh

    async def post(request: tuple[str, dict[str, Any]]) -> None:
        response = await client.post(request[0], json=request[1])
        if response.status_code != 200:
            raise RuntimeError(f"{request[0]}: HTTP {response.status_code} {response.text[:200]}")

    def maker(kind: str) -> Any:
        def make(seed: int) -> tuple[Any, int, int]:
            path, body, items = makers[kind](seed)
            return (path, body), items, 0
        return make

    results = await asyncio.gather(*(bh.closed_loop(post, maker(kind), args.clients, args.duration, args.warmup)
                                     for kind in kinds))
    return dict(zip(kinds, results, strict=True))


async def amain(args: argparse.Namespace, report: Report) -> None:
    import _server

    kinds = [k for k in ("embedding", "reranker", "multimodal") if k not in args.skip.split(",")]
    with tempfile.TemporaryDirectory(prefix="mixed-load-") as data_dir:
        env, built = environment(args, kinds, data_dir) if not args.url else ({}, {"devices": {}, "folders": {}})
        report.info.update(built)
        makers = request_makers(built["folders"], args.tiny)
        async with _server.backend(env, args) as client:
            health = (await client.get("/api/health")).json()
            report.table("health: each model and its device", [
                {"slot": slot, "enabled": p.get("enabled"), "model": p.get("model"), "device": p.get("device"),
                 "dtype": p.get("dtype"), "memory GiB": (p.get("memory_bytes") or 0) / 2**30 or None}
                for slot, p in health.get("providers", {}).items()])
            for kind in kinds:
                want = built["devices"].get(kind)
                got = health["providers"].get(kind, {}).get("device")
                if want:
                    report.check(f"{kind} device", got == want, f"/api/health says {got}, asked for {want}",
                                 f"set {kind.upper()} device variable correctly")
            alone = {kind: (await phase(client, makers, [kind], args))[kind] for kind in kinds}
            mixed = await phase(client, makers, kinds, args)
            memory = _server.cuda_memory_by_device() if args.in_process else []
    distinct = len({built["devices"].get(k) for k in kinds}) == len(kinds) and all(
        str(built["devices"].get(k, "")).startswith("cuda") for k in kinds)
    rows = []
    for kind in kinds:
        a, m = alone[kind].row(), mixed[kind].row()
        x = ratio(m["texts/s"], a["texts/s"])
        rows.append({"model": kind, "device": built["devices"].get(kind), "alone req/s": a["requests"] / args.duration,
                     "mixed req/s": m["requests"] / args.duration, "alone items/s": a["texts/s"],
                     "mixed items/s": m["texts/s"], "mixed / alone": x, "alone p50 ms": a["p50_ms"],
                     "mixed p50 ms": m["p50_ms"], "errors": a["errors"] + m["errors"]})
        report.check(f"{kind} requests succeed", a["errors"] + m["errors"] == 0 and m["requests"] > 0,
                     f"{m['requests']} mixed requests, {a['errors'] + m['errors']} errors")
        if distinct:
            report.check(f"{kind} mixed vs alone", x >= MIXED_TARGET, f"{x:.2f}x its throughput alone "
                         f"(target >= {MIXED_TARGET})", "look for work on the event loop or GIL-bound CPU work")
        else:
            report.info.setdefault("not_checked", []).append(
                f"{kind}: mixed/alone {x:.2f}x not checked: models share a device")
    report.table("throughput: alone vs mixed (closed loop, HTTP)", rows)
    if memory:
        report.table("per-device memory (this process's torch allocator; nvidia-smi)", memory)
        for row in memory:
            if row["peak_gib"] > 0 and distinct:
                report.check(f"{row['device']} peak", row["peak_gib"] <= PEAK_BOUND_GIB,
                             f"{row['peak_gib']:.2f} GiB (bound 11 GB)")


def cli(argv: list[str] | None = None) -> int:
    return run_script("benchmark_mixed_load", lambda a, r: asyncio.run(amain(a, r)), build_parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())
