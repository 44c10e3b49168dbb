# The README's two Quickstart commands: `make demo` and `make test`.
# Each creates .venv with pip when it is missing (torch is constrained to the build
# this machine carries on disk; pyproject itself only sets lower bounds).
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint format clean

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

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache .ruff_cache .hypothesis
