#!/usr/bin/env python3
"""Load each configured model through the real providers and check it: memory, batching, fp16/fp32 and sdpa/eager.

For every model slot the deployment serves (embedding always; reranker / multimodal when enabled), or for the
random-weight geometries given with --random-weights:
  - load and warm-up time, device memory after loading and after the warm-up, peak;
  - batch tests: a batch gives the same rows as each input alone, in input order; empty input; finite, normalised
    output (reranker: scores in [0, 1], permutation-equivariant; multimodal: images and text+image pairs too);
  - the same inputs in float32 vs the configured half precision, and with eager vs sdpa attention: agreement.

Examples:
    python scripts/verify_model_loading.py                      # the models configured in .env.backend
    python scripts/verify_model_loading.py --random-weights qwen3-embedding-0.6b --device cuda:0
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import numpy as np
from _common import Report, ScriptFailure, base_parser, run_script

# Agreement limits: the same checkpoint in float32 vs float16, and eager vs sdpa in the same dtype.
COSINE_DTYPE = 0.99
COSINE_ATTN = 0.999
SCORE_DTYPE = 0.02
SCORE_ATTN = 0.005
TOL = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 2e-2}


async def outputs(kind: str, provider: Any, texts: list[str], images: list[Any]) -> dict[str, Any]:
    """The probe outputs of one provider: text rows (or scores), and image / fused rows for multimodal."""
    if kind == "reranker":
        return {"scores": np.asarray(await provider.rerank(texts[0], texts[1:]), dtype=np.float64)}
    out = {"text": await provider.embed(texts)}
    if kind == "multimodal":
        out["image"] = await provider.embed_images(images)
        out["fused"] = await provider.embed_fused(texts[: len(images)], images)
    return out


async def batch_tests(kind: str, provider: Any, texts: list[str], images: list[Any], tol: float,
                      report: Report, label: str) -> dict[str, Any]:
    """Batch vs alone, order, empty input, finiteness and norms; returns the batch outputs for agreement checks."""
    batch = await outputs(kind, provider, texts, images)
    if kind == "reranker":
        scores = batch["scores"]
        singles = np.asarray([(await provider.rerank(texts[0], [d]))[0] for d in texts[1:]])
        report.check(f"{label} batch = alone", float(np.abs(scores - singles).max()) <= tol,
                     f"max |batch - alone| {np.abs(scores - singles).max():.2e} (limit {tol:g})")
        in_range = bool(np.isfinite(scores).all() and (scores >= 0).all() and (scores <= 1).all())
        report.check(f"{label} scores", in_range,
                     f"{len(scores)} scores in [{scores.min():.3f}, {scores.max():.3f}]")
        order = list(reversed(range(len(texts) - 1)))
        shuffled = np.asarray(await provider.rerank(texts[0], [texts[1 + i] for i in order]))
        report.check(f"{label} permutation", float(np.abs(shuffled - scores[order]).max()) <= tol,
                     "reversed documents give reversed scores")
        report.check(f"{label} empty", await provider.rerank(texts[0], []) == [], "no documents -> []")
        return batch
    rows = batch["text"]
    singles = np.concatenate([await provider.embed([t]) for t in texts])
    report.check(f"{label} batch = alone", float(np.abs(rows - singles).max()) <= tol,
                 f"max |batch - alone| {np.abs(rows - singles).max():.2e} over {len(texts)} texts (limit {tol:g})")
    norms = np.linalg.norm(rows, axis=1)
    report.check(f"{label} output", rows.dtype == np.float32 and bool(np.isfinite(rows).all())
                 and float(np.abs(norms - 1).max()) < 1e-3, f"{rows.shape} {rows.dtype}, norms {norms.min():.4f}"
                 f"..{norms.max():.4f}")
    empty = await provider.embed([])
    report.check(f"{label} empty", empty.shape == (0, rows.shape[1]), f"[] -> {empty.shape}")
    if kind == "multimodal":
        alone = np.concatenate([await provider.embed_images([im]) for im in images])
        report.check(f"{label} images batch = alone", float(np.abs(batch["image"] - alone).max()) <= tol,
                     f"max diff {np.abs(batch['image'] - alone).max():.2e}; fused {batch['fused'].shape}")
    return batch


def agreement(kind: str, ref: dict[str, Any], other: dict[str, Any]) -> float:
    """Smallest row cosine (embeddings) or largest score difference (reranker) between two output sets."""
    if kind == "reranker":
        return float(np.abs(ref["scores"] - other["scores"]).max())
    worst = 1.0
    for key, rows in ref.items():
        cos = np.sum(rows.astype(np.float64) * other[key], axis=1) / (
            np.linalg.norm(rows, axis=1) * np.linalg.norm(other[key], axis=1))
        worst = min(worst, float(cos.min()))
    return worst


async def verify(kind: str, config: Any, path: Any, args: Any, report: Report) -> None:
    import _providers as pv

    device = config.device
    label = f"{kind}:{config.model_name}"
    texts = pv.texts_for(path, 8, 4, 64, seed=1)
    images = [pv.sample_image(200 + 40 * i, 150 + 30 * i, seed=i) for i in range(2)]
    pv.release_memory()
    pv.reset_peak(device)
    before = pv.memory(device)["allocated_gib"]
    start = time.perf_counter()
    provider = pv.create_provider(kind, config)
    loaded = pv.memory(device)["allocated_gib"]
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    await provider.warmup()
    warm_s = time.perf_counter() - start
    after = pv.memory(device)
    info = provider.info().as_dict()
    dtype = config.resolved_dtype()
    try:
        ref = await batch_tests(kind, provider, texts, images, TOL.get(dtype, 5e-3), report, label)
    finally:
        await pv.close_provider(provider)
    report.tables.setdefault("models", []).append({
        "model": config.model_name, "kind": kind, "device": device, "dtype": dtype,
        "attention": config.attn_implementation, "load_s": load_s, "warmup_s": warm_s,
        "dim": info.get("dimension"),
        "gib_loaded": None if loaded is None else loaded - (before or 0),
        "gib_after_warmup": after["allocated_gib"], "gib_peak": after["peak_gib"],
        "budget": info.get("max_batch_tokens")})
    variants = []
    if not args.skip_dtype_check:
        other = "float32" if dtype != "float32" else ("float16" if device.startswith("cuda") else None)
        if other:
            variants.append(("dtype", {"dtype": other}))
    if not args.skip_attn_check:
        variants.append(("attention", {"attn_implementation": "eager" if config.attn_implementation != "eager"
                                       else "sdpa"}))
    for what, update in variants:
        variant = config.model_copy(update={**update, "warmup": False})
        provider = await pv.open_provider(kind, variant, warmup=True)
        try:
            out = await outputs(kind, provider, texts, images)
        finally:
            await pv.close_provider(provider)
        value = agreement(kind, ref, out)
        if kind == "reranker":
            limit = SCORE_DTYPE if what == "dtype" else SCORE_ATTN
            ok, metric = value <= limit, "max |score diff|"
        else:
            limit = COSINE_DTYPE if what == "dtype" else COSINE_ATTN
            ok, metric = value >= limit, "min cosine"
        desc = f"{dtype}/{config.attn_implementation} vs {variant.resolved_dtype()}/{variant.attn_implementation}"
        report.tables.setdefault("agreement", []).append(
            {"model": config.model_name, "kind": kind, "compared": desc, "metric": metric, "value": value,
             "limit": limit, "ok": ok})
        report.check(f"{label} {what} agreement", ok, f"{desc}: {metric} {value:.6f} (limit {limit})",
                     "a kernel or dtype gives different results: run scripts/verify_pascal.py, try "
                     "*_ATTN_IMPLEMENTATION=eager or *_DTYPE=float32")


async def amain(args: Any, report: Report) -> None:
    import _providers as pv

    targets: list[tuple[str, Any, Any]] = []
    if args.random_weights:
        device = args.device or _default_device()
        for geometry in args.random_weights:
            kind, overrides, path = pv.random_slot(geometry, device=device, dtype=args.dtype)
            settings = pv.load_settings({pv.GROUP[kind]: overrides})
            targets.append((kind, pv.config_for(kind, settings), path))
    else:
        settings = pv.load_settings()
        for kind in pv.configured_kinds(settings):
            config = pv.config_for(kind, settings)
            if config.provider.value != "local_gpu":
                report.check(f"{kind} provider", True, f"{config.provider.value}: online, nothing to load here")
                continue
            if args.device:
                config = config.model_copy(update={"device": args.device})
            targets.append((kind, config, config.model_path if _is_dir(config.model_path) else None))
    if not targets:
        raise ScriptFailure("no local model is configured", "set EMBEDDING_PROVIDER=local_gpu (and the model path)")
    for kind, config, path in targets:
        await verify(kind, config, path, args, report)
    report.table("models", report.tables.get("models", []))
    report.table("agreement", report.tables.get("agreement", []))


def _is_dir(path: Any) -> bool:
    from pathlib import Path

    return bool(path) and Path(str(path)).is_dir()


def _default_device() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def build_parser() -> Any:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--random-weights", action="append", metavar="GEOMETRY",
                        help="check a random-weight model of this geometry instead of the configured ones "
                             "(repeatable): qwen3-embedding-0.6b/-4b/-8b, qwen3-reranker-4b, gme-qwen2-vl-2b, "
                             "tiny-qwen3-embedding, tiny-qwen3-reranker, tiny-gme")
    parser.add_argument("--device", help="override the device (cpu, cuda:N)")
    parser.add_argument("--dtype", default="auto", help="dtype of random-weight models (auto = fp16 on CUDA)")
    parser.add_argument("--skip-dtype-check", action="store_true", help="skip the float32 comparison")
    parser.add_argument("--skip-attn-check", action="store_true", help="skip the eager-attention comparison")
    return parser


def cli(argv: list[str] | None = None) -> int:
    return run_script("verify_model_loading", lambda a, r: asyncio.run(amain(a, r)), build_parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())
