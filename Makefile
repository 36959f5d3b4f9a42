# The two commands of the README: `make demo` and `make test`. Each installs first (idempotent).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-all bench clean

setup: $(STAMP)

# Re-install only when the project's dependencies change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/cvforge demo

test: setup
	$(PY) -m pytest

# Everything, the slow end-to-end tests included.
test-all: setup
	$(PY) -m pytest -m ''

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
