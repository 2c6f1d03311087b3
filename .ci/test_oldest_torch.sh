#!/usr/bin/env bash
# Runs the test suite on the oldest PyTorch lstm_fused supports (pyproject.toml: torch>=2.4), in a
# virtual environment of its own, against a copy of the working tree (the current torch's build
# stays where it is). PyPI's Linux wheels of torch 2.4 are CUDA builds (about 3 GB with their CUDA
# libraries); the extension is built CPU-only (LSTM_FUSED_CUDA=0), as the machine's nvcc is not
# that torch's CUDA. The environment is kept under ~/.cache, and pip's cache keeps the wheels, so
# a later run on the same machine downloads nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
oldest_torch=2.4.1
venv=${LSTM_FUSED_OLDEST_TORCH_VENV:-$HOME/.cache/lstm_fused/venv-torch-$oldest_torch}
start=$(date +%s)
if [ ! -x "$venv/bin/python" ]; then
  python -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet "torch==$oldest_torch" numpy setuptools wheel ninja \
  pytest hypothesis
echo "oldest torch: $("$venv/bin/python" -c 'import torch; print(torch.__version__)') installed in $(( $(date +%s) - start )) s"
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
# Tracked and untracked files, not ignored ones (no build of the current torch).
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$tree"
cd "$tree"
export LSTM_FUSED_CUDA=0 TORCH_EXTENSIONS_DIR="$tree/.torch_extensions"
"$venv/bin/python" -m pip install --quiet --no-build-isolation --no-deps -e .
echo "oldest torch: extension built after $(( $(date +%s) - start )) s"
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests
echo "oldest torch: finished in $(( $(date +%s) - start )) s"
