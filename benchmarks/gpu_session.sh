#!/usr/bin/env bash
# Everything a lent GPU is for, in one batched command (see the device tool's README):
#   1. the Triton tests for real: CUDA tensors, TRITON_INTERPRET unset;
#   2. the GPU benchmark (eager, torch.compile, Liger-Kernel when importable, kdfast).
# Usage, from the repository root on the GPU machine:
#   bash benchmarks/gpu_session.sh [OUT_DIR] [extra bench_losses.py arguments...]
# Liger-Kernel is not on the GPU image: carry its wheel (pip download --no-deps
# liger-kernel) in .whl/ and install it into /tmp/site first, as the device README shows.
# The C++ extension is not built here (it is not what a GPU session measures):
# the CPU tests skip, the reference runs in pure PyTorch.
set -uo pipefail
export PYTHONUNBUFFERED=1 KDFAST_DISABLE_EXTENSION=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
out="${1:-benchmarks/results}"
shift || true
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton, kdfast; print('torch', torch.__version__, 'triton', triton.__version__, kdfast.available_backends())"

python3 -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning \
    tests/test_backend_matrix.py tests/test_edge_cases.py tests/test_determinism.py tests/test_compile.py \
    tests/test_properties.py tests/test_errors.py tests/test_correlation_losses.py -k "triton" 2>&1 \
    | tee "$out/triton-tests.txt" | tail -20

gpu="$(python3 -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "-"))')"
python3 benchmarks/bench_losses.py --device cuda --divergences kl jsd tvd --runs 10 \
    --out "$out/$gpu-$(date +%F).json" "$@" 2>&1 | tee "$out/bench.txt"
python3 benchmarks/bench_losses.py --device cuda --divergences dist dkd --shapes 4096x32000 8192x1000 --runs 10 \
    --out "$out/$gpu-$(date +%F)-dist-dkd.json" 2>&1 | tee "$out/bench-dist-dkd.txt"
