"""Building the real providers for the scripts: settings (configured or random-weight), life cycle, memory.

Providers are created exactly as the backend creates them (ModelFactory from a settings group), so the scripts
measure the code that serves traffic, not a copy of it.
"""

from __future__ import annotations

import atexit
import gc
import os
import random
import shutil
from pathlib import Path
from typing import Any

import _common  # noqa: F401 - puts the repository root on sys.path
import _random_weights as rw

KINDS = ("embedding", "reranker", "multimodal")
GROUP = {"embedding": "embedding", "reranker": "reranker", "multimodal": "multimodal"}


def load_settings(overrides: dict[str, dict[str, Any]] | None = None) -> Any:
    """Settings from the environment / .env.backend, with per-group field overrides."""
    from backend.config import Settings

    return Settings.load(**(overrides or {}))


def random_slot(geometry: str, *, device: str, dtype: str, attn: str = "sdpa", weights_dir: str | None = None,
                build_device: str | None = None, **extra: Any) -> tuple[str, dict[str, Any], Path]:
    """Build (or reuse) a random-weight folder for `geometry`; return (kind, group overrides, folder)."""
    kind = rw.geometry(geometry).kind
    if not weights_dir and os.environ.get("BENCH_WEIGHTS_ROOT"):  # shared by the phases of one benchmark run
        weights_dir = str(Path(os.environ["BENCH_WEIGHTS_ROOT"]) / f"{geometry}-{dtype}")
    if weights_dir and (Path(weights_dir) / "config.json").exists():
        path = Path(weights_dir)
    else:
        build_dtype = dtype if dtype != "auto" else ("float16" if device.startswith("cuda") else "float32")
        path = rw.build_model_dir(geometry, weights_dir, device=build_device or device, dtype=build_dtype)
        if not weights_dir:  # a temporary folder (in /dev/shm on Linux): removed when the script ends
            atexit.register(shutil.rmtree, path, ignore_errors=True)
    return kind, rw.slot_overrides(geometry, path, device=device, dtype=dtype, attn_implementation=attn,
                                   **extra), path


def config_for(kind: str, settings: Any) -> Any:
    return getattr(settings, GROUP[kind])


def create_provider(kind: str, config: Any) -> Any:
    """The provider the backend would build for this settings group (ignores `enabled`)."""
    from backend.config import ModelType
    from backend.services.model_factory import provider_class

    model_type = {"embedding": ModelType.EMBEDDING, "reranker": ModelType.RERANKER,
                  "multimodal": ModelType.MULTIMODAL_EMBEDDING}[kind]
    return provider_class(model_type, config.provider)(config)


async def open_provider(kind: str, config: Any, *, warmup: bool = True) -> Any:
    provider = create_provider(kind, config)
    if warmup:
        await provider.warmup()
    return provider


async def close_provider(provider: Any) -> None:
    """Close and give the device memory back, so the next measurement starts clean."""
    await provider.close()
    release_memory()


def release_memory() -> None:
    gc.collect()
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def memory(device: str) -> dict[str, float | None]:
    """Allocated / reserved / peak GiB on a CUDA device (None on the CPU)."""
    if not device.startswith("cuda"):
        return {"allocated_gib": None, "reserved_gib": None, "peak_gib": None}
    import torch

    return {"allocated_gib": torch.cuda.memory_allocated(device) / 2**30,
            "reserved_gib": torch.cuda.memory_reserved(device) / 2**30,
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30}


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def sample_image(width: int = 320, height: int = 240, seed: int = 0) -> Any:
    """A random RGB PIL image (noise, so no codec or resize shortcut makes it cheaper than a photo)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), "RGB")


def texts_for(path: Path | str | None, n: int, low: int, high: int, seed: int = 0) -> list[str]:
    """`n` texts of low..high tokens under the folder's tokenizer (or plain words when there is no folder)."""
    if path is None:
        rng = random.Random(seed)
        return [" ".join(rng.choice(rw.WORDS) for _ in range(rng.randint(low, high))) for _ in range(n)]
    maker = rw.TextMaker(rw.load_tokenizer(path), seed=seed)
    return maker.texts(low, high, n)


def configured_kinds(settings: Any) -> list[str]:
    """The slots a deployment serves: embedding always, reranker and multimodal when enabled."""
    kinds = ["embedding"]
    if settings.reranker.enabled:
        kinds.append("reranker")
    if settings.multimodal.enabled:
        kinds.append("multimodal")
    return kinds
