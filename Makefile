# Two set-up commands (see README): `make serve` trains on MovieLens-100K and serves;
# `make test` installs what the tests need and runs them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -c constraints.txt
OUT ?= artifacts
PORT ?= 8000

.PHONY: install install-dev test train evaluate serve bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(PIP) -e .

install-dev: $(BIN)/python
	$(PIP) -e '.[dev]'

test: install-dev
	$(BIN)/python -m pytest -q

train: install
	$(BIN)/python -m offline train --out $(OUT)

evaluate: install-dev
	$(BIN)/python -m offline evaluate --out reports

serve: train
	RECSYS_BUNDLE_DIR=$(OUT) $(BIN)/uvicorn service.app:app --host 0.0.0.0 --port $(PORT)

clean:
	rm -rf $(VENV) reports runs
