#!/usr/bin/env bash
# Compiles the torch glue of the CUDA implementation (csrc/cuda/*.cpp) as it is built with a CUDA
# build of torch, syntax only: the CPU build of torch installed here ships the c10/cuda and
# ATen/cuda headers but not the one CMake generates, which is stubbed, and nvcc's toolkit here has
# no cuBLAS/cuSPARSE/cuSOLVER headers, whose few declarations ATen's headers and the glue use are
# in .ci/cuda_library_stubs (used only where the real ones are missing). Needs torch and nvcc.
set -euo pipefail
cd "$(dirname "$0")/.."
shopt -s nullglob
sources=(csrc/cuda/*.cpp)
if [ ${#sources[@]} -eq 0 ]; then
  echo "check_cuda_glue: no CUDA glue sources"
  exit 0
fi
command -v nvcc >/dev/null || { echo "check_cuda_glue: nvcc not found" >&2; exit 1; }
cuda_include=$(nvcc --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/.*INCLUDES="-I\([^"]*\)".*/\1/p' | head -1)
[ -n "$cuda_include" ] || { echo "check_cuda_glue: cannot find nvcc's include directory" >&2; exit 1; }
includes=$(python -c "
import sysconfig
from torch.utils import cpp_extension
print(' '.join('-isystem' + p for p in cpp_extension.include_paths() + [sysconfig.get_paths()['include']]))")
stub=$(mktemp -d)
trap 'rm -rf "$stub"' EXIT
mkdir -p "$stub/c10/cuda/impl"
echo '#define C10_CUDA_BUILD_SHARED_LIBS' >"$stub/c10/cuda/impl/cuda_cmake_macros.h"
library_stubs=()
[ -f "$cuda_include/cublas_v2.h" ] || library_stubs=(-isystem "$PWD/.ci/cuda_library_stubs")
for source in "${sources[@]}"; do
  echo "check_cuda_glue: $source"
  # shellcheck disable=SC2086
  c++ -std=c++17 -fsyntax-only -Wall -Wextra -Werror -DLSTM_FUSED_WITH_CUDA $includes \
    -isystem "$stub" -isystem "$cuda_include" "${library_stubs[@]}" "$source"
done
echo "check_cuda_glue: ${#sources[@]} file(s) compile against torch's CUDA headers"
