#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler (nvcc, ptxas, headers) from NVIDIA's PyPI
# wheels into a project-local directory (default .cuda/, or $FERROVIT_CUDA_DIR), where
# build.rs finds it. No GPU and no system CUDA needed; idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${FERROVIT_CUDA_DIR:-.cuda}"
nvcc="$dir/nvidia/cu13/bin/nvcc"
if [ -x "$nvcc" ] && "$nvcc" --version | grep -q "release 13.0"; then
    echo "CUDA 13.0 compiler already in $dir"
    exit 0
fi
python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$dir" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 \
    nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
"$nvcc" --version | tail -2
touch kernels/*.cu # the next cargo build compiles the kernels
echo "installed: $nvcc"
