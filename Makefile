# One command sets up and runs the main job:   make study
# One command sets up and runs the tests:       make test
# Both create .venv, install torch 2.13.0 (CPU wheel) first, then lowbit.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
TORCH  ?= torch==2.13.0
OUT    ?= runs/study
STUDY_ARGS ?=

.PHONY: setup study test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

study: setup
	$(VENV)/bin/lowbit study --out $(OUT) $(STUDY_ARGS)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) benchmarks/train_speed.py
	$(PY) benchmarks/quant_overhead.py
	$(PY) benchmarks/deploy.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
