#!/usr/bin/env bash
# Proves Drip's CUDA path in one call, on a machine with an NVIDIA GPU:
#
#   1. every test marked `gpu`: mixed-precision training and its resume, inference on CUDA against
#      the CPU (tests/test_gpu.py), training in the container with --gpus all (tests/test_docker.py,
#      which needs a Docker engine with the NVIDIA Container Toolkit), and DDP on NCCL once the
#      distributed-training work adds it (its place is at the end of tests/test_gpu.py);
#   2. the GPU benchmarks: bench/train_throughput.py and bench/inference.py with --device cuda.
#
#   scripts/gpu_checks.sh              # full benchmarks (a few minutes on one GPU)
#   scripts/gpu_checks.sh --quick      # the benchmarks' quick mode
#
# Figures go to gpu-checks/ (JSON, one file per benchmark) and to the terminal. Where nvidia-smi
# lists a GPU, a GPU test that cannot use it fails (DRIP_REQUIRE_GPU=1) instead of skipping.
# Without a GPU the tests skip with the reason, the benchmarks are left out, and it exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
QUICK=()
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK=(--quick) ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "gpu_checks.sh: unknown argument $arg (--quick or --help)" >&2; exit 2 ;;
    esac
done
if [ ! -x "$PY" ]; then
    echo "gpu_checks.sh: $PY not found; run scripts/setup.sh first (or set PYTHON)" >&2
    exit 2
fi

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    export DRIP_REQUIRE_GPU=${DRIP_REQUIRE_GPU:-1}
    nvidia-smi -L
fi
cuda=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))')

echo "== GPU tests (pytest -m gpu)"
"$PY" -m pytest -m gpu -rs -q tests/

if [ "$cuda" != 1 ]; then
    echo "== GPU benchmarks: left out, PyTorch sees no CUDA GPU here"
    exit 0
fi
out=gpu-checks
mkdir -p "$out"
echo "== bench/train_throughput.py --device cuda"
"$PY" bench/train_throughput.py --device cuda "${QUICK[@]}" --json "$out/train_throughput.json"
echo "== bench/inference.py --device cuda"
"$PY" bench/inference.py --device cuda "${QUICK[@]}" --json "$out/inference.json"
echo "== done: figures in $out/"
