# Quickstart targets: `make demo` and `make test` work on a fresh machine (Python >= 3.10).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml setup.py $(wildcard src/fastpipe/_native/*.pyx)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/fastpipe demo

test: install lint
	$(BIN)/python -m pytest
	FASTPIPE_BENCH_SMALL=1 $(BIN)/python -m pytest benches --benchmark-disable -q

bench: install
	$(BIN)/python -m pytest benches --benchmark-only --benchmark-columns=min,median,max

lint: install
	$(BIN)/ruff check src tests benches
	$(BIN)/mypy

clean:
	rm -rf build src/*.egg-info src/fastpipe/_native/*.so src/fastpipe/_native/*.c
