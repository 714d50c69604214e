#!/usr/bin/env python3
"""Download the local models (only the files needed), then load each through its provider and run one inference.

Downloads are snapshots of safetensors weights, configs and tokenizer / processor files (never pickle `.bin`
weights, never remote code), through huggingface_hub: HF_HOME / HF_HUB_CACHE choose the cache, HF_ENDPOINT a
mirror, HF_TOKEN a gated model; HF_HUB_OFFLINE=1 only checks the cache. After the download the model is loaded on
its configured device (the slot's *_DEVICE, or --device), one inference is run and the memory measured.

Examples:
    python scripts/download_local_models.py --all                         # every model the settings configure
    python scripts/download_local_models.py --model Qwen/Qwen3-Embedding-4B --local-dir models/qwen3-emb-4b
    python scripts/download_local_models.py --random-weights qwen3-embedding-4b --device cuda:0  # no download
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

from _common import Report, ScriptFailure, base_parser, run_script

ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "1_Pooling/*", "2_Normalize/*",
                  "*.jinja"]
IGNORE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.py", "onnx/*",
                   "openvino/*"]


def kind_of(name: str, settings: Any) -> str:
    """The slot a hub name serves: the configured slot with that name, else guessed from the name."""
    for kind, group in (("embedding", settings.embedding), ("reranker", settings.reranker),
                        ("multimodal", settings.multimodal)):
        if group.model_name == name:
            return kind
    lowered = name.lower()
    if "rerank" in lowered:
        return "reranker"
    if "gme" in lowered or "-vl" in lowered:
        return "multimodal"
    return "embedding"


def download(name: str, local_dir: str | None) -> str:
    """Snapshot the needed files of `name`; the folder they are in. ScriptFailure with the fix on any error."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return snapshot_download(repo_id=name, local_dir=local_dir, allow_patterns=ALLOW_PATTERNS,
                                 ignore_patterns=IGNORE_PATTERNS)
    except LocalEntryNotFoundError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        fix = ("unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE) to download, or copy the model folder here and set "
               "*_MODEL_PATH to it") if offline else "check the network or set HF_ENDPOINT to a reachable mirror"
        raise ScriptFailure(f"{name}: not in the cache and not downloadable ({exc.__class__.__name__})", fix) from exc
    except GatedRepoError as exc:
        raise ScriptFailure(f"{name}: the repository is gated", "accept its licence on the hub and set HF_TOKEN") \
            from exc
    except RepositoryNotFoundError as exc:
        raise ScriptFailure(f"{name}: no such repository on {os.environ.get('HF_ENDPOINT', 'the hub')}",
                            "check the name (e.g. Qwen/Qwen3-Embedding-4B)") from exc


async def smoke(kind: str, config: Any, report: Report) -> dict[str, Any]:
    """Load, warm up, one inference; memory on the device."""
    import _providers as pv

    device = config.device
    pv.release_memory()
    pv.reset_peak(device)
    start = time.perf_counter()
    provider = await pv.open_provider(kind, config)
    load_s = time.perf_counter() - start
    try:
        start = time.perf_counter()
        if kind == "reranker":
            out = await provider.rerank("what is the capital of france", ["paris is the capital of france"])
            shape = f"{len(out)} score {out[0]:.4f}"
        elif kind == "multimodal":
            rows = await provider.embed_images([pv.sample_image()])
            shape = f"image -> {rows.shape}"
        else:
            rows = await provider.embed(["a cat sits on the mat"], input_type="query")
            shape = f"query -> {rows.shape}"
        infer_s = time.perf_counter() - start
        mem = pv.memory(device)
        info = provider.info().as_dict()
    finally:
        await pv.close_provider(provider)
    report.check(f"{kind} inference", True, f"{config.model_name} on {device}: {shape}")
    return {"model": config.model_name, "kind": kind, "device": device, "dtype": info.get("dtype"),
            "load_s": load_s, "inference_s": infer_s, "gib_allocated": mem["allocated_gib"],
            "gib_peak": mem["peak_gib"], "memory_bytes (provider)": info.get("memory_bytes")}


async def amain(args: Any, report: Report) -> None:
    import _providers as pv

    settings = pv.load_settings()
    jobs: list[tuple[str, Any]] = []  # (kind, settings group with model_path set)
    if args.random_weights:
        device = args.device or ("cuda:0" if _cuda() else "cpu")
        kind, overrides, path = pv.random_slot(args.random_weights, device=device, dtype=args.dtype,
                                               weights_dir=args.local_dir)
        report.table("built", [{"geometry": args.random_weights, "folder": str(path), "download": "none"}])
        jobs.append((kind, pv.config_for(kind, pv.load_settings({pv.GROUP[kind]: overrides}))))
    else:
        names = [args.model] if args.model else [pv.config_for(k, settings).model_name
                                                 for k in pv.configured_kinds(settings)
                                                 if pv.config_for(k, settings).provider.value == "local_gpu"]
        if not names:
            raise ScriptFailure("no local model is configured", "pass --model NAME, or set *_PROVIDER=local_gpu")
        rows = []
        for name in names:
            kind = kind_of(name, settings)
            local_dir = os.path.join(args.local_dir, name.split("/")[-1]) if args.local_dir and len(names) > 1 \
                else args.local_dir
            start = time.perf_counter()
            folder = download(name, local_dir)
            files = [f for f in os.listdir(folder) if not f.startswith(".")]
            rows.append({"model": name, "kind": kind, "folder": folder, "files": len(files),
                         "seconds": time.perf_counter() - start})
            update = {"model_name": name, "model_path": folder}
            if args.device:
                update["device"] = args.device
            jobs.append((kind, pv.config_for(kind, settings).model_copy(update=update)))
        report.table("downloaded", rows)
    if args.skip_load:
        return
    results = [await smoke(kind, config, report) for kind, config in jobs]
    report.table("loaded", results)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def build_parser() -> Any:
    parser = base_parser(__doc__ or "")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="hub name to download, e.g. Qwen/Qwen3-Embedding-4B")
    which.add_argument("--all", action="store_true", help="every local model the settings configure")
    which.add_argument("--random-weights", metavar="GEOMETRY",
                       help="build a random-weight model of this geometry instead of downloading (no network)")
    parser.add_argument("--local-dir", help="download into this folder (default: the hub cache)")
    parser.add_argument("--device", help="load on this device instead of the configured one")
    parser.add_argument("--dtype", default="auto", help="dtype for --random-weights (auto = fp16 on CUDA)")
    parser.add_argument("--skip-load", action="store_true", help="download only")
    return parser


def cli(argv: list[str] | None = None) -> int:
    return run_script("download_local_models", lambda a, r: asyncio.run(amain(a, r)), build_parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())
