# Every target creates .venv if it is missing and installs requirements.txt into it first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed

.PHONY: help venv test test-slow test-all lint format demo bench gpu-check gpu-check-smoke clean

help:
	@echo "make demo       run the continual-learning demo on synthetic data (CPU, ~10 min)"
	@echo "make test       fast test suite (CPU)"
	@echo "make test-slow  end-to-end tests (run.py, torchrun on gloo, resume)"
	@echo "make lint       ruff check and ruff format --check (make format fixes the layout)"
	@echo "make bench      benchmarks in smoke mode"
	@echo "make gpu-check  prove a GPU install: CUDA tests, figures, a torchrun job (~8 min, GPU)"
	@echo "                report in results/gpu_check/; extra options: GPU_CHECK_ARGS=\"--budget 600\""
	@echo "make gpu-check-smoke  the same sequence at toy sizes on any machine, CPU included"

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
	$(VENV)/bin/ruff format --check .

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

# One command that proves a GPU install (benchmarks/gpu_check.py; README, "Checking a GPU machine").
GPU_CHECK_ARGS ?=
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py --out results/gpu_check $(GPU_CHECK_ARGS)

# CI runs the smoke through `make test-slow` (tests/test_gpu_check.py).
gpu-check-smoke: $(STAMP)
	$(PY) benchmarks/gpu_check.py --smoke --out results/gpu_check_smoke $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
