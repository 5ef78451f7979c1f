#!/usr/bin/env bash
# Install PyTorch into the given Python's environment without pulling CUDA wheels onto CPU machines.
#   - torch already importable (e.g. a GPU user's own build): keep it.
#   - an NVIDIA driver is present: the default (CUDA) build from PyPI.
#   - otherwise the CPU build: a locally cached wheel if pip's find-links has one, else the
#     PyTorch CPU index; then its pure-Python dependencies from the normal index.
set -euo pipefail
PY=${1:-python}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

if "$PY" -c "import torch" 2>/dev/null; then
  echo "install_torch: keeping installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
  exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "install_torch: GPU found, installing torch==$TORCH_VERSION (CUDA build)"
  "$PY" -m pip install "torch==$TORCH_VERSION"
  exit 0
fi
echo "install_torch: no GPU, installing the CPU build of torch==$TORCH_VERSION"
if ! "$PY" -m pip install --no-index --no-deps "torch==$TORCH_VERSION" 2>/dev/null; then
  "$PY" -m pip install --no-deps "torch==$TORCH_VERSION" --index-url "$TORCH_CPU_INDEX"
fi
"$PY" -m pip install "torch==$TORCH_VERSION"  # torch is satisfied now: this adds only its dependencies
