# Quick start:  make demo   (set up + generate with the bundled model)
#               make test   (set up + lint + tests)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PROMPT ?= ROMEO.
SAMPLER ?= structural

.PHONY: demo test lint setup setup-dev demo-model bench llama-cpp clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned first: 2.13.0 is the CPU wheel; an unpinned torch would pull a CUDA build.
$(VENV)/.setup: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.setup-dev: pyproject.toml $(VENV)/.setup
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.setup
setup-dev: $(VENV)/.setup-dev

demo: setup
	$(BIN)/blockdiff generate "$(PROMPT)" --sampler $(SAMPLER) --max-new-tokens 128

lint: setup-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

test: setup-dev lint
	$(BIN)/python -m pytest -q

# Rebuild the bundled model from its recipe (~45 min on 2 CPU cores).
demo-model: setup
	$(BIN)/blockdiff train recipes/demo.yaml --out runs/demo
	$(BIN)/blockdiff export runs/demo src/blockdiff/assets/demo --dtype bfloat16

bench: setup
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/decode.py

# llama.cpp as a speed baseline (benchmarks/speed.py): built from source by pip (several minutes).
llama-cpp: setup
	$(BIN)/pip install -q llama-cpp-python==0.3.36

clean:
	rm -rf $(VENV) runs
