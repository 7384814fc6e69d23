# The front door. `make run` runs the whole app; `make test` runs every test.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
# MNIST files for `make model` (downloaded there when missing); e.g. make model MNIST_DIR=../shared/data/mnist
MNIST_DIR ?= .data/mnist
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The hashed lock of the whole development environment (requirements/README.md); `make lock` writes it.
LOCK := requirements/dev.txt
# uv reads no pip configuration: it finds the CPU build of torch where pip does (PIP_FIND_LINKS, a folder
# or a page of links, e.g. make lock TORCH_FIND_LINKS=https://download.pytorch.org/whl/cpu/torch/).
TORCH_FIND_LINKS ?= $(PIP_FIND_LINKS)
# e.g. make lock LOCK_FLAGS=--upgrade (or --upgrade-package NAME)
LOCK_FLAGS ?=
UV_COMPILE = $(BIN)/uv pip compile --quiet --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock" $(LOCK_FLAGS)
# pyproject's [build-system] requires: the locks carry the build backend for `--no-build-isolation`.
BUILD_REQUIRES = $(BIN)/python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")'

.PHONY: help install lock run test lint typecheck serve stop model bench system-deps clean

help:
	@echo "make run    - the whole app in the foreground (embedded PostgreSQL + TorchServe + UI on http://127.0.0.1:8500)"
	@echo "make test   - every test (installs what the tests need first)"
	@echo "make typecheck - mypy on the code and the tests"
	@echo "make lock   - recompile the hashed locks under requirements/ from pyproject.toml"
	@echo "make serve  - TorchServe in the background (returns once the model is READY); make stop stops it"
	@echo "make model  - retrain from scratch and rebuild model_store/mnist.mar"
	@echo "make bench  - the benchmarks under bench/"

# Exactly the locked, hash-checked versions (pip too), then the project itself, editable, without deps.
$(STAMP): pyproject.toml $(LOCK)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --require-hashes -r $(LOCK)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	@touch $@

install: $(STAMP)

# dev.txt: every extra plus pip and the build backend; the images' locks are cut from it (-c), so they
# run the versions the tests ran. A lock without the CPU torch would pull CUDA (gigabytes): refused.
lock: $(STAMP)
	{ $(BUILD_REQUIRES); echo pip; } | $(UV_COMPILE) pyproject.toml - --all-extras \
		$(addprefix --find-links ,$(TORCH_FIND_LINKS)) -o $(LOCK)
	@grep -q '^torch==[0-9.]*+cpu ' $(LOCK) || { echo "$(LOCK): no CPU torch found; set TORCH_FIND_LINKS" >&2; exit 1; }
	$(BUILD_REQUIRES) | $(UV_COMPILE) pyproject.toml - -c $(LOCK) -o requirements/ui.txt
	$(UV_COMPILE) requirements/torchserve.in -c $(LOCK) \
		$(addprefix --find-links ,$(TORCH_FIND_LINKS)) -o requirements/torchserve.txt
	$(UV_COMPILE) requirements/trainer.in -c $(LOCK) \
		$(addprefix --find-links ,$(TORCH_FIND_LINKS)) -o requirements/trainer.txt

system-deps:
	@bash scripts/system-deps.sh

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

test: install system-deps lint typecheck
	$(BIN)/pytest

run: install
	$(BIN)/python -m stack

serve: install
	$(BIN)/python -m serving start

stop:
	@if [ -x $(BIN)/python ]; then $(BIN)/python -m serving stop; fi

model: install
	$(BIN)/python -m training.train --data-dir $(MNIST_DIR)
	$(BIN)/python -m training.calibrate --data-dir $(MNIST_DIR)
	$(BIN)/python -m training.digitness --data-dir $(MNIST_DIR)
	$(BIN)/python -m training.handwritten
	$(BIN)/python -m training.export

bench: install
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
