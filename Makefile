# Quick start:  make demo   (set up + generate with the bundled model)
#               make test   (set up + lint + tests)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PROMPT ?= What is the capital of France?
SAMPLER ?= fastdllm
MODEL ?= smollm2-nbdiff

.PHONY: demo test lint setup setup-dev serve demo-model delta-model bench llama-cpp clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned first: 2.13.0 is the CPU wheel; an unpinned torch would pull a CUDA build.
$(VENV)/.setup: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[ref]"
	$(BIN)/python -m blockdiff.native  # compile the C++ decode step once (falls back if it cannot)
	touch $@

$(VENV)/.setup-dev: pyproject.toml $(VENV)/.setup
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.setup
setup-dev: $(VENV)/.setup-dev

demo: setup
	$(BIN)/blockdiff generate "$(PROMPT)" --model $(MODEL) --sampler $(SAMPLER) --max-new-tokens 64

# The OpenAI-compatible server and the live page on http://127.0.0.1:8000/ (Ctrl-C stops it).
serve: setup
	$(BIN)/pip install -q -e ".[serve]"
	$(BIN)/blockdiff serve --model $(MODEL) --sampler $(SAMPLER)

lint: setup-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

test: setup-dev lint
	$(BIN)/python -m pytest -q

# Rebuild the bundled Shakespeare model from its recipe (~77 min on 2 CPU cores, see its model card).
demo-model: setup
	$(BIN)/blockdiff train recipes/demo.yaml --out runs/demo
	$(BIN)/blockdiff export runs/demo src/blockdiff/assets/demo --dtype bfloat16 --force

# Rebuild the shipped SmolLM2 NBDiff delta: self-distilled data (~50 min), the LoRA adaptation
# (~60 min), export (see src/blockdiff/assets/smollm2-nbdiff/README.md).
delta-model: setup
	$(BIN)/pip install -q -e ".[eval]"
	$(BIN)/blockdiff data distill --out runs/distill/smollm2-chat.jsonl --max-new-tokens 192 --seq-len 288
	$(BIN)/blockdiff train recipes/nbdiff-smollm2-lora.yaml --out runs/nbdiff-lora
	$(BIN)/blockdiff export runs/nbdiff-lora src/blockdiff/assets/smollm2-nbdiff --dtype bfloat16 --force

bench: setup
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/decode.py

# llama.cpp as a speed baseline (benchmarks/speed.py): built from source by pip (several minutes),
# AVX2 + AVX-512 kernels without -march=native (a native build died of an illegal instruction here).
LLAMA_FLAGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
llama-cpp: setup
	CMAKE_ARGS="$(LLAMA_FLAGS)" $(BIN)/pip install -q --no-cache-dir llama-cpp-python==0.3.36

clean:
	rm -rf $(VENV) runs
