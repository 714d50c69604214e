"""The verification and benchmark scripts: --help, their pure helpers, and a CPU smoke run of each.

Smoke runs call each script's `cli(argv)` in this process (one torch import for all) against tiny random-weight
geometries on the CPU, and check the JSON report they write: exit status, tables and checks. They measure nothing
(speed claims come only from GPU runs: docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

SCRIPT_NAMES = ["verify_pascal", "download_local_models", "verify_model_loading", "benchmark_local_embedding",
                "benchmark_end_to_end_rag", "benchmark_mixed_load"]


def run(script: str, argv: list[str], tmp_path: Path) -> tuple[int, dict[str, Any]]:
    """Run scripts/<script>.py in-process with --output; (exit status, the JSON report)."""
    import importlib

    module = importlib.import_module(script)
    output = tmp_path / f"{script}.json"
    code = module.cli([*argv, "--output", str(output)])
    return code, json.loads(output.read_text())


def failed(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in report["checks"] if not c["ok"]]


@pytest.mark.parametrize("script", SCRIPT_NAMES)
def test_help_is_instant_and_describes_the_script(script: str) -> None:
    result = subprocess.run([sys.executable, str(SCRIPTS / f"{script}.py"), "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:")
    assert "--output" in result.stdout and "Example" in result.stdout


def test_pure_helpers() -> None:
    import _common
    import verify_pascal

    assert verify_pascal.has_kernels(["sm_60", "sm_70"], (6, 1))
    assert not verify_pascal.has_kernels(["sm_75", "sm_80", "sm_90"], (6, 1))
    assert verify_pascal.has_kernels(["sm_80", "compute_60"], (6, 1))  # PTX JIT-compiles for newer GPUs
    assert verify_pascal.install_command("2.13.0+cu130", (6, 1)).endswith("torch==2.13.0 --index-url "
                                                                           "https://download.pytorch.org/whl/cu126")
    assert _common.percentiles([5.0, 1.0, 3.0, 2.0, 4.0])["p50"] == 3.0
    table = _common.format_table("t", [{"a": 1.23456, "b": None}, {"a": 1234.5, "c": True}])
    assert "a" in table and "1.23" in table and "1,234" in table and "yes" in table


def test_random_geometries_and_exact_token_lengths(tmp_path: Path) -> None:
    import _random_weights as rw

    assert rw.parameter_count("qwen3-embedding-4b")["body"] == 3_633_315_840  # gpu-baseline.md: 3.634 B
    assert rw.parameter_count("gme-qwen2-vl-2b")["layers"] == 28
    folder = rw.build_model_dir("tiny-qwen3-embedding", tmp_path / "emb", dtype="float32")
    config = json.loads((folder / "config.json").read_text())
    assert config["hidden_size"] == 64 and config["torch_dtype"] == "float32"
    assert (folder / "modules.json").exists() and (folder / "1_Pooling" / "config.json").exists()
    maker = rw.TextMaker(rw.load_tokenizer(folder), seed=1)
    lengths = [5, 64, 333]
    assert [maker.count(maker.text(n)) for n in lengths] == lengths
    with pytest.raises(ValueError, match="unknown geometry"):
        rw.geometry("qwen3-embedding-5b")


def test_seed_batcher_groups_requests_and_keeps_order() -> None:
    import numpy as np
    from _seed_baseline import SeedBatcher

    class Model:
        calls: list[int] = []

        def encode(self, texts: list[str], **_: Any) -> np.ndarray:
            self.calls.append(len(texts))
            return np.asarray([[float(t)] for t in texts], dtype=np.float32)

    async def scenario() -> list[np.ndarray]:
        batcher = SeedBatcher(Model(), max_wait_s=0.05)
        await batcher.start()
        out = await asyncio.gather(*(batcher.embed([str(i), str(i + 100)]) for i in range(10)))
        await batcher.close()
        return out

    results = asyncio.run(scenario())
    assert [r[:, 0].tolist() for r in results] == [[i, i + 100] for i in range(10)]
    assert Model.calls == [20]  # ten requests arriving together: one encode call


def test_verify_pascal_without_gpu_exits_1_with_the_install_command(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the answer on a machine without a usable GPU")
    code, report = run("verify_pascal", [], tmp_path)
    assert code == 1 and not report["ok"]
    assert "pip install" in failed(report)[0]["fix"] and "cu126" in failed(report)[0]["fix"]


def test_download_offline_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, report = run("download_local_models", ["--model", "Qwen/Qwen3-Embedding-0.6B", "--skip-load"], tmp_path)
    assert code == 1
    assert "HF_HUB_OFFLINE" in failed(report)[0]["fix"]


def test_download_random_weights_loads_and_infers(tmp_path: Path) -> None:
    code, report = run("download_local_models", ["--random-weights", "tiny-qwen3-reranker", "--device", "cpu",
                                                  "--local-dir", str(tmp_path / "rr")], tmp_path)
    assert code == 0, failed(report)
    assert report["tables"]["loaded"][0]["kind"] == "reranker"
    assert (tmp_path / "rr" / "model.safetensors").exists()


def test_verify_model_loading_on_all_three_tiny_geometries(tmp_path: Path) -> None:
    argv = ["--device", "cpu"]
    for geometry in ("tiny-qwen3-embedding", "tiny-qwen3-reranker", "tiny-gme"):
        argv += ["--random-weights", geometry]
    code, report = run("verify_model_loading", argv, tmp_path)
    assert code == 0, failed(report)
    assert {m["kind"] for m in report["tables"]["models"]} == {"embedding", "reranker", "multimodal"}
    agreement = report["tables"]["agreement"]
    assert {a["kind"] for a in agreement} == {"embedding", "reranker", "multimodal"}
    assert all(a["ok"] for a in agreement)
    assert any("batch = alone" in c["check"] for c in report["checks"])


def test_benchmark_embedding_quick_runs_seed_and_ours(tmp_path: Path) -> None:
    code, report = run("benchmark_local_embedding", ["--random-weights", "tiny-qwen3-embedding", "--device", "cpu",
                                                      "--quick"], tmp_path)
    assert code == 0, failed(report)
    tables = report["tables"]
    bulk = {r["workload"]: r for r in tables["bulk: one call"]}
    assert bulk["docs"]["ours texts/s"] > 0 and bulk["docs"]["ST encode(32) texts/s"] > 0
    loop = next(v for k, v in tables.items() if k.startswith("closed loop"))
    assert {r["clients"] for r in loop} == {1, 4} and all(r["errors"] == 0 for r in loop)
    assert tables["idle single query"][0]["ours p50 ms"] > 0
    long = next(v for k, v in tables.items() if k.startswith("long documents"))
    assert [r["design"] for r in long] == ["seed (whole GPU)", "ours"] and all(r["errors"] == 0 for r in long)
    # Targets are informational off the GPU geometry they were set for.
    assert report["info"]["targets_not_enforced"]


@pytest.mark.parametrize("geometry", ["tiny-qwen3-reranker", "tiny-gme"])
def test_benchmark_reranker_and_multimodal_quick(geometry: str, tmp_path: Path) -> None:
    code, report = run("benchmark_local_embedding", ["--random-weights", geometry, "--device", "cpu", "--quick"],
                       tmp_path)
    assert code == 0, failed(report)
    if geometry == "tiny-gme":
        rows = report["tables"]["multimodal (GME) throughput and latency"]
        assert {r["input"] for r in rows} >= {"images 640x480", "fused text+image"}
    else:
        rows = next(v for k, v in report["tables"].items() if k.startswith("rerank:"))
        assert [r["path"] for r in rows][:2] == ["baseline: full head, all positions (model card)",
                                                 "baseline: full head, last position only"]
        assert all(r["p50 ms"] > 0 for r in rows)


def test_benchmark_end_to_end_rag_in_process(tmp_path: Path) -> None:
    code, report = run("benchmark_end_to_end_rag", [
        "--random-weights", "tiny-qwen3-embedding", "--reranker-random-weights", "tiny-qwen3-reranker",
        "--device", "cpu", "--documents", "8", "--doc-tokens", "100,300", "--clients", "2", "--duration", "0.5",
        "--warmup", "0.1", "--in-process"], tmp_path)
    assert code == 0, failed(report)
    assert report["tables"]["ingest"][0]["chunks"] >= 8
    assert report["tables"]["providers (/api/health)"][1]["enabled"] is True  # the reranker


def test_benchmark_mixed_load_in_process(tmp_path: Path) -> None:
    code, report = run("benchmark_mixed_load", ["--tiny", "--devices", "cpu,cpu,cpu", "--clients", "2",
                                                 "--duration", "0.5", "--warmup", "0.1", "--in-process"], tmp_path)
    assert code == 0, failed(report)
    rows = report["tables"]["throughput: alone vs mixed (closed loop, HTTP)"]
    assert {r["model"] for r in rows} == {"embedding", "reranker", "multimodal"}
    assert all(r["mixed items/s"] > 0 and r["alone items/s"] > 0 for r in rows)
    assert report["info"]["not_checked"]  # one device for all: the 0.9x target is not judged
