"""Start a separate Milvus Lite server process on 127.0.0.1 for the "same code, over http" tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def milvus_lite_server(data_dir: Path, *, startup_timeout: float = 60.0) -> Iterator[str]:
    """`milvus-lite server --host 127.0.0.1 --port <free> --data-dir <data_dir>`; yields its http:// URI."""
    executable = shutil.which("milvus-lite", path=str(Path(sys.executable).parent)) or shutil.which("milvus-lite")
    if executable is None:
        raise RuntimeError("the milvus-lite command is not installed (pip install milvus-lite)")
    port = free_port()
    log = open(data_dir.parent / f"milvus-lite-{port}.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [executable, "server", "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir)],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ},
    )
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"milvus-lite server exited with {process.returncode}: see {log.name}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"milvus-lite server did not listen on 127.0.0.1:{port} in {startup_timeout} s")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
