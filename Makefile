# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# torch==2.13.0 is installed first, on its own: it is a local CPU wheel here, and any looser
# requirement resolved before it would pull gigabytes of CUDA packages.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,executorch,onnx]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m fxcompress demo

test: $(STAMP)
	$(BIN)/ruff check fxcompress passes hardware_profiles tests benchmarks
	$(BIN)/python -m pytest -q -x --durations=15

bench: $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/demo_bench.py
	$(BIN)/python benchmarks/compare.py

lint: $(STAMP)
	$(BIN)/ruff check fxcompress passes hardware_profiles tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
