# ctxscale: one-command setup, main job and tests.
#   make run    set up .venv and train the default model (context parallel, 2 CPU processes)
#   make test   set up .venv and run the test suite
# On a GPU cluster the same targets work: TORCH_SPEC picks the PyPI build (CUDA on Linux x86-64).
# Set VENV=/path/to/existing/env PYTHON_BIN=... to reuse an environment that already has torch.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,hf,deepspeed,mpi,corpora
NPROC ?= 2
CONFIG ?= configs/tiny.yaml
ARGS ?=
RUN_ARGS ?= parallel.cp=2 parallel.cp_layout=zigzag
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ctxscale-installed

.PHONY: setup run test lint sysdeps bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@touch $(STAMP)

run: setup
	$(VENV)/bin/torchrun --standalone --nproc-per-node $(NPROC) -m ctxscale.launch.train --config $(CONFIG) $(RUN_ARGS) $(ARGS)

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(ARGS)

lint: setup
	$(PY) -m ruff check .

# System packages for the MPI and Slurm tests (Debian/Ubuntu, as root). Optional: without them
# those tests are skipped with the reason printed.
sysdeps:
	bash .ci/sysdeps.sh

bench: setup
	$(PY) benchmarks/train_step.py

clean:
	rm -rf $(VENV) build *.egg-info
