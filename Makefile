# The front door. `make run` runs the whole app; `make test` runs every test.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
# MNIST files for `make model` (downloaded there when missing); e.g. make model MNIST_DIR=../shared/data/mnist
MNIST_DIR ?= .data/mnist
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help install run test lint serve stop model bench system-deps clean

help:
	@echo "make run    - the whole app in the foreground (embedded PostgreSQL + TorchServe + UI on http://127.0.0.1:8500)"
	@echo "make test   - every test (installs what the tests need first)"
	@echo "make serve  - TorchServe in the background (returns once the model is READY); make stop stops it"
	@echo "make model  - retrain from scratch and rebuild model_store/mnist.mar"
	@echo "make bench  - the benchmarks under bench/"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip >/dev/null
	$(BIN)/pip install -q -e '.[model,local,dev]'
	@touch $@

install: $(STAMP)

system-deps:
	@bash scripts/system-deps.sh

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install system-deps lint
	$(BIN)/pytest

run: install
	$(BIN)/python -m ui

serve: install
	$(BIN)/python -m serving start

stop:
	@if [ -x $(BIN)/python ]; then $(BIN)/python -m serving stop; fi

model: install
	$(BIN)/python -m training.train --data-dir $(MNIST_DIR)
	$(BIN)/python -m training.export

bench: install
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
