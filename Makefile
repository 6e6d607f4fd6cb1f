# Everything a fresh machine needs, from nothing but Python 3.11.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= conf/aggregator.toml

.PHONY: run test lint check-config clean

# The stamp files make the install step re-run whenever pyproject.toml changes.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/aggregator run -c $(CONFIG)

test: $(VENV)/.installed-test
	$(BIN)/ruff check aggregator tests benchmarks
	$(BIN)/mypy aggregator benchmarks
	$(BIN)/python -m pytest

lint: $(VENV)/.installed-test
	$(BIN)/ruff check aggregator tests benchmarks
	$(BIN)/mypy aggregator benchmarks

check-config: $(VENV)/.installed
	$(BIN)/aggregator check -c $(CONFIG)

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
