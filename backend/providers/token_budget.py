"""The token budget of one forward batch (<PREFIX>MAX_BATCH_TOKENS): measured at boot, or checked when explicit.

- GPU, "auto": measure the activation memory per token with synthetic forwards (1 and 4 rows of 512 tokens and
  one row of MAX_LENGTH; `torch.cuda.max_memory_allocated`) and keep the most any shape paid per token (long rows
  pay more: the attention mask grows with the row), then size the budget to the memory this process may still
  allocate, keeping AUTO_BATCH_MEMORY_MARGIN of it unused (allocator fragmentation), capped at
  AUTO_BATCH_TOKENS_LIMIT and at MAX_BATCH_SIZE x MAX_LENGTH. The budget is then proven by warm-up forwards that
  fill it (long rows and many short rows), shrinking it on an out-of-memory. Logged with the numbers it came from.
- GPU, explicit: the same full-budget warm-up forwards; an out-of-memory becomes a ConfigurationError naming
  MAX_BATCH_TOKENS and the size that would fit.
- CPU: "auto" is AUTO_BATCH_TOKENS_LIMIT (raised to MAX_LENGTH); memory is not measured.
- Always: the budget must hold one input of MAX_LENGTH tokens, else an error naming both settings.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from backend.config import ModelConfig
from backend.errors import ConfigurationError

if TYPE_CHECKING:
    from backend.providers.batching import BatchProcessor
    from backend.providers.device import DeviceSpec

logger = logging.getLogger(__name__)

# Synthetic forwards measured at boot (rows x tokens); one row of MAX_LENGTH is always added.
MEASURE_SHAPES = ((1, 512), (4, 512))
# Row length of the many-short-rows warm-up shape.
SHORT_ROW_TOKENS = 128
# Shrink factor and attempts when an "auto" budget still runs out of memory in the warm-up forwards.
AUTO_SHRINK = 0.9
AUTO_ATTEMPTS = 5

ProbeForward = Callable[[int, int], None]  # (rows, tokens per row) -> runs one synthetic forward on the device


@dataclass(frozen=True)
class BudgetPlan:
    """The budget chosen and where it came from (shown in logs and /api/health)."""

    tokens: int
    source: str  # "explicit" | "auto (measured)" | "auto (cpu default)"
    bytes_per_token: float | None = None
    free_bytes: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"max_batch_tokens": self.tokens, "budget_source": self.source}


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def measure_activation_cost(probe: ProbeForward, device: torch.device, max_length: int) -> tuple[float, int]:
    """(bytes per token, fixed bytes) of one forward on `device`; call in the device thread.

    1 and 4 rows of 512 tokens give the slope per token and the fixed cost; one row of MAX_LENGTH gives what a
    token costs in the longest rows (more: the attention mask grows with the row). The larger cost is kept.
    """
    short = min(MEASURE_SHAPES[0][1], max_length)
    peaks = {}
    for rows, tokens in sorted({(rows, short) for rows, _ in MEASURE_SHAPES} | {(1, max_length)}):
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        probe(rows, tokens)
        torch.cuda.synchronize(device)
        peaks[(rows, tokens)] = torch.cuda.max_memory_allocated(device) - base
    torch.cuda.empty_cache()
    (few, _), (many, _) = MEASURE_SHAPES
    slope = (peaks[(many, short)] - peaks[(few, short)]) / ((many - few) * short)
    fixed = max(int(peaks[(few, short)] - slope * few * short), 0)
    longest = (peaks[(1, max_length)] - fixed) / max_length
    return max(slope, longest, 1.0), fixed


def free_device_bytes(device: torch.device) -> int:
    """Memory this process may still allocate on `device`: the card's free memory, within a per-process cap
    (<PREFIX>GPU_MEMORY_LIMIT_GIB sets one through torch's per-process memory fraction)."""
    free, total = torch.cuda.mem_get_info(device)
    fraction = torch.cuda.get_per_process_memory_fraction(device)
    if fraction < 1.0:
        free = min(free, int(total * fraction) - torch.cuda.memory_reserved(device))
    return max(free, 0)


def tokens_that_fit(free_bytes: int, per_token: float, fixed: int, margin: float) -> int:
    """Tokens whose activations fit in `free_bytes` after the margin and the fixed cost; a multiple of 64."""
    usable = free_bytes * (1.0 - margin) - fixed
    return max(int(usable / per_token) // 64 * 64, 0)


def check_budget_holds_max_length(tokens: int, max_length: int, prefix: str, *, measured: bool = False) -> None:
    if tokens >= max_length:
        return
    if measured:
        raise ConfigurationError(
            f"Only about {tokens} tokens of activations fit beside the model, less than one input of "
            f"{prefix}MAX_LENGTH={max_length} tokens. Lower {prefix}MAX_LENGTH, use a smaller {prefix}DTYPE or "
            "a GPU with more free memory.",
            setting=f"{prefix}MAX_LENGTH",
        )
    raise ConfigurationError(
        f"{prefix}MAX_BATCH_TOKENS={tokens} cannot hold one input of {prefix}MAX_LENGTH={max_length} tokens: "
        f"raise {prefix}MAX_BATCH_TOKENS to at least {max_length} (or 'auto'), or lower {prefix}MAX_LENGTH.",
        setting=f"{prefix}MAX_BATCH_TOKENS",
    )


async def plan_batch_tokens(
    processor: BatchProcessor[Any, Any],
    spec: DeviceSpec,
    config: ModelConfig,
    *,
    max_length: int,
    probe_forward: ProbeForward,
    run_warmup: bool = True,
) -> BudgetPlan:
    """Choose the token budget (see the module docstring), set it on `processor` and return it.

    `probe_forward(rows, tokens)` runs one synthetic forward of that shape; it is called in the device thread
    through `processor.run_exclusive`. With `run_warmup`, a CUDA budget is proven by a full-size forward.
    """
    prefix = config.env_prefix()
    ceiling = config.max_batch_size * max_length  # the batcher never cuts more than this
    setting = config.max_batch_tokens
    if setting != "auto":
        check_budget_holds_max_length(int(setting), max_length, prefix)
        plan = BudgetPlan(int(setting), "explicit")
        if spec.is_cuda and run_warmup:
            await _warm_explicit(processor, spec, plan.tokens, max_length, ceiling, probe_forward, config)
    elif not spec.is_cuda:
        plan = BudgetPlan(min(max(config.auto_batch_tokens_limit, max_length), ceiling), "auto (cpu default)")
    else:
        plan = await _measure_auto(processor, spec, config, max_length, ceiling, probe_forward, run_warmup)
    processor.set_max_batch_tokens(plan.tokens)
    measured = ""
    if plan.bytes_per_token is not None:
        free_gib = (plan.free_bytes or 0) / 2**30
        measured = f"; {plan.bytes_per_token / 1024:.1f} KiB of activations per token, {free_gib:.2f} GiB free"
    logger.info("%s: max batch tokens %d (%s%s)", processor.name, plan.tokens, plan.source, measured)
    return plan


def warm_shapes(tokens: int, max_length: int, ceiling: int, max_rows: int) -> list[tuple[int, int]]:
    """Batches (rows, length) that fill the budget: rows as long as MAX_LENGTH allows, then many short rows."""
    tokens = min(tokens, ceiling)
    rows = -(-tokens // max_length)  # ceil: e.g. 11,328 tokens with MAX_LENGTH 8192 -> 2 x 5,664
    shapes = [(rows, tokens // rows)]
    short = min(SHORT_ROW_TOKENS, max_length)
    many = min(max_rows, tokens // short)
    if many > rows:
        shapes.append((many, short))
    return shapes


async def _prove(processor: BatchProcessor[Any, Any], probe: ProbeForward, shapes: list[tuple[int, int]]) -> None:
    for rows, length in shapes:
        await processor.run_exclusive(lambda r=rows, n=length: probe(r, n))


async def _warm_explicit(
    processor: BatchProcessor[Any, Any],
    spec: DeviceSpec,
    tokens: int,
    max_length: int,
    ceiling: int,
    probe: ProbeForward,
    config: ModelConfig,
) -> None:
    try:
        await _prove(processor, probe, warm_shapes(tokens, max_length, ceiling, config.max_batch_size))
    except Exception as exc:
        if not is_oom(exc):
            raise
        per_token, fixed = await processor.run_exclusive(
            lambda: measure_activation_cost(probe, spec.torch_device, max_length)
        )
        free = free_device_bytes(spec.torch_device)
        fits = tokens_that_fit(free, per_token, fixed, config.auto_batch_memory_margin)
        prefix = config.env_prefix()
        raise ConfigurationError(
            f"{prefix}MAX_BATCH_TOKENS={tokens} does not fit on {spec.device}: the boot warm-up forward ran out of "
            f"memory. About {fits} tokens fit ({per_token / 1024:.0f} KiB per token, {free / 2**30:.2f} GiB free): "
            f"set {prefix}MAX_BATCH_TOKENS={fits} or auto.",
            setting=f"{prefix}MAX_BATCH_TOKENS",
            fits=fits,
        ) from exc
    finally:
        await processor.run_exclusive(torch.cuda.empty_cache)


async def _measure_auto(
    processor: BatchProcessor[Any, Any],
    spec: DeviceSpec,
    config: ModelConfig,
    max_length: int,
    ceiling: int,
    probe: ProbeForward,
    run_warmup: bool,
) -> BudgetPlan:
    prefix = config.env_prefix()
    try:
        per_token, fixed = await processor.run_exclusive(
            lambda: measure_activation_cost(probe, spec.torch_device, max_length)
        )
    except Exception as exc:
        if not is_oom(exc):
            raise
        check_budget_holds_max_length(0, max_length, prefix, measured=True)  # raises, naming MAX_LENGTH
        raise
    free = free_device_bytes(spec.torch_device)
    tokens = min(tokens_that_fit(free, per_token, fixed, config.auto_batch_memory_margin), ceiling)
    tokens = min(tokens, config.auto_batch_tokens_limit) if tokens >= max_length else tokens
    check_budget_holds_max_length(tokens, max_length, prefix, measured=True)
    for _ in range(AUTO_ATTEMPTS if run_warmup else 0):
        try:
            await _prove(processor, probe, warm_shapes(tokens, max_length, ceiling, config.max_batch_size))
            break
        except Exception as exc:
            if not is_oom(exc):
                raise
            smaller = max(int(tokens * AUTO_SHRINK) // 64 * 64, max_length if tokens > max_length else 0)
            logger.warning("%s: %d tokens ran out of memory at warm-up; trying %d", processor.name, tokens, smaller)
            tokens = smaller
            check_budget_holds_max_length(tokens, max_length, prefix, measured=True)
        finally:
            await processor.run_exclusive(torch.cuda.empty_cache)
    else:
        if run_warmup:
            raise ConfigurationError(
                f"No {prefix}MAX_BATCH_TOKENS=auto budget survived the warm-up on {spec.device}; set "
                f"{prefix}MAX_BATCH_TOKENS explicitly or raise {prefix}AUTO_BATCH_MEMORY_MARGIN.",
                setting=f"{prefix}MAX_BATCH_TOKENS",
            )
    return BudgetPlan(tokens, "auto (measured)", per_token, free)
