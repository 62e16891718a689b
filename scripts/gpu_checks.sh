#!/usr/bin/env bash
# Proves Drip's CUDA path in one call, on a machine with an NVIDIA GPU, and fails where it cannot:
#
#   1. every test marked `gpu`: mixed-precision training and its resume, inference on CUDA against
#      the CPU, DDP on NCCL with one process per GPU, two processes sharing one GPU on gloo, Drip on
#      NCCL over every GPU (two or more), a DETR family (D-FINE-N, 256 px) in bf16 autocast
#      (tests/test_gpu.py), and training in the container with --gpus all (tests/test_docker.py);
#   2. the GPU benchmarks: bench/train_throughput.py and bench/inference.py with --device cuda.
#
#   scripts/gpu_checks.sh                       # tests, then the full benchmarks
#   scripts/gpu_checks.sh --quick               # the benchmarks' quick mode
#   scripts/gpu_checks.sh --wheels .gpu-wheels  # first install the wheels scripts/gpu_wheels.py made
#                                               # (a machine with no package index, e.g. the lent one)
#   PYTHON=python3 scripts/gpu_checks.sh ...    # a Python other than .venv/bin/python (python3
#                                               # where there is no .venv)
# On the lent GPU machine (one GPU, no Docker engine, no package index), with .gpu-wheels carried:
#   scripts/gpu_checks.sh --wheels .gpu-wheels --quick
#
# No test may skip (DRIP_NO_SKIPS=1: a skip fails the run). What this machine cannot run is left
# out by name, with the reason, before the tests start: the multi-GPU test where there is one
# GPU, the container test where no Docker engine answers. Without a CUDA GPU it fails at once:
# it would prove nothing. The whole run must end within --budget seconds (default 450: the lent
# machine is held for about 15 minutes in all); past it, it stops and fails, naming the step.
# Figures go to gpu-checks/ (JSON, one file per benchmark) and to the terminal.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
if [ -z "${PYTHON:-}" ] && [ ! -x "$PY" ]; then
    PY=python3  # a machine with a Python of its own (the lent GPU machine)
fi
QUICK=()
WHEELS=
BUDGET=450
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=(--quick) ;;
        --wheels) WHEELS=${2:?--wheels needs a folder}; shift ;;
        --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) echo "gpu_checks.sh: unknown argument $1 (--quick, --wheels DIR, --budget SECONDS or --help)" >&2; exit 2 ;;
    esac
    shift
done
fail() { echo "gpu_checks.sh: $*" >&2; exit 1; }
if ! command -v "$PY" >/dev/null 2>&1; then
    echo "gpu_checks.sh: $PY not found; run scripts/setup.sh first (or set PYTHON)" >&2
    exit 2
fi
started=$SECONDS
left() { echo $((BUDGET - (SECONDS - started))); }
# Runs "$@" within what is left of the budget; past it, fails naming the step.
within_budget() {
    local what=$1; shift
    local seconds; seconds=$(left)
    [ "$seconds" -gt 0 ] || fail "no time left for $what (--budget $BUDGET s spent)"
    local rc=0
    timeout --kill-after=10 "$seconds" "$@" || rc=$?
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        fail "$what ran out of the --budget of $BUDGET s"
    fi
    [ "$rc" = 0 ] || fail "$what failed (exit $rc)"
}

if [ -n "$WHEELS" ]; then
    ls "$WHEELS"/*.whl >/dev/null 2>&1 || fail "--wheels $WHEELS: no wheels there; python3 scripts/gpu_wheels.py makes them"
    site=$(mktemp -d /tmp/drip-gpu-site.XXXXXX)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$WHEELS"/*.whl \
        || fail "--wheels $WHEELS: pip could not install them into $site"
    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    echo "== wheels from $WHEELS installed into $site"
fi

"$PY" - <<'EOF' || fail "this Python cannot run Drip's tests (above: what is missing; --wheels brings it)"
import importlib, sys
missing = []
for name in ("torch", "torchvision", "albumentations", "pycocotools", "google_crc32c", "transformers", "scipy", "pytest"):
    try:
        importlib.import_module(name)
    except Exception as exc:
        missing.append(f"{name} ({type(exc).__name__}: {exc})")
if missing:
    print("missing: " + "; ".join(missing), file=sys.stderr)
    sys.exit(1)
EOF

gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
if [ "$gpus" = 0 ]; then
    why=$("$PY" -c 'import torch; print("torch", torch.__version__ + ", CUDA", torch.version.cuda or "none")')
    fail "no CUDA GPU here (torch.cuda.is_available() is False; $why), so nothing can be checked"
fi
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L
export DRIP_REQUIRE_GPU=1 DRIP_NO_SKIPS=1

# What this machine cannot run, left out by name with the reason; everything else must pass.
left_out=()
leave_out() {
    echo "== left out: $1 ($2)"
    left_out+=(--deselect "$1")
}
if [ "$gpus" -lt 2 ]; then
    leave_out tests/test_gpu.py::test_ddp_on_nccl_on_every_gpu_through_drip \
        "this machine has $gpus GPU; NCCL takes one process per GPU, so one GPU cannot hold two NCCL ranks"
fi
if ! timeout 10 docker version >/dev/null 2>&1; then
    leave_out tests/test_docker.py::test_training_in_the_container_on_the_gpu \
        "no Docker engine answers here ('docker version' failed)"
fi

echo "== GPU tests (pytest -m gpu, no skips)"
within_budget "the GPU tests" "$PY" -m pytest -m gpu -rA -q -p no:cacheprovider "${left_out[@]}" \
    tests/test_gpu.py tests/test_docker.py

out=gpu-checks
mkdir -p "$out"
echo "== bench/train_throughput.py --device cuda ($(left) s of the budget left)"
within_budget "bench/train_throughput.py" "$PY" bench/train_throughput.py --device cuda "${QUICK[@]}" \
    --json "$out/train_throughput.json"
echo "== bench/inference.py --device cuda ($(left) s of the budget left)"
within_budget "bench/inference.py" "$PY" bench/inference.py --device cuda "${QUICK[@]}" --json "$out/inference.json"
echo "== done in $((SECONDS - started)) s: figures in $out/"
