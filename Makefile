# Every target creates .venv if it is missing and installs requirements.txt into it first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed

.PHONY: help venv test test-slow test-all lint format demo bench clean

help:
	@echo "make demo       run the continual-learning demo on synthetic data (CPU, ~10 min)"
	@echo "make test       fast test suite (CPU)"
	@echo "make test-slow  end-to-end tests (run.py, torchrun on gloo, resume)"
	@echo "make lint       ruff check"
	@echo "make bench      benchmarks in smoke mode"

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	@touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not gpu"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m "slow and not gpu"

test-all: $(STAMP)
	$(PY) -m pytest -q -m "not gpu"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .

demo: $(STAMP)
	$(PY) scripts/demo.py

bench: $(STAMP)
	$(PY) benchmarks/bench_train.py --smoke
	$(PY) benchmarks/bench_eval.py --smoke
	$(PY) benchmarks/bench_data.py --smoke
	$(PY) benchmarks/bench_memory.py --smoke
	$(PY) benchmarks/bench_pointcloud.py --smoke

clean:
	rm -rf $(VENV) .pytest_cache
