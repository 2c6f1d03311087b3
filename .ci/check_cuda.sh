#!/usr/bin/env bash
# Compiles every CUDA source with nvcc for sm_80 and sm_90 twice: as plain nvcc does (no flags
# beyond the standard, as a CMake or standalone build would), and with the flags torch's build
# adds (half-type conversions disabled, relaxed constexpr). Prints the register/spill report of
# the torch-flag build and fails if a float32 kernel spills. The .cu files include no torch
# headers, so this needs only nvcc, not a CUDA build of torch.
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
archs=(-gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90)
torch_flags=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
             -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
             --expt-relaxed-constexpr)
for source in "${sources[@]}"; do
  name=$(basename "$source")
  echo "check_cuda: $source"
  # The two builds run side by side (each is one nvcc process).
  nvcc -std=c++17 -O3 -Icsrc -c "$source" -o "$out/$name.plain.o" "${archs[@]}" \
    -Werror all-warnings >"$out/$name.plain.log" 2>&1 &
  plain=$!
  nvcc -std=c++17 -O3 -Icsrc -c "$source" -o "$out/$name.o" "${archs[@]}" "${torch_flags[@]}" \
    -Xptxas -v -Werror all-warnings >"$out/$name.log" 2>&1 &
  torch=$!
  failed=0
  wait "$plain" || { cat "$out/$name.plain.log" >&2; echo "check_cuda: $source fails to compile with plain nvcc" >&2; failed=1; }
  wait "$torch" || { cat "$out/$name.log" >&2; echo "check_cuda: $source fails to compile with torch's flags" >&2; failed=1; }
  [ "$failed" -eq 0 ] || exit 1
  python3 .ci/ptxas_report.py --fail-on-spills <"$out/$name.log" ||
    { echo "check_cuda: a float32 kernel of $source spills registers" >&2; exit 1; }
done
echo "check_cuda: ${#sources[@]} file(s) compiled for sm_80 and sm_90, with plain nvcc and with torch's flags"
