#!/usr/bin/env bash
# One call on a lent GPU machine (see docs/DESIGN.md section 6): build, GPU tests (opcheck included),
# benchmarks. Suites: gpu, gpu-quick (prefix attention, Triton), prefill-gpu and decode-gpu (CUDA kernels
# beside Triton and torch, with their goals of docs/DESIGN.md section 7 printed), insertion-gpu, peft-gpu, fsdp-gpu,
# serve-gpu. For a first run of the CUDA kernels (about 6 minutes): decode-gpu prefill-gpu insertion-gpu
# Writes env.txt, build.log, gpu_tests.log, the suite's JSON/PNG and bench.log under $OUT and
# prints a short summary table last. Usage (from the repo root):
#   OUT=/tmp/out SOFTPROMPT_COMMIT=<sha> bash benchmarks/device_check.sh [suite ...]   (default: gpu)
# (the machine gets the working tree without .git: SOFTPROMPT_COMMIT names the commit measured)
set -uo pipefail
OUT=${OUT:-$(pwd)/device-out}
SUITES=("${@:-gpu}")
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export TRITON_DEFAULT_FP_FUSION=1 PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
  python3 -c "import transformers, peft; print('transformers', transformers.__version__, 'peft', peft.__version__)" 2>&1 | tail -1
  echo "commit ${SOFTPROMPT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
} 2>&1 | tee "$OUT/env.txt"

start=$(date +%s)
if ! python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  echo "BUILD FAILED"
  exit 1
fi
echo "build: $(( $(date +%s) - start )) s"
python3 -c "import softprompt_kernels as sk; print('backends:', sk.backend_status())" 2>&1 | tee -a "$OUT/env.txt"

GPU_TESTS=${GPU_TESTS:-tests/test_triton_gpu.py tests/test_cuda_gpu.py tests/test_prompt_insertion_gpu.py tests/test_opcheck.py}
# shellcheck disable=SC2086
timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -m gpu $GPU_TESTS 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
echo "tests done at $(( $(date +%s) - start )) s"

for suite in "${SUITES[@]}"; do
  timeout "${BENCH_TIMEOUT:-300}" python3 -m softprompt_kernels.bench --suite "$suite" --out "$OUT" 2>&1 | tee -a "$OUT/bench.log" | tail -40
done
echo "all done at $(( $(date +%s) - start )) s"
