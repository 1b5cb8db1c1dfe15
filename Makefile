# One-command set-up: `make bench` (the main job) and `make test` (the tests) each create the
# virtual environment, install torch==2.13.0 (CPU build) and the test tools, and build the C++
# extension in place, then run. Re-running only rebuilds what changed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP_DEPS := $(VENV)/.deps
STAMP_BUILD := $(VENV)/.built
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)

.PHONY: bench test gpu-compile-check cuda-compile-check clean

bench: $(STAMP_BUILD)
	$(BIN)/softprompt-kernels bench

test: $(STAMP_BUILD)
	$(BIN)/python -m pytest -q

# Triton kernels compiled for sm_90 and sm_80 without a GPU (spills, shared memory, wgmma).
gpu-compile-check: $(STAMP_BUILD)
	env -u TRITON_INTERPRET TRITON_DEFAULT_FP_FUSION=1 $(BIN)/python -m softprompt_kernels.triton.compile_check

# CUDA sources compiled with the machine's nvcc for sm_80 and sm_90 (compile only).
cuda-compile-check:
	bash .ci/nvcc_compile_check.sh

$(STAMP_DEPS): requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $@

$(STAMP_BUILD): $(STAMP_DEPS) setup.py pyproject.toml $(CSRC)
	$(BIN)/python -m pip install -q --no-build-isolation -e .
	touch $@

clean:
	rm -rf build *.egg-info softprompt_kernels/_C*.so $(VENV)
