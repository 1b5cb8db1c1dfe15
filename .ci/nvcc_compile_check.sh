#!/usr/bin/env bash
# Compiles every csrc/**/*.cu for sm_80 and sm_90 with the machine's nvcc (compile only), printing
# ptxas' register / shared-memory / spill summary. Kernel sources include no torch headers.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null 2>&1; then
  echo "nvcc not found: CUDA compile check skipped"
  exit 0
fi
mapfile -t sources < <(find csrc -name '*.cu' | sort)
if [ "${#sources[@]}" -eq 0 ]; then
  echo "no CUDA sources under csrc/"
  exit 0
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for src in "${sources[@]}"; do
  for arch in 80 90; do
    echo "== $src sm_$arch"
    nvcc -std=c++17 -O3 -Icsrc -gencode "arch=compute_${arch},code=sm_${arch}" -Xptxas -v \
      -c "$src" -o "$out/$(basename "$src").sm_$arch.o" 2>&1 | grep -E "error|warning|registers|spill|Compiling" || true
    test -s "$out/$(basename "$src").sm_$arch.o" || { echo "FAILED: $src sm_$arch"; exit 1; }
  done
done
