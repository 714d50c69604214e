#!/usr/bin/env python3
"""End-to-end RAG through the HTTP API: ingest throughput, query latency percentiles, memory.

Starts the backend (or uses --url) with the configured models, or random-weight ones (--random-weights for the
embedding slot, --reranker-random-weights to add a reranker), Milvus Lite in a temporary folder, then:
  1. ingests --documents synthetic documents (token lengths uniform in --doc-tokens) in requests of
     --ingest-batch documents, --ingest-concurrency at a time: documents/s, chunks/s, request latency;
  2. closed-loop query clients (1/4/16 by default) POST /api/query for --duration seconds each: queries/s and
     p50/p95/p99 latency (embed the question, search Milvus, rerank the candidates when a reranker is on);
  3. memory per provider from /api/health (and torch's per-device peak with --in-process).

Examples:
    python scripts/benchmark_end_to_end_rag.py --random-weights qwen3-embedding-4b \
        --reranker-random-weights qwen3-reranker-4b --in-process --output rag.json
    python scripts/benchmark_end_to_end_rag.py --url http://127.0.0.1:8000 --documents 500
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from typing import Any

from _common import Report, ScriptFailure, base_parser, percentiles, run_script


def build_parser() -> argparse.ArgumentParser:
    import _server

    parser = base_parser(__doc__ or "")
    parser.add_argument("--random-weights", metavar="GEOMETRY", help="random-weight embedding model (no download)")
    parser.add_argument("--reranker-random-weights", metavar="GEOMETRY", help="add a random-weight reranker")
    parser.add_argument("--device", default=None, help="device of the random-weight models (default cuda:0 / cpu)")
    parser.add_argument("--documents", type=int, default=200, help="documents to ingest")
    parser.add_argument("--doc-tokens", default="200,800", help="min,max tokens per document")
    parser.add_argument("--ingest-batch", type=int, default=8, help="documents per ingest request")
    parser.add_argument("--ingest-concurrency", type=int, default=4, help="ingest requests in flight")
    parser.add_argument("--clients", default="1,4,16", help="closed-loop query client counts")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per client count")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each window")
    parser.add_argument("--top-k", type=int, default=5, help="contexts per query")
    _server.add_arguments(parser)
    return parser


def environment(args: argparse.Namespace, data_dir: str) -> tuple[dict[str, str], str | None]:
    import _providers as pv
    import _random_weights as rw
    import torch

    env = {"BACKEND_DATA_DIR": data_dir}  # Milvus Lite at <data_dir>/milvus.db (not MILVUS_URI: pymilvus reads it)
    device = args.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    folder = None
    if args.random_weights:
        _, _, path = pv.random_slot(args.random_weights, device=device, dtype="auto")
        env.update(rw.slot_environment(args.random_weights, path, device=device))
        folder = str(path)
    if args.reranker_random_weights:
        _, _, path = pv.random_slot(args.reranker_random_weights, device=device, dtype="auto")
        env.update(rw.slot_environment(args.reranker_random_weights, path, device=device))
    return env, folder


async def ingest(client: Any, docs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    batches = [docs[i:i + args.ingest_batch] for i in range(0, len(docs), args.ingest_batch)]
    latencies: list[float] = []
    chunks = 0
    errors: list[str] = []
    semaphore = asyncio.Semaphore(args.ingest_concurrency)

    async def send(batch: list[dict[str, Any]]) -> None:
        nonlocal chunks
        async with semaphore:
            began = time.perf_counter()
            response = await client.post("/api/documents", json={"documents": batch})
            latencies.append((time.perf_counter() - began) * 1000)
            if response.status_code != 200:
                errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            chunks += sum(int(d.get("chunks", 0)) for d in response.json().get("documents", []))

    began = time.perf_counter()
    await asyncio.gather(*(send(b) for b in batches))
    seconds = time.perf_counter() - began
    p = percentiles(latencies)
    return {"documents": len(docs), "chunks": chunks, "seconds": seconds, "documents/s": len(docs) / seconds,
            "chunks/s": chunks / seconds, "request p50 ms": p["p50"], "request p95 ms": p["p95"],
            "errors": len(errors), "first error": errors[0] if errors else ""}


async def amain(args: argparse.Namespace, report: Report) -> None:
    import _bench_harness as bh
    import _providers as pv
    import _server

    low, high = (int(x) for x in args.doc_tokens.split(","))
    with tempfile.TemporaryDirectory(prefix="rag-bench-") as data_dir:
        env, folder = environment(args, data_dir) if not args.url else ({}, None)
        texts = pv.texts_for(folder, args.documents, low, high, seed=21)
        docs = [{"doc_id": f"bench-{i}", "text": t, "metadata": {"n": i}} for i, t in enumerate(texts)]
        questions = [" ".join(t.split()[:random.Random(i).randint(8, 40)]) for i, t in enumerate(texts)]
        async with _server.backend(env, args) as client:
            health = (await client.get("/api/health")).json()
            report.table("providers (/api/health)", [
                {"slot": s, "enabled": p.get("enabled"), "model": p.get("model"), "device": p.get("device"),
                 "dtype": p.get("dtype"), "memory GiB": (p.get("memory_bytes") or 0) / 2**30 or None}
                for s, p in health.get("providers", {}).items()])
            result = await ingest(client, docs, args)
            report.table("ingest", [result])
            report.check("ingest", result["errors"] == 0 and result["chunks"] > 0,
                         f"{result['documents']} documents, {result['chunks']} chunks, {result['errors']} errors "
                         f"{result['first error']}", "see the backend log; check MILVUS_* and the embedding model")

            async def query(body: dict[str, Any]) -> None:
                response = await client.post("/api/query", json=body)
                if response.status_code != 200:
                    raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")

            def make(seed: int) -> tuple[dict[str, Any], int, int]:
                q = questions[seed % len(questions)]
                return {"question": q, "top_k": args.top_k, "answer": False}, 1, 0

            rows = []
            for clients in (int(c) for c in args.clients.split(",")):
                res = await bh.closed_loop(query, make, clients, args.duration, args.warmup)
                row = res.row()
                rows.append({"clients": clients, "queries": res.requests, "queries/s": res.requests / args.duration,
                             "p50 ms": row["p50_ms"], "p95 ms": row["p95_ms"], "p99 ms": row["p99_ms"],
                             "errors": res.errors})
            report.table("queries (embed question -> Milvus search -> rerank), closed loop", rows)
            failed = sum(r["errors"] for r in rows)
            if failed or not any(r["queries"] for r in rows):
                raise ScriptFailure(f"{failed} queries failed", "see the backend log")
            memory = _server.cuda_memory_by_device() if args.in_process else []
        if memory:
            report.table("per-device memory (torch, this process)", memory)


def cli(argv: list[str] | None = None) -> int:
    return run_script("benchmark_end_to_end_rag", lambda a, r: asyncio.run(amain(a, r)), build_parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())
