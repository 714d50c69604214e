#!/usr/bin/env python3
"""Check that this machine's NVIDIA GPUs can run the local models (name kept from the plan: any GPU is checked).

For each GPU: name, memory, compute capability; whether the installed torch build has kernels for it (with the
exact install command when it has not); an fp16 matrix product checked against float64; which scaled-dot-product
attention backends run (and agree with the math backend); bf16 and FlashAttention reported unsupported below
compute capability 8.0; allocation and release of device memory.

Example:
    python scripts/verify_pascal.py --output verify_pascal.json
Exit status 0 when every GPU passes, 1 otherwise (the fix is printed).
"""

from __future__ import annotations

import sys
from typing import Any

from _common import Report, ScriptFailure, base_parser, run_script

# Wheels that still carry sm_60/sm_61 kernels (Pascal): the CUDA 12.6 builds. Newer CUDA builds dropped Pascal.
PASCAL_INDEX = "https://download.pytorch.org/whl/cu126"
DEFAULT_INDEX = "https://download.pytorch.org/whl/cu128"
SDPA_SHAPE = (2, 8, 256, 64)  # batch, heads, sequence, head_dim


def install_command(torch_version: str, capability: tuple[int, int]) -> str:
    """The pip command that installs this torch version with kernels for a GPU of `capability`."""
    version = torch_version.split("+")[0]
    index = PASCAL_INDEX if capability < (7, 0) else DEFAULT_INDEX
    return f"pip install --force-reinstall torch=={version} --index-url {index}"


def has_kernels(arch_list: list[str], capability: tuple[int, int]) -> bool:
    """True when the build has machine code for this major version at or below the minor, or PTX at or below."""
    major, minor = capability
    for arch in arch_list:
        kind, _, digits = arch.partition("_")
        if not digits.isdigit():
            continue
        a_major, a_minor = int(digits[:-1]), int(digits[-1])
        if kind == "sm" and a_major == major and a_minor <= minor:
            return True
        if kind == "compute" and (a_major, a_minor) <= capability:
            return True
    return False


def check_matmul(torch: Any, device: str) -> float:
    """Relative error of an fp16 GEMM on `device` against float64 on the CPU."""
    a = torch.randn(512, 512, dtype=torch.float16)
    b = torch.randn(512, 512, dtype=torch.float16)
    ref = a.double() @ b.double()
    out = (a.to(device) @ b.to(device)).double().cpu()
    return float((out - ref).norm() / ref.norm())


def check_sdpa(torch: Any, device: str) -> list[dict[str, Any]]:
    """Run fp16 SDPA with each backend alone; error against the float32 math result."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(*SDPA_SHAPE, device=device, dtype=torch.float16) for _ in range(3))
    with sdpa_kernel([SDPBackend.MATH]):
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    rows = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH):
        row: dict[str, Any] = {"backend": backend.name.lower(), "runs": False, "rel_error": None, "note": ""}
        try:
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            torch.cuda.synchronize(device)
            row["rel_error"] = float((out.float() - ref).norm() / ref.norm())
            row["runs"] = row["rel_error"] < 1e-2
        except RuntimeError as exc:  # "No available kernel" when the backend does not support this GPU
            row["note"] = str(exc).splitlines()[0][:90]
        rows.append(row)
    return rows


def check_memory(torch: Any, device: str, mib: int = 256) -> dict[str, Any]:
    """Allocate `mib` MiB, check the allocator and the driver see it, free it, check it is returned."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    free_before, _ = torch.cuda.mem_get_info(device)
    block = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    block.fill_(1)
    torch.cuda.synchronize(device)
    grown = torch.cuda.memory_allocated(device) - base
    free_during, _ = torch.cuda.mem_get_info(device)
    del block
    torch.cuda.empty_cache()
    released = torch.cuda.memory_allocated(device) - base
    free_after, _ = torch.cuda.mem_get_info(device)
    return {"allocated_mib": grown / 2**20, "driver_saw_mib": (free_before - free_during) / 2**20,
            "left_after_free_mib": released / 2**20, "returned_to_driver_mib": (free_after - free_during) / 2**20}


def main(args: Any, report: Report) -> None:
    try:
        import torch
    except ImportError as exc:
        raise ScriptFailure(f"torch is not installed ({exc})",
                            f"pip install torch --index-url {PASCAL_INDEX}  (cu126 keeps Pascal kernels)") from exc
    arch_list = torch.cuda.get_arch_list() if torch.version.cuda else []
    report.info.update(torch=torch.__version__, cuda_build=torch.version.cuda,
                       cudnn=torch.backends.cudnn.version() if torch.version.cuda else None, arch_list=arch_list)
    report.table("torch", [{"torch": torch.__version__, "cuda build": torch.version.cuda or "none (CPU build)",
                            "cudnn": report.info["cudnn"], "architectures": " ".join(arch_list) or "-"}])
    if torch.version.cuda is None:
        raise ScriptFailure("the installed torch is a CPU-only build: it cannot use any GPU",
                            install_command(torch.__version__, (6, 1)) + "  (cu126 wheels run on Pascal and newer)")
    if not torch.cuda.is_available():
        raise ScriptFailure("torch has CUDA support but sees no GPU (no driver, or CUDA_VISIBLE_DEVICES hides it)",
                            "run nvidia-smi; install the NVIDIA driver (>= 560 for CUDA 12.6 wheels) and unset or "
                            "correct CUDA_VISIBLE_DEVICES")
    indices = range(torch.cuda.device_count()) if args.gpu is None else [args.gpu]
    gpus, sdpa_rows = [], []
    for index in indices:
        device = f"cuda:{index}"
        props = torch.cuda.get_device_properties(index)
        capability = (props.major, props.minor)
        kernels = has_kernels(arch_list, capability)
        new_enough = capability >= (8, 0)
        flash_pkg = _flash_attn_installed()
        gpus.append({"device": device, "name": props.name, "memory_gib": props.total_memory / 2**30,
                     "capability": f"{props.major}.{props.minor}", "kernels": kernels,
                     "fp16": "yes", "bf16": "yes" if new_enough else "unsupported (< 8.0)",
                     "flash_attention_2": ("yes" if flash_pkg else "needs flash-attn package") if new_enough
                     else "unsupported (< 8.0)"})
        if not report.check(f"{device} kernels", kernels,
                            f"{props.name} is sm_{props.major}{props.minor}; build has {' '.join(arch_list)}",
                            install_command(torch.__version__, capability)):
            continue  # nothing else can run on this GPU
        err = check_matmul(torch, device)
        report.check(f"{device} fp16 matmul", err < 5e-3, f"relative error {err:.2e} vs float64 (limit 5e-3)",
                     "the GPU or driver computes wrong results: update the driver, check the card")
        rows = check_sdpa(torch, device)
        for row in rows:
            sdpa_rows.append({"device": device, **row})
        usable = [r["backend"] for r in rows if r["runs"] and r["backend"] in ("efficient_attention", "math")]
        report.check(f"{device} sdpa", bool(usable), "backends that run: " + ", ".join(
            r["backend"] for r in rows if r["runs"]), "torch's SDPA does not run here: reinstall torch ("
            + install_command(torch.__version__, capability) + ") or use EMBEDDING_ATTN_IMPLEMENTATION=eager")
        memory = check_memory(torch, device)
        gpus[-1].update({k: round(v, 1) for k, v in memory.items()})
        report.check(f"{device} memory", memory["allocated_mib"] >= 255 and memory["left_after_free_mib"] < 1,
                     f"allocated {memory['allocated_mib']:.0f} MiB, {memory['left_after_free_mib']:.0f} MiB left "
                     f"after release", "another process may hold the GPU: check nvidia-smi")
    report.table("GPUs", gpus)
    report.table("scaled-dot-product attention (fp16, causal)", sdpa_rows)


def _flash_attn_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def build_parser() -> Any:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--gpu", type=int, help="check only this GPU index (default: every visible GPU)")
    return parser


def cli(argv: list[str] | None = None) -> int:
    return run_script("verify_pascal", main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())
