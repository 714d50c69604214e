"""Re-embed every stored chunk with the currently configured providers into a new collection, then switch to it.

Run it after changing EMBEDDING_* (e.g. from an online 1536-d model to a local one) when the backend refuses to
start with a dimension mismatch. Stop the backend first when it uses embedded Milvus Lite (one process per
folder); with a Milvus server, pause ingestion while it runs. Settings come from .env.backend / the environment,
exactly as the backend reads them.

    python scripts/reindex.py                  # copy into <name>_v<N+1> (resumes an interrupted run), then switch
    python scripts/reindex.py --status         # which version is active, which others exist
    python scripts/reindex.py --drop rag_chunks_v1   # drop an old version once you are happy with the new one

The old collection is kept until you drop it; the switch happens only after the copy is verified (same keys,
same texts), so an interruption never leaves the backend on a half-filled collection.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python scripts/reindex.py` imports the backend package
    sys.path.insert(0, str(REPO_ROOT))


async def migrate(args: argparse.Namespace) -> int:
    from backend.config import Settings
    from backend.services import model_factory
    from backend.services.reindex import Reindexer

    settings = Settings.load()
    if args.status or args.drop:
        job = Reindexer(settings, embedding=None, progress=False)  # housekeeping needs no provider
        try:
            if args.drop:
                job.drop(args.drop)
            for line in job.status():
                print(line)
        finally:
            job.close()
        return 0
    embedding = model_factory.create_embedding_provider(settings.embedding)
    multimodal = model_factory.create_multimodal_provider(settings.multimodal)
    try:
        for provider in (embedding, multimodal):
            if provider is not None:
                await provider.warmup()
        job = Reindexer(settings, embedding, multimodal=multimodal, batch_size=args.batch_size,
                        reembed_images=args.reembed_images, drop_images=args.drop_images)
        try:
            result = await job.run()
        finally:
            job.close()
    finally:
        for provider in (multimodal, embedding):
            if provider is not None:
                await provider.close()
    print(f"done: {result.rows} chunks in {result.target} ({result.embedded} embedded by this run)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--batch-size", type=int, default=64, help="chunks embedded per step (default 64)")
    parser.add_argument("--reembed-images", action="store_true",
                        help="re-embed image vectors from image_ref even when their width is unchanged")
    parser.add_argument("--drop-images", action="store_true",
                        help="with multimodal disabled, keep image chunks as text only instead of refusing")
    parser.add_argument("--status", action="store_true", help="show the active collection and its versions")
    parser.add_argument("--drop", metavar="COLLECTION", help="drop an old version (never the active one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(migrate(args))
    except Exception as exc:  # the CLI's one exit path for failures: what broke, and exit 1
        print(f"reindex failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
