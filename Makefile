# The README's two Quickstart commands: `make demo` and `make test`.
# Each creates .venv with pip when it is missing (torch is constrained to the build
# this machine carries on disk; pyproject itself only sets lower bounds).
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-wheel lint format clean gpu-check

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	WANDB_MODE=offline $(VENV)/bin/lightning-noise demo

test: $(STAMP)
	WANDB_MODE=offline $(VENV)/bin/pytest

test-slow: $(STAMP)
	WANDB_MODE=offline $(VENV)/bin/pytest -m slow

# Build the wheel, install it into a fresh virtual environment and run a recipe from an
# empty folder (tests/test_wheel.py; offline, about a minute).
test-wheel: $(STAMP)
	WANDB_MODE=offline $(VENV)/bin/pytest -m wheel tests/test_wheel.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# On a machine with one NVIDIA GPU: build .venv (step 1 of the script), run the kernel tests
# compiled on CUDA and the kernel and overhead benchmarks, and write every figure to one file
# (benchmarks/RESULTS.md, "GPU check"). GPU_CHECK_ARGS="--out DIR" or "--dry-run-cpu".
gpu-check:
	bash benchmarks/gpu_check.sh $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache .ruff_cache .hypothesis
