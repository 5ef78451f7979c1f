#!/usr/bin/env bash
# Install PyTorch into the given Python's environment without pulling CUDA wheels onto CPU machines.
# TORCH_VARIANT chooses the build:
#   auto (default, `make setup`):
#     - torch already importable (e.g. a GPU user's own build): keep it.
#     - an NVIDIA driver is present: the default (CUDA) build from PyPI.
#     - otherwise the CPU build (below).
#   cpu: the CPU build: a locally cached wheel if pip's find-links has one, else the PyTorch CPU
#        index; then its pure-Python dependencies from the normal index.
#   cu<major><minor> (cu126, cu128, cu130, ...): the build for that CUDA version from the PyTorch
#        index of that name (infra/Dockerfile passes its TORCH_CUDA build argument), then its
#        dependencies (the nvidia-* runtime wheels it pins) from the normal index. Pick a CUDA
#        version the nodes' driver supports (nvidia-smi shows the newest it runs).
set -euo pipefail
PY=${1:-python}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_VARIANT=${TORCH_VARIANT:-auto}
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-$TORCH_INDEX/cpu}

from_index() {  # torch alone from a PyTorch index, then its dependencies from the normal one
  "$PY" -m pip install --no-deps "torch==$TORCH_VERSION" --index-url "$1"
  "$PY" -m pip install "torch==$TORCH_VERSION"  # torch is satisfied now: this adds only its dependencies
}

install_cpu() {
  echo "install_torch: installing the CPU build of torch==$TORCH_VERSION"
  if "$PY" -m pip install --no-index --no-deps "torch==$TORCH_VERSION" 2>/dev/null; then
    "$PY" -m pip install "torch==$TORCH_VERSION"
  else
    from_index "$TORCH_CPU_INDEX"
  fi
}

case "$TORCH_VARIANT" in
  auto)
    if "$PY" -c "import torch" 2>/dev/null; then
      echo "install_torch: keeping installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      echo "install_torch: GPU found, installing torch==$TORCH_VERSION (CUDA build)"
      "$PY" -m pip install "torch==$TORCH_VERSION"
    else
      install_cpu
    fi ;;
  cpu) install_cpu ;;
  cu[0-9][0-9]*)
    echo "install_torch: installing torch==$TORCH_VERSION for CUDA ${TORCH_VARIANT#cu} from $TORCH_INDEX/$TORCH_VARIANT"
    from_index "$TORCH_INDEX/$TORCH_VARIANT" ;;
  *)
    echo "install_torch: TORCH_VARIANT must be auto, cpu or cu<major><minor> (e.g. cu128), got '$TORCH_VARIANT'" >&2
    exit 2 ;;
esac
