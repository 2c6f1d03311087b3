#!/usr/bin/env bash
# Compiles every CUDA source with nvcc for sm_80 and sm_90 and prints the register/spill report.
# The .cu files include no torch headers, so this needs only nvcc, not a CUDA build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
shopt -s nullglob globstar
sources=(csrc/**/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
  echo "check_cuda: no .cu files"
  exit 0
fi
command -v nvcc >/dev/null || { echo "check_cuda: nvcc not found but there are .cu files" >&2; exit 1; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for source in "${sources[@]}"; do
  echo "check_cuda: $source"
  # The half-type flags are those torch's build adds: they disable implicit conversions.
  if ! nvcc -std=c++17 -O3 -Icsrc -c "$source" -o "$out/$(basename "$source").o" \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
      -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr \
      -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
      -Xptxas -v -Werror all-warnings >"$out/log" 2>&1; then
    cat "$out/log" >&2
    echo "check_cuda: $source failed to compile" >&2
    exit 1
  fi
  grep -E "Compiling entry|registers|spill" "$out/log" || true
done
echo "check_cuda: ${#sources[@]} file(s) compiled for sm_80 and sm_90"
