# Two entry points, each self-contained on a fresh machine:
#   make demo   trace a zoo ResNet, show its groups, prune 50% by magnitude, measure, save
#   make test   lint and run the test suite (it builds the API reference too: mkdocs build --strict)
#   make docs   build the documentation site, API reference included, into site/
# torch==2.13.0 (a CPU wheel) is installed before anything else, and everything else is
# installed against constraints.txt, which pins it, so pip never pulls a CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

.PHONY: demo test lint bench docs
demo: $(STAMP)
	$(BIN)/python -m graphprune demo

lint: $(STAMP)
	$(BIN)/ruff check graphprune tests benchmarks

test: $(STAMP) lint
	$(BIN)/python -m pytest -q -x --timeout=600 graphprune tests

docs: $(STAMP)
	$(BIN)/mkdocs build --strict -d site
