#!/usr/bin/env bash
# Start the backend: uvicorn backend.main:app on BACKEND_HOST:BACKEND_PORT (from the environment or the env file,
# .env.backend unless BACKEND_ENV_FILE names another). Extra arguments go to uvicorn (e.g. --log-level debug).
# One worker process on purpose: the models live in the process (one copy per GPU); more workers would load
# every model again and fight over the same GPU memory. Concurrency comes from asyncio and the batch queues.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3

# Reading the settings here also validates all of them: a bad value stops the start with its variable named.
read -r HOST PORT < <("$PY" -c 'from backend.config import Settings; b = Settings.load().backend; print(b.host, b.port)')

exec "$PY" -m uvicorn backend.main:app --host "$HOST" --port "$PORT" --workers 1 "$@"
