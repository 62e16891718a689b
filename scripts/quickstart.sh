#!/usr/bin/env bash
# The quick start: trains a small detector on the bundled sample data (files/), then runs it on
# files/test_images/, writes the drawn results to files/results/ and scores them against
# files/test_images/annotations.json (AP50, and the images where every object was found).
#
# It trains for 300 steps at 224 px from COCO weights, or from scratch when they cannot be
# downloaded (--weights_fallback none). From scratch it took 159-242 s on 2-core machines without
# a GPU (BENCHMARKS.md#quick-start); from COCO weights it has not been measured.
#
# Where it runs is decided once, here: in Drip's container when a Docker engine answers (the
# host then gets only the Docker SDK in .venv, no PyTorch), else locally (.venv gets Drip and
# PyTorch). Both starters get that --runtime, so training and inference never end up on different
# runtimes. Set DRIP_RUNTIME=local or docker to choose.
# Extra arguments go to training_starter.py, e.g.  scripts/quickstart.sh --number_of_steps 100;
# the runtime flags among them (--base_image, --docker_network, --gpus, --device) go to both
# starters, e.g. without a registry:
#   scripts/quickstart.sh --base_image drip-test-base:bookworm --docker_network host
# (inference runs in the image training was built, which the session records).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

runtime=${DRIP_RUNTIME:-auto}
if [ "$runtime" = auto ]; then
    runtime=local
    if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        runtime=docker
    fi
fi
case "$runtime" in
    docker)
        # The starters need only the standard library and the Docker SDK on the host.
        [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
        .venv/bin/python -c 'import docker' 2>/dev/null || .venv/bin/python -m pip install --quiet 'docker>=7.1'
        ;;
    local) scripts/setup.sh ;;
    *) echo "scripts/quickstart.sh: DRIP_RUNTIME=$runtime; use auto, local or docker" >&2; exit 2 ;;
esac
echo "[drip] quick start: every stage runs with --runtime $runtime" >&2
PY=.venv/bin/python

# The flags both starters take about where and how to run: inference needs the same ones.
both=()
extra=("$@")
for ((i = 0; i < ${#extra[@]}; i++)); do
    case "${extra[i]}" in
        --base_image|--docker_network|--gpus|--device)
            both+=("${extra[i]}")
            if ((i + 1 < ${#extra[@]})); then both+=("${extra[i + 1]}"); i=$((i + 1)); fi ;;
        --base_image=*|--docker_network=*|--gpus=*|--device=*) both+=("${extra[i]}") ;;
    esac
done

# Drip uses the CPU only when asked: ask, when this machine has no NVIDIA GPU.
device=()
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 || device=(--device cpu)

# From COCO weights where they can be downloaded, else from scratch (one line says which).
# YOLOX-Nano, 1200 steps at 224 px: from scratch over four seeds it found every object on 7-8 of
# the 8 test images with 0-1 false boxes in 178-237 s, where Faster R-CNN MobileNetV3 (300 steps,
# the quick start before) found them on 6-8 with 0-2 (BENCHMARKS.md#quick-start).
$PY training_starter.py --runtime "$runtime" \
    --src_json_path files/metadata.json \
    --image_folder_path files/images/ \
    --class_map_path files/class_map.pbtxt \
    --network yolox_nano \
    --weights coco --weights_fallback none \
    --image_size 224 \
    --number_of_steps 1200 \
    --augmentations 1 \
    "${device[@]}" \
    "$@"

$PY inference_starter.py --runtime "$runtime" \
    --images_path files/test_images/ \
    --src_json_path files/test_images/annotations.json \
    --threshold 50 \
    "${device[@]}" \
    "${both[@]}"

echo "[drip] done: drawn results in files/results/, their scores in files/results/metrics.json, the session in pipeline/dl/"
if [ "$runtime" = local ]; then
    echo "[drip] to look at the training curves: .venv/bin/tensorboard --logdir pipeline/dl/logs"
fi
