# Set-up commands (see README): `make serve` serves the bundle under $(OUT), training a quick one on
# MovieLens-100K first only when none exists; `make test` installs what the tests need and runs them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -c constraints.txt
OUT ?= artifacts
PORT ?= 8000
SERVE := RECSYS_BUNDLE_DIR=$(OUT) $(BIN)/uvicorn service.app:app --host 0.0.0.0 --port $(PORT) --http service.protocol:HeadDeadline

.PHONY: install install-eval install-dev test train evaluate serve run bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(PIP) -e .

install-eval: $(BIN)/python
	$(PIP) -e '.[eval]'

install-dev: $(BIN)/python
	$(PIP) -e '.[dev]'

# Two test processes (pytest-xdist): on two cores the suite takes about 13 minutes instead of 20, since most
# tests wait on servers they start. Every test picks free ports and its own directories.
test: install-dev
	$(BIN)/python -m pytest -q -n 2

# Always trains a new bundle version (and points $(OUT)/current at it).
train: install-eval
	$(BIN)/python -m offline train --out $(OUT)

evaluate: install-eval
	$(BIN)/python -m offline evaluate --out reports

# The first bundle: trained only when $(OUT) has none, so `make serve` never retrains an existing one, and with the
# quick profile (serving within minutes; `make train` builds the full model).
$(OUT)/current:  # (only `serve` asks for it, after its own install)
	$(BIN)/python -m offline train --out $(OUT) --quick

# Serve $(OUT)'s current bundle, training one first if there is none.
serve: install | $(OUT)/current
	$(SERVE)

# Serve $(OUT)'s current bundle; never trains (fails if there is none).
run: install
	@test -f $(OUT)/current || { echo "no bundle under $(OUT): run 'make train' first (or 'make serve')" >&2; exit 1; }
	$(SERVE)

clean:
	rm -rf $(VENV) reports runs
