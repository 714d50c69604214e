"""Where and how a local model runs: device, dtype, attention and kernel checks, model memory, the NaN/Inf guard.

Every check raises `DeviceError` (a ConfigurationError, raised at start-up) whose message names the setting to
change, built from the config's prefix, so the embedding, reranker and multimodal providers share this module:

    spec = resolve_device_spec(config)                      # before loading
    model = AutoModel.from_pretrained(path, torch_dtype=spec.dtype, attn_implementation=spec.attn_implementation)
    model.to(spec.torch_device)
    verify_loaded_model(model, spec, prefix=config.env_prefix())   # after loading: what is really in effect
    ensure_finite(vectors, model_name=..., dtype=spec.dtype_name, prefix=...)   # on every output

The checks take the facts about the machine as a `CudaProbe`, so tests inject a Pascal card, a missing kernel
image or a CPU-only build without owning one. The token budget (`plan_batch_tokens`) lives in
`backend.providers.token_budget` and is re-exported here.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any

import torch

from backend.config import ModelConfig
from backend.errors import DeviceError, NonFiniteOutputError
from backend.providers.base import ProviderInfo

logger = logging.getLogger(__name__)

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Compute capability from which bfloat16 and FlashAttention-2 run (Ampere).
AMPERE = (8, 0)
TORCH_INSTALL_HINT = (
    "pip install torch --index-url https://download.pytorch.org/whl/cu126 "
    "(or --index-url https://download.pytorch.org/whl/cu118)"
)


@dataclass(frozen=True)
class CudaProbe:
    """What torch reports about CUDA on this machine (injectable for tests)."""

    available: bool
    device_count: int
    torch_cuda_version: str | None
    arch_list: tuple[str, ...]
    capabilities: tuple[tuple[int, int], ...]
    names: tuple[str, ...]

    @classmethod
    def from_torch(cls) -> CudaProbe:
        available = torch.cuda.is_available()
        count = torch.cuda.device_count() if available else 0
        return cls(
            available=available,
            device_count=count,
            torch_cuda_version=torch.version.cuda,
            arch_list=tuple(torch.cuda.get_arch_list()) if available else (),
            capabilities=tuple(torch.cuda.get_device_capability(i) for i in range(count)),
            names=tuple(torch.cuda.get_device_name(i) for i in range(count)),
        )


@dataclass(frozen=True)
class DeviceSpec:
    """The checked placement of one model."""

    device: str  # "cpu" or "cuda:N"
    dtype_name: str  # "float16" | "bfloat16" | "float32"
    attn_implementation: str  # "sdpa" | "eager" | "flash_attention_2"
    capability: tuple[int, int] | None = None
    gpu_name: str | None = None

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype_name]

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def provider_info(
        self, *, model: str, dimension: int | None, memory_bytes: int, extra: dict[str, Any]
    ) -> ProviderInfo:
        """What /api/health shows of a local model placed by this spec."""
        return ProviderInfo(
            provider="local_gpu",
            model=model,
            dimension=dimension,
            device=self.device,
            dtype=self.dtype_name,
            attn_implementation=self.attn_implementation,
            memory_bytes=memory_bytes,
            extra={"gpu": self.gpu_name, **extra},
        )

    def describe(self) -> str:
        where = f"{self.device} ({self.gpu_name}, compute capability {self.capability})" if self.is_cuda else "cpu"
        return f"{where}, {self.dtype_name}, attention {self.attn_implementation}"


def check_device(device: str, *, prefix: str, probe: CudaProbe) -> tuple[tuple[int, int] | None, str | None]:
    """Refuse a CUDA device this torch cannot use; return (compute capability, name) of a CUDA device."""
    if device == "cpu":
        return None, None
    index = int(device.split(":", 1)[1])
    if probe.torch_cuda_version is None:
        raise DeviceError(
            f"{prefix}DEVICE={device} asks for a GPU, but the installed torch {torch.__version__} is a CPU-only "
            f"build. Install a CUDA build ({TORCH_INSTALL_HINT}) or set {prefix}DEVICE=cpu.",
            setting=f"{prefix}DEVICE",
        )
    if not probe.available or probe.device_count == 0:
        raise DeviceError(
            f"{prefix}DEVICE={device} asks for a GPU, but torch (CUDA {probe.torch_cuda_version}) sees none: check "
            f"the NVIDIA driver and CUDA_VISIBLE_DEVICES, or set {prefix}DEVICE=cpu.",
            setting=f"{prefix}DEVICE",
        )
    if index >= probe.device_count:
        visible = ", ".join(f"cuda:{i} ({name})" for i, name in enumerate(probe.names))
        raise DeviceError(
            f"{prefix}DEVICE={device} does not exist: {probe.device_count} GPU(s) visible ({visible}). "
            f"Set {prefix}DEVICE to one of them.",
            setting=f"{prefix}DEVICE",
        )
    return probe.capabilities[index], probe.names[index]


def kernels_support(capability: tuple[int, int], arch_list: tuple[str, ...] | list[str]) -> bool:
    """Whether a torch built for `arch_list` (e.g. ["sm_61", "sm_70", "compute_70"]) has kernels for `capability`.

    A cubin for sm_XY runs on the same major version with minor >= Y; PTX (compute_XY) is JIT-compiled for any
    capability >= XY.
    """
    major, minor = capability
    for arch in arch_list:
        kind, _, digits = arch.partition("_")
        if not digits.isdigit() or len(digits) < 2:
            continue
        a_major, a_minor = int(digits[:-1]), int(digits[-1])
        if kind == "sm" and a_major == major and a_minor <= minor:
            return True
        if kind == "compute" and (a_major, a_minor) <= (major, minor):
            return True
    return False


def check_kernels(
    capability: tuple[int, int], arch_list: tuple[str, ...] | list[str], *, device: str, gpu_name: str, prefix: str
) -> None:
    """Refuse a GPU the installed torch has no kernels for (else: 'no kernel image is available' at first use)."""
    if kernels_support(capability, arch_list):
        return
    sm = f"sm_{capability[0]}{capability[1]}"
    raise DeviceError(
        f"{prefix}DEVICE={device} is a {gpu_name} (compute capability {capability[0]}.{capability[1]}, {sm}), but "
        f"the installed torch {torch.__version__} (CUDA {torch.version.cuda}) carries kernels only for "
        f"{', '.join(arch_list) or 'no GPU'}: every operation would fail with 'no kernel image is available for "
        f"execution on the device'. Install a torch build with {sm} kernels: {TORCH_INSTALL_HINT}; or set "
        f"{prefix}DEVICE=cpu.",
        setting=f"{prefix}DEVICE",
    )


def resolve_dtype(dtype: str, device: str, capability: tuple[int, int] | None, *, prefix: str) -> str:
    """The dtype name in effect: auto = float16 on CUDA, float32 on the CPU; bfloat16 refused below 8.0."""
    name = ("float16" if device.startswith("cuda") else "float32") if dtype == "auto" else dtype
    if name not in _DTYPES:
        raise DeviceError(f"{prefix}DTYPE={dtype} is not one of auto, float16, bfloat16, float32")
    if name == "bfloat16" and capability is not None and capability < AMPERE:
        raise DeviceError(
            f"{prefix}DTYPE=bfloat16 needs compute capability 8.0 or newer; {device} has "
            f"{capability[0]}.{capability[1]}. Set {prefix}DTYPE=float16 (or float32 if float16 overflows).",
            setting=f"{prefix}DTYPE",
        )
    return name


def check_attention(
    attn: str,
    device: str,
    capability: tuple[int, int] | None,
    *,
    prefix: str,
    flash_attn_installed: bool | None = None,
) -> str:
    """Refuse flash_attention_2 where it cannot run (CPU, compute capability < 8.0, package missing)."""
    if attn in ("sdpa", "eager"):
        return attn
    if attn != "flash_attention_2":
        raise DeviceError(f"{prefix}ATTN_IMPLEMENTATION={attn} is not one of sdpa, eager, flash_attention_2")
    fix = f"Set {prefix}ATTN_IMPLEMENTATION=sdpa."
    if capability is None:
        raise DeviceError(f"{prefix}ATTN_IMPLEMENTATION=flash_attention_2 needs a CUDA GPU; {device} is not. {fix}")
    if capability < AMPERE:
        raise DeviceError(
            f"{prefix}ATTN_IMPLEMENTATION=flash_attention_2 needs compute capability 8.0 or newer; {device} has "
            f"{capability[0]}.{capability[1]}. {fix}",
            setting=f"{prefix}ATTN_IMPLEMENTATION",
        )
    if flash_attn_installed is None:
        flash_attn_installed = importlib.util.find_spec("flash_attn") is not None
    if not flash_attn_installed:
        raise DeviceError(
            f"{prefix}ATTN_IMPLEMENTATION=flash_attention_2 needs the flash-attn package (pip install flash-attn). "
            f"{fix}",
            setting=f"{prefix}ATTN_IMPLEMENTATION",
        )
    return attn


def resolve_device_spec(config: ModelConfig, probe: CudaProbe | None = None) -> DeviceSpec:
    """Run every start-up check for `config` (device, kernels, dtype, attention) and return the placement."""
    prefix = config.env_prefix()
    probe = probe or CudaProbe.from_torch()
    capability, gpu_name = check_device(config.device, prefix=prefix, probe=probe)
    if capability is not None and gpu_name is not None:
        check_kernels(capability, probe.arch_list, device=config.device, gpu_name=gpu_name, prefix=prefix)
    dtype = resolve_dtype(config.dtype, config.device, capability, prefix=prefix)
    attn = check_attention(config.attn_implementation, config.device, capability, prefix=prefix)
    spec = DeviceSpec(config.device, dtype, attn, capability, gpu_name)
    apply_memory_limit(spec, config.gpu_memory_limit_gib, prefix=prefix)
    return spec


def apply_memory_limit(spec: DeviceSpec, limit_gib: float | None, *, prefix: str) -> None:
    """Cap this process's allocations on the model's GPU at <PREFIX>GPU_MEMORY_LIMIT_GIB (unset or CPU: no cap)."""
    if limit_gib is None or not spec.is_cuda:
        return
    total = torch.cuda.get_device_properties(spec.torch_device).total_memory
    limit = int(limit_gib * 2**30)
    if limit > total:
        raise DeviceError(
            f"{prefix}GPU_MEMORY_LIMIT_GIB={limit_gib} exceeds the {total / 2**30:.1f} GiB of {spec.device}: "
            f"lower it or leave it empty",
            setting=f"{prefix}GPU_MEMORY_LIMIT_GIB",
        )
    torch.cuda.set_per_process_memory_fraction(limit / total, spec.torch_device)
    logger.info("%s: allocations capped at %.2f GiB (%sGPU_MEMORY_LIMIT_GIB)", spec.device, limit_gib, prefix)


def verify_loaded_model(model: torch.nn.Module, spec: DeviceSpec, *, prefix: str, config: Any = None) -> None:
    """Assert that the loaded model really runs with the dtype, attention kernel and device asked for.

    `config` is the transformers config that records the attention kernel (default: `model.config`)."""
    problems = []
    floating = [p for p in model.parameters() if p.is_floating_point()]
    dtypes = {p.dtype for p in floating}
    if dtypes != {spec.dtype}:
        problems.append(f"parameters are {sorted(map(str, dtypes))}, not {spec.dtype} ({prefix}DTYPE)")
    devices = {p.device for p in model.parameters()}
    if devices != {_normalise(spec.torch_device)}:
        problems.append(f"parameters are on {sorted(map(str, devices))}, not {spec.device} ({prefix}DEVICE)")
    config = config if config is not None else getattr(model, "config", None)
    attn = getattr(config, "_attn_implementation", None)
    if attn is not None and attn != spec.attn_implementation:
        problems.append(f"attention is {attn}, not {spec.attn_implementation} ({prefix}ATTN_IMPLEMENTATION)")
    if problems:
        raise DeviceError("The loaded model does not run as configured: " + "; ".join(problems))


def _normalise(device: torch.device) -> torch.device:
    return torch.device("cuda", device.index or 0) if device.type == "cuda" else device


def model_memory_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the model's parameters and buffers."""
    tensors: list[Any] = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def non_finite_rows(values: torch.Tensor) -> list[int]:
    """Indices of the rows (first dimension) holding a NaN or Inf."""
    bad = ~torch.isfinite(values.reshape(values.shape[0], -1)).all(dim=1)
    return bad.nonzero().flatten().tolist()


def non_finite_error(*, model_name: str, dtype: str, prefix: str, rows: int = 1) -> NonFiniteOutputError:
    """The typed error for NaN/Inf output, naming the model, the dtype and the remedy."""
    remedy = (
        f"set {prefix}DTYPE=float32 (or bfloat16 on compute capability >= 8.0): float16 overflow is a known "
        "failure of Qwen3-Embedding"
        if dtype == "float16"
        else f"check the checkpoint; try {prefix}DTYPE=float32"
    )
    return NonFiniteOutputError(
        f"The model {model_name} produced NaN/Inf for {rows} input(s) in {dtype}; nothing was returned in their "
        f"place. Remedy: {remedy}.",
        model=model_name,
        dtype=dtype,
    )


def ensure_finite(values: torch.Tensor, *, model_name: str, dtype: str, prefix: str) -> None:
    """Raise NonFiniteOutputError if any value is NaN or Inf."""
    if not bool(torch.isfinite(values).all()):
        rows = len(non_finite_rows(values)) if values.dim() > 0 else 1
        raise non_finite_error(model_name=model_name, dtype=dtype, prefix=prefix, rows=rows)


# Re-exported: the auto token budget belongs to the device story but has a module of its own.
from backend.providers.token_budget import BudgetPlan, plan_batch_tokens  # noqa: E402

__all__ = [
    "AMPERE",
    "BudgetPlan",
    "CudaProbe",
    "DeviceSpec",
    "check_attention",
    "check_device",
    "check_kernels",
    "ensure_finite",
    "kernels_support",
    "model_memory_bytes",
    "non_finite_error",
    "non_finite_rows",
    "plan_batch_tokens",
    "resolve_device_spec",
    "resolve_dtype",
    "verify_loaded_model",
]
