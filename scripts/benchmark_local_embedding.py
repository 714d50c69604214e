#!/usr/bin/env python3
"""Throughput, latency and memory of the local models through the real providers and batcher, against baselines.

Embedding geometries (the default): the seed's design (a batcher of up to 32 requests waiting up to 100 ms, then
sentence-transformers encode(batch_size=128)) vs ours, closed-loop clients of 4 texts per request (docs 64-512
tokens, queries 8-48) at 1/4/16/64 clients; bulk 2048 texts in one call vs encode(batch_size=32); an idle
16-token query vs the bare model forward; long documents (2k-8k tokens) under load with peak memory; useful
TFLOP/s against an fp16 matmul ceiling measured in the same run; the GTX 1080 Ti projection.
Reranker geometries: 10 x 256-token documents p50 vs the full-vocabulary-head path; memory.
Multimodal geometries: text / image / fused throughput and latency; memory.

On CUDA the run follows the Pascal path (fp16, SDPA without flash or cuDNN kernels, no torch.compile) and
emulates an 11 GiB card (--card-gib) for the providers' boot-time budget; memory figures exclude that ballast.
Every ratio is measured in this one run. Token lengths are uniform in the stated ranges; queries are embedded
without instruction (as documents), so the model sees exactly the stated lengths plus the end token.

Examples:
    python scripts/benchmark_local_embedding.py --random-weights qwen3-embedding-4b --output emb4b.json
    python scripts/benchmark_local_embedding.py --random-weights qwen3-reranker-4b --output rr4b.json
    python scripts/benchmark_local_embedding.py --random-weights tiny-qwen3-embedding --device cpu --quick
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from _common import Report, ScriptFailure, base_parser, run_script

MEMORY_BOUND_GIB = {"qwen3-embedding-4b": 10.5, "qwen3-reranker-4b": 10.5, "gme-qwen2-vl-2b": 8.0}
WORKLOADS = {"docs": (64, 512), "queries": (8, 48)}
LONG = (2000, 8000)
TEXTS_PER_REQUEST = 4


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--random-weights", metavar="GEOMETRY",
                        help="benchmark a random-weight model of this geometry (no download): qwen3-embedding-0.6b"
                             "/-4b/-8b, qwen3-reranker-4b, gme-qwen2-vl-2b, tiny-qwen3-embedding, tiny-qwen3-reranker,"
                             " tiny-gme. Default: the configured embedding model")
    parser.add_argument("--weights-dir", help="build (or reuse) the random-weight folder here")
    parser.add_argument("--device", help="device (default cuda:0 when present, else cpu)")
    parser.add_argument("--dtype", default="auto", help="auto = float16 on CUDA (the Pascal dtype), float32 on CPU")
    parser.add_argument("--card-gib", type=float, default=11.0,
                        help="emulate a card of this many GiB for the boot-time budget (0 = the whole GPU)")
    parser.add_argument("--clients", default="1,4,16,64", help="closed-loop client counts")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds measured per closed-loop cell")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before each measured window")
    parser.add_argument("--bulk-texts", type=int, default=2048, help="texts in the one-call bulk test")
    parser.add_argument("--repeats", type=int, default=30, help="timed repeats of single-request latencies")
    parser.add_argument("--long-docs", type=int, default=16, help="long documents sent under load")
    parser.add_argument("--long-max", type=int, default=LONG[1], help="longest long document (tokens)")
    parser.add_argument("--sections", help="comma list to run a subset (closed_loop,bulk,idle,long,"
                                           "rerank,multimodal)")
    parser.add_argument("--no-seed", action="store_true", help="skip the seed-design baselines")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a CPU smoke run")
    return parser


def apply_quick(args: argparse.Namespace) -> None:
    if args.quick:
        args.clients, args.duration, args.warmup = "1,4", 0.5, 0.1
        args.bulk_texts, args.repeats, args.long_docs = 16, 3, 2
        args.long_max = 600


async def amain(args: argparse.Namespace, report: Report) -> None:
    import _bench_embedding
    import _bench_harness as bh
    import _bench_other
    import _providers as pv
    import _random_weights as rw
    import torch

    apply_quick(args)
    device = args.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ScriptFailure(f"--device {device} but torch sees no GPU", "run scripts/verify_pascal.py for the cause")
    report.info["path"] = bh.pascal_path(device)
    ceiling = bh.matmul_ceiling(device)
    report.info["matmul_ceiling_tflops_fp16"] = ceiling
    if args.random_weights:
        kind, overrides, path = pv.random_slot(args.random_weights, device=device, dtype=args.dtype,
                                               weights_dir=args.weights_dir)
        config = pv.config_for(kind, pv.load_settings({pv.GROUP[kind]: overrides}))
        geometry = args.random_weights
    else:
        settings = pv.load_settings()
        kind, config, path = "embedding", settings.embedding.model_copy(update={"device": device}), None
        if config.model_path and not str(config.model_path).startswith("pkg:"):
            path = config.model_path
        geometry = None
    report.info.update(geometry=geometry, kind=kind, device=device, dtype=config.resolved_dtype(),
                       model_path=str(path), ceiling_note="fp16 8192^3 GEMM, same run")
    sections = set(args.sections.split(",")) if args.sections else None
    ctx = _bench_embedding.Context(args=args, report=report, device=device, config=config, path=path,
                                   geometry=geometry, ceiling=ceiling, sections=sections,
                                   bound=MEMORY_BOUND_GIB.get(geometry or "", None))
    if kind == "embedding":
        await _bench_embedding.run(ctx)
    elif kind == "reranker":
        await _bench_other.run_reranker(ctx)
    else:
        await _bench_other.run_multimodal(ctx)
    if geometry:
        report.info["parameters_body"] = rw.parameter_count(geometry)["body"]


def cli(argv: list[str] | None = None) -> int:
    return run_script("benchmark_local_embedding", lambda a, r: asyncio.run(amain(a, r)), build_parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())

