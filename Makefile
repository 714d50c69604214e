# Two commands set up a fresh machine:  `make run`  (the backend's main job on the embedded default)
#                                       `make test` (lint + the whole test suite; what CI runs)
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: help setup run serve test lint
help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' Makefile | sed 's/:.*## /\t/'

$(VENV)/.installed: requirements-backend.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and alone: the CPU build on this machine. For a Pascal GPU see the README.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed  ## create .venv with torch (CPU) and the pinned requirements

run: setup  ## start the backend on the embedded default, ingest the sample corpus, query it, print results
	$(PY) scripts/run_demo.py

serve: setup  ## start the backend (reads .env.backend)
	scripts/start_backend.sh

lint: setup  ## ruff
	$(VENV)/bin/ruff check .

test: setup  ## ruff + the whole test suite (CPU; GPU tests skip with a reason)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q
