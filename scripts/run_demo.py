"""The README's "run" command (`make run`): the backend's main job, end to end, on the embedded default.

Starts the real backend (uvicorn on 127.0.0.1, a free port) on the embedded default: CPU, the packaged
all-MiniLM-L6-v2, Milvus Lite in a temporary folder (or --data-dir). Then, through the HTTP API, it ingests the
sample corpus shipped in data_samples/, runs the questions, prints the ranked results and the retrieval accuracy
over the corpus' known question -> passage pairs, stops the server and exits 0 (1 with the reason on failure).

    python scripts/run_demo.py                       # the embedded default, nothing to configure
    python scripts/run_demo.py --question "Who built the Eiffel Tower?" --top-k 5
    python scripts/run_demo.py --use-env             # your .env.backend / environment instead of the default
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python scripts/run_demo.py` imports the backend package
    sys.path.insert(0, str(REPO_ROOT))

SAMPLES = REPO_ROOT / "data_samples"
SHOWN_QUESTIONS = 3


def load_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def sample_documents() -> list[dict[str, Any]]:
    """The sample corpus as /api/documents items (title + text, source in the metadata)."""
    return [{"doc_id": row["doc_id"], "text": f"{row['title']}\n\n{row['text']}",
             "metadata": {"title": row["title"], "source": row["source"]}}
            for row in load_jsonl(SAMPLES / "corpus.jsonl")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class BackgroundServer:
    """uvicorn serving the app in a thread of this process; `url` once started."""

    def __init__(self, app: Any, port: int) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the backend failed to start (its error is logged above)")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def print_results(question: str, body: dict[str, Any]) -> None:
    print(f"\nQ: {question}")
    for rank, context in enumerate(body["contexts"], start=1):
        title = context["metadata"].get("title", context["doc_id"])
        snippet = context["text"].split("\n\n", 1)[-1][:90]
        print(f"  {rank}. {context['score']:.3f}  {title:<32} {snippet}...")
    if body.get("answer"):
        print(f"  answer: {body['answer']}")


def run(args: argparse.Namespace) -> int:
    import httpx

    from backend.config import Settings
    from backend.main import create_app

    data_dir = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="rag-demo-"))
    if args.use_env:
        settings = Settings.load()
    else:  # the embedded default whatever .env.backend says; only the data folder is chosen here
        settings = Settings.load(env_file=os.devnull, backend={"data_dir": data_dir})
    print(f"backend: {settings.embedding.provider.value} {settings.embedding.model_name} on "
          f"{settings.embedding.device}; Milvus at {settings.milvus_uri}")
    documents = sample_documents()
    questions = load_jsonl(SAMPLES / "questions.jsonl")
    started = time.perf_counter()
    with BackgroundServer(create_app(settings), free_port()) as server, \
            httpx.Client(base_url=server.url, timeout=120) as client:
        print(f"started {server.url} in {time.perf_counter() - started:.1f} s")
        response = client.post("/api/documents", json={"documents": documents})
        response.raise_for_status()
        chunks = sum(item["chunks"] for item in response.json()["documents"])
        print(f"ingested {len(documents)} documents ({chunks} chunks) into {response.json()['collection']}")
        asked = [{"question": args.question, "doc_id": None}] if args.question else questions[:SHOWN_QUESTIONS]
        for item in asked:
            response = client.post("/api/query", json={"question": item["question"], "top_k": args.top_k})
            response.raise_for_status()
            print_results(item["question"], response.json())
        top1 = top5 = 0
        for item in questions:
            response = client.post("/api/query", json={"question": item["question"], "top_k": 5, "answer": False})
            response.raise_for_status()
            found = [context["doc_id"] for context in response.json()["contexts"]]
            top1 += found[:1] == [item["doc_id"]]
            top5 += item["doc_id"] in found
    print(f"\nretrieval over {len(questions)} known question -> passage pairs: "
          f"top-1 {top1}/{len(questions)} ({top1 / len(questions):.0%}), "
          f"top-5 {top5}/{len(questions)} ({top5 / len(questions):.0%})")
    print(f"done in {time.perf_counter() - started:.1f} s; data in {data_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--question", help="ask this instead of the first sample questions")
    parser.add_argument("--top-k", type=int, default=3, help="contexts to show per question (default 3)")
    parser.add_argument("--data-dir", help="keep Milvus Lite here (default: a new temporary folder)")
    parser.add_argument("--use-env", action="store_true", help="use .env.backend / the environment, not the default")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the default model ships in a package: never reach a hub
    try:
        return run(args)
    except Exception as exc:  # the demo's one exit path for failures: say what broke, exit 1
        print(f"run_demo failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
