# Two commands do all the set-up on a fresh machine (see README):
#   make train    set up, then train with the chapter's defaults and print samples
#   make test     set up, then lint, type-check, check the import layers and run every test
#
# TORCH pins the CPU wheel that CI machines carry; on a GPU machine use
# `make TORCH=torch ...` (any release the project's range admits).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
ARGS ?=
BIN := $(VENV)/bin

.PHONY: setup train test lint
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

train: setup
	$(BIN)/python -m jobs.train $(ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint
	$(BIN)/pytest $(ARGS)
