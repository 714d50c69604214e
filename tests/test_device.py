"""Start-up refusals (device, dtype, attention, kernels) with injected machines; verification, memory, NaN guard;
the token budget (CPU default, explicit checks, simulated GPU out-of-memory)."""

from __future__ import annotations

import math

import pytest
import torch

from backend.config import EmbeddingConfig, RerankerConfig
from backend.errors import ConfigurationError, DeviceError, NonFiniteOutputError
from backend.providers import token_budget
from backend.providers.batching import BatchProcessor
from backend.providers.device import (
    CudaProbe,
    DeviceSpec,
    apply_memory_limit,
    check_attention,
    ensure_finite,
    kernels_support,
    model_memory_bytes,
    non_finite_rows,
    plan_batch_tokens,
    resolve_device_spec,
    verify_loaded_model,
)

CU126_ARCHS = ("sm_50", "sm_60", "sm_61", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90")
CU128_ARCHS = ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120")


def probe(capability: tuple[int, int] = (6, 1), name: str = "NVIDIA GeForce GTX 1080 Ti", count: int = 1,
          archs: tuple[str, ...] = CU126_ARCHS, cuda: str | None = "12.6") -> CudaProbe:
    return CudaProbe(
        available=cuda is not None and count > 0, device_count=count, torch_cuda_version=cuda, arch_list=archs,
        capabilities=(capability,) * count, names=(name,) * count,
    )


def embedding(**kw: object) -> EmbeddingConfig:
    return EmbeddingConfig(_env_file=None, **kw)


# --- device ---------------------------------------------------------------------------------------------------
def test_cpu_is_always_accepted_with_float32_by_default() -> None:
    spec = resolve_device_spec(embedding(device="cpu"), probe(cuda=None, count=0, archs=()))
    assert (spec.device, spec.dtype, spec.attn_implementation, spec.is_cuda) == ("cpu", torch.float32, "sdpa", False)
    assert resolve_device_spec(embedding(device="cpu", dtype="float16"), probe()).dtype == torch.float16


def test_cuda_on_a_cpu_only_torch_is_refused_with_the_install_command() -> None:
    with pytest.raises(DeviceError) as info:
        resolve_device_spec(embedding(device="cuda:0"), probe(cuda=None, count=0, archs=()))
    message = str(info.value)
    assert "EMBEDDING_DEVICE=cuda:0" in message and "CPU-only" in message and "EMBEDDING_DEVICE=cpu" in message
    assert "https://download.pytorch.org/whl/cu126" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks this machine's real CPU-only torch")
def test_real_probe_on_this_machine_refuses_cuda() -> None:
    with pytest.raises(DeviceError, match="EMBEDDING_DEVICE=cuda:0"):
        resolve_device_spec(embedding(device="cuda:0"))


def test_cuda_build_without_a_visible_gpu_is_refused() -> None:
    with pytest.raises(DeviceError, match="sees none.*CUDA_VISIBLE_DEVICES"):
        resolve_device_spec(embedding(device="cuda:0"), probe(count=0))


def test_missing_gpu_index_is_refused_listing_the_visible_ones() -> None:
    with pytest.raises(DeviceError) as info:
        resolve_device_spec(embedding(device="cuda:3"), probe(count=2))
    assert "EMBEDDING_DEVICE=cuda:3 does not exist: 2 GPU(s) visible" in str(info.value)
    assert "cuda:1 (NVIDIA GeForce GTX 1080 Ti)" in str(info.value)


# --- kernels ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("capability", "archs", "ok"),
    [
        ((6, 1), CU126_ARCHS, True),
        ((6, 1), ("sm_60", "sm_70"), True),  # an sm_60 cubin runs on 6.1
        ((6, 1), CU128_ARCHS, False),  # the seed's "no kernel image is available" trap
        ((6, 1), ("sm_70", "compute_60"), True),  # PTX is JIT-compiled upwards
        ((9, 0), ("sm_80", "compute_80"), True),
        ((7, 0), ("sm_75", "sm_80"), False),
    ],
)
def test_kernels_support(capability: tuple[int, int], archs: tuple[str, ...], ok: bool) -> None:
    assert kernels_support(capability, archs) is ok


def test_missing_kernels_are_refused_with_the_exact_pip_command() -> None:
    with pytest.raises(DeviceError) as info:
        resolve_device_spec(embedding(device="cuda:0"), probe(archs=CU128_ARCHS))
    message = str(info.value)
    assert "compute capability 6.1, sm_61" in message and "no kernel image is available" in message
    assert "pip install torch --index-url https://download.pytorch.org/whl/cu126" in message
    assert "https://download.pytorch.org/whl/cu118" in message and "EMBEDDING_DEVICE=cpu" in message


# --- dtype and attention ------------------------------------------------------------------------------------
def test_pascal_gets_float16_by_default_and_bfloat16_is_refused() -> None:
    spec = resolve_device_spec(embedding(device="cuda:0"), probe())
    assert (spec.dtype_name, spec.capability, spec.gpu_name) == ("float16", (6, 1), "NVIDIA GeForce GTX 1080 Ti")
    with pytest.raises(DeviceError) as info:
        resolve_device_spec(embedding(device="cuda:0", dtype="bfloat16"), probe())
    assert "EMBEDDING_DTYPE=bfloat16 needs compute capability 8.0" in str(info.value)
    assert "has 6.1" in str(info.value) and "Set EMBEDDING_DTYPE=float16" in str(info.value)


def test_refusals_name_the_settings_of_their_own_prefix() -> None:
    with pytest.raises(DeviceError, match="RERANKER_DTYPE=bfloat16"):
        resolve_device_spec(RerankerConfig(_env_file=None, device="cuda:0", dtype="bfloat16"), probe())


def test_ampere_accepts_bfloat16() -> None:
    spec = resolve_device_spec(embedding(device="cuda:0", dtype="bfloat16"), probe((8, 0), "A100", archs=CU128_ARCHS))
    assert spec.dtype == torch.bfloat16


def test_flash_attention_is_refused_below_8_0_on_cpu_and_without_the_package() -> None:
    with pytest.raises(DeviceError) as info:
        resolve_device_spec(embedding(device="cuda:0", attn_implementation="flash_attention_2"), probe())
    assert "flash_attention_2 needs compute capability 8.0" in str(info.value)
    assert "Set EMBEDDING_ATTN_IMPLEMENTATION=sdpa" in str(info.value)
    with pytest.raises(DeviceError, match="needs a CUDA GPU"):
        check_attention("flash_attention_2", "cpu", None, prefix="EMBEDDING_")
    with pytest.raises(DeviceError, match="pip install flash-attn"):
        check_attention("flash_attention_2", "cuda:0", (8, 6), prefix="EMBEDDING_", flash_attn_installed=False)
    assert check_attention("flash_attention_2", "cuda:0", (8, 6), prefix="X_", flash_attn_installed=True)
    assert check_attention("eager", "cuda:0", (6, 1), prefix="X_") == "eager"


# --- after loading --------------------------------------------------------------------------------------------
class _Tiny(torch.nn.Module):
    def __init__(self, attn: str = "sdpa") -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.config = type("Cfg", (), {"_attn_implementation": attn})()


def test_verify_loaded_model_checks_dtype_device_and_attention() -> None:
    spec = DeviceSpec("cpu", "float32", "sdpa")
    verify_loaded_model(_Tiny(), spec, prefix="EMBEDDING_")
    with pytest.raises(DeviceError, match=r"not torch.float16 \(EMBEDDING_DTYPE\)"):
        verify_loaded_model(_Tiny(), DeviceSpec("cpu", "float16", "sdpa"), prefix="EMBEDDING_")
    with pytest.raises(DeviceError, match=r"attention is eager, not sdpa \(EMBEDDING_ATTN_IMPLEMENTATION\)"):
        verify_loaded_model(_Tiny("eager"), spec, prefix="EMBEDDING_")
    with pytest.raises(DeviceError, match=r"not cuda:0 \(EMBEDDING_DEVICE\)"):
        verify_loaded_model(_Tiny(), DeviceSpec("cuda:0", "float32", "sdpa"), prefix="EMBEDDING_")


def test_model_memory_counts_parameters_and_buffers() -> None:
    model = _Tiny()
    assert model_memory_bytes(model) == (4 * 3 + 3) * 4
    model.register_buffer("extra", torch.zeros(10, dtype=torch.float16))
    assert model_memory_bytes(model) == (4 * 3 + 3) * 4 + 20


def test_non_finite_output_raises_a_typed_error_naming_model_dtype_and_remedy() -> None:
    values = torch.tensor([[0.1, 0.2], [math.nan, 0.0], [0.3, math.inf]])
    assert non_finite_rows(values) == [1, 2]
    with pytest.raises(NonFiniteOutputError) as info:
        ensure_finite(values, model_name="Qwen/Qwen3-Embedding-8B", dtype="float16", prefix="EMBEDDING_")
    message = str(info.value)
    assert "Qwen/Qwen3-Embedding-8B" in message and "float16" in message and "2 input(s)" in message
    assert "EMBEDDING_DTYPE=float32" in message and info.value.status_code == 500
    ensure_finite(values[:1], model_name="m", dtype="float16", prefix="EMBEDDING_")


# --- token budget -------------------------------------------------------------------------------------------
class _NoopRunner:
    def collate(self, payloads: list[int]) -> list[int]:
        return payloads

    def forward(self, batch: list[int]) -> list[int]:
        return batch


def _processor() -> BatchProcessor[int, int]:
    return BatchProcessor(_NoopRunner(), name="budget", max_batch_tokens=1, max_batch_size=8,
                          max_queue_items=10, max_queue_tokens=10)


async def test_cpu_auto_budget_is_the_documented_default() -> None:
    proc = _processor()
    plan = await plan_batch_tokens(proc, DeviceSpec("cpu", "float32", "sdpa"), embedding(max_batch_size=256),
                                   max_length=512, probe_forward=lambda r, t: None)
    assert (plan.tokens, plan.source, proc.max_batch_tokens) == (32768, "auto (cpu default)", 32768)
    plan = await plan_batch_tokens(proc, DeviceSpec("cpu", "float32", "sdpa"), embedding(max_batch_size=4),
                                   max_length=512, probe_forward=lambda r, t: None)
    assert plan.tokens == 4 * 512  # never more than the batcher can cut
    await proc.close()


async def test_explicit_budget_below_max_length_names_both_settings() -> None:
    proc = _processor()
    with pytest.raises(ConfigurationError) as info:
        await plan_batch_tokens(proc, DeviceSpec("cpu", "float32", "sdpa"), embedding(max_batch_tokens=1000),
                                max_length=8192, probe_forward=lambda r, t: None)
    assert "EMBEDDING_MAX_BATCH_TOKENS=1000" in str(info.value) and "EMBEDDING_MAX_LENGTH=8192" in str(info.value)
    await proc.close()


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """A simulated GPU: 8 MB free, 1 KiB per token, OOM beyond 5000 tokens. Returns the forwards run."""
    shapes: list[tuple[int, int]] = []
    monkeypatch.setattr(token_budget, "measure_activation_cost", lambda probe, device, max_length: (1024.0, 0))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8_000_000, 16_000_000))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: 1.0)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    return shapes


def test_free_memory_respects_the_per_process_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPU_MEMORY_LIMIT_GIB (a per-process memory fraction) bounds what the auto budget may plan with."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8_000_000, 16_000_000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 1_000_000)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: 1.0)
    assert token_budget.free_device_bytes(torch.device("cuda:0")) == 8_000_000  # no cap: the card's free memory
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: 0.25)
    assert token_budget.free_device_bytes(torch.device("cuda:0")) == 3_000_000  # 16e6 x 0.25 - 1e6 reserved


def test_memory_limit_is_applied_and_one_above_the_card_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    fractions: list[float] = []
    props = type("Props", (), {"total_memory": 11 * 2**30})()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, device=None: fractions.append(f))
    spec = DeviceSpec("cuda:0", "float16", "sdpa", (6, 1), "GTX 1080 Ti")
    apply_memory_limit(spec, 5.5, prefix="RERANKER_")
    assert fractions == [0.5]
    with pytest.raises(DeviceError, match=r"RERANKER_GPU_MEMORY_LIMIT_GIB=12.0 exceeds the 11.0 GiB of cuda:0"):
        apply_memory_limit(spec, 12.0, prefix="RERANKER_")
    apply_memory_limit(DeviceSpec("cpu", "float32", "sdpa"), 5.5, prefix="RERANKER_")  # no cap on the CPU
    assert fractions == [0.5]


def _oom_probe(shapes: list[tuple[int, int]]):  # noqa: ANN202
    def probe_forward(rows: int, tokens: int) -> None:
        shapes.append((rows, tokens))
        if rows * tokens > 5000:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    return probe_forward


async def test_explicit_budget_that_runs_out_of_memory_names_the_setting_and_the_size_that_fits(
    fake_gpu: list[tuple[int, int]],
) -> None:
    proc = _processor()
    spec = DeviceSpec("cuda:0", "float16", "sdpa", (6, 1), "GTX 1080 Ti")
    with pytest.raises(ConfigurationError) as info:
        await plan_batch_tokens(proc, spec, embedding(device="cuda:0", max_batch_tokens=16384, max_batch_size=256),
                                max_length=512, probe_forward=_oom_probe(fake_gpu))
    message = str(info.value)
    assert "EMBEDDING_MAX_BATCH_TOKENS=16384 does not fit on cuda:0" in message
    assert "set EMBEDDING_MAX_BATCH_TOKENS=6208" in message  # 8e6 x 0.8 / 1024 = 6250 -> multiple of 64
    assert fake_gpu[0] == (32, 512)  # the warm-up is the worst shape: rows of MAX_LENGTH tokens
    await proc.close()


async def test_auto_budget_is_sized_to_free_memory_and_proven_by_the_warm_up(
    fake_gpu: list[tuple[int, int]],
) -> None:
    proc = _processor()
    spec = DeviceSpec("cuda:0", "float16", "sdpa", (6, 1), "GTX 1080 Ti")
    plan = await plan_batch_tokens(proc, spec, embedding(device="cuda:0", max_batch_size=256), max_length=512,
                                   probe_forward=_oom_probe(fake_gpu))
    # 6208 tokens measured to fit; the warm-ups filling 6208 (13 x 477) and 5568 (11 x 506) ran out of memory
    # (simulated); 4992 passed both proofs: rows as long as MAX_LENGTH allows, and many short rows.
    assert (plan.tokens, plan.source, proc.max_batch_tokens) == (4992, "auto (measured)", 4992)
    assert fake_gpu == [(13, 477), (11, 506), (10, 499), (39, 128)]
    await proc.close()


def test_activation_cost_is_the_most_any_shape_paid_including_a_max_length_row(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Long rows cost more per token (the mask grows with the row): a row of MAX_LENGTH is always measured."""
    peak = [0]
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: peak[0])
    shapes: list[tuple[int, int]] = []

    def probe(rows: int, tokens: int) -> None:
        shapes.append((rows, tokens))
        peak[0] = rows * tokens * 1000 + rows * tokens * tokens * 2  # linear part + a mask of tokens^2 per row

    per_token, fixed = token_budget.measure_activation_cost(probe, torch.device("cuda:0"), 4096)
    assert sorted(shapes) == [(1, 512), (1, 4096), (4, 512)]
    assert (per_token, fixed) == (1000 + 2 * 4096, 0)


async def test_auto_budget_below_one_max_length_input_is_refused(fake_gpu: list[tuple[int, int]]) -> None:
    proc = _processor()
    spec = DeviceSpec("cuda:0", "float16", "sdpa", (6, 1), "GTX 1080 Ti")
    with pytest.raises(ConfigurationError, match="less than one input of EMBEDDING_MAX_LENGTH=8192"):
        await plan_batch_tokens(proc, spec, embedding(device="cuda:0"), max_length=8192,
                                probe_forward=_oom_probe(fake_gpu))
    await proc.close()
