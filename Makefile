# proxyd — developer entry points. `make run` and `make test` are all a newcomer needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test lint bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

## install: create .venv with proxyd (editable) and its test extras
install: $(STAMP)

## run: proxyd with an embedded demo MCP app and dev token issuer (no config needed)
run: $(STAMP)
	$(BIN)/proxyd dev

## test: the whole test suite
test: $(STAMP)
	$(BIN)/python -m pytest -q

## lint: ruff + mypy --strict
lint: $(STAMP)
	$(BIN)/ruff check proxyd tests bench
	$(BIN)/mypy

## bench: proxyd vs a direct connection (prints ratios, writes bench/results/latest.json)
bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
