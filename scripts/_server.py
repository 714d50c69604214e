"""A running backend for the HTTP benchmarks: an existing URL, a uvicorn process we start, or the app in-process.

- `--url`: talk to a backend someone else started.
- default: start `uvicorn backend.main:app` in a child process with the given environment, wait for
  /api/health to answer 200, stop it at the end (its log is kept for the failure message).
- `--in-process`: build the same app (create_app + its lifespan, so providers, warm-up and the RAG service are the
  real ones) and send requests through httpx's ASGI transport: no socket, no second Python start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from _common import REPO_ROOT, ScriptFailure


def add_arguments(parser: Any) -> None:
    parser.add_argument("--url", help="use the backend already running at this URL (nothing is started)")
    parser.add_argument("--in-process", action="store_true",
                        help="run the app inside this process (ASGI transport) instead of a uvicorn child process")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for /api/health")
    parser.add_argument("--api-key", default=os.environ.get("BACKEND_API_KEY"), help="bearer key, if the backend "
                        "has one (default: $BACKEND_API_KEY)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _patched_environ(env: dict[str, str]) -> Any:
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.asynccontextmanager
async def backend(env: dict[str, str], args: Any, timeout: float = 600.0) -> AsyncIterator[Any]:
    """An httpx.AsyncClient pointed at a ready backend configured by `env` (ignored with --url)."""
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    if args.url:
        async with httpx.AsyncClient(base_url=args.url, timeout=timeout, headers=headers) as client:
            await _wait_ready(client, args.startup_timeout, None, None)
            yield client
        return
    if args.in_process:
        with _patched_environ(env):
            from backend.config import Settings
            from backend.main import create_app

            app = create_app(Settings.load())
            async with app.router.lifespan_context(app):
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://backend", timeout=timeout,
                                             headers=headers) as client:
                    yield client
        return
    port = _free_port()
    log = tempfile.NamedTemporaryFile(prefix="backend-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "backend.main:app", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning"],
        cwd=REPO_ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=timeout, headers=headers) as client:
            await _wait_ready(client, args.startup_timeout, proc, Path(log.name))
            yield client
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _wait_ready(client: Any, timeout: float, proc: subprocess.Popen[bytes] | None, log: Path | None) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log else ""
            raise ScriptFailure(f"the backend exited with status {proc.returncode} before it was ready:\n{tail}",
                                "fix the settings named in the log above (scripts/verify_model_loading.py checks "
                                "each model on its own)")
        try:
            response = await client.get("/api/health")
            if response.status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.5)
    raise ScriptFailure(f"the backend was not ready within {timeout:.0f} s", "raise --startup-timeout, or check the "
                        f"backend log ({log})")


def image_b64(width: int, height: int, seed: int) -> str:
    """A random PNG as base64 (what /api/embed/multimodal and /api/documents accept)."""
    import base64
    import io

    import _providers as pv

    buffer = io.BytesIO()
    pv.sample_image(width, height, seed).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def cuda_memory_by_device() -> list[dict[str, Any]]:
    """torch's allocated / peak memory per visible device (this process), and nvidia-smi's used memory."""
    rows: list[dict[str, Any]] = []
    try:
        import torch
    except ImportError:
        return rows
    if not torch.cuda.is_available():
        return rows
    smi = _nvidia_smi()
    for index in range(torch.cuda.device_count()):
        rows.append({"device": f"cuda:{index}", "allocated_gib": torch.cuda.memory_allocated(index) / 2**30,
                     "peak_gib": torch.cuda.max_memory_allocated(index) / 2**30,
                     "nvidia_smi_used_gib": smi.get(index)})
    return rows


def _nvidia_smi() -> dict[int, float]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    used = {}
    for line in out.strip().splitlines():
        index, mib = (part.strip() for part in line.split(","))
        used[int(index)] = float(mib) / 1024
    return used
