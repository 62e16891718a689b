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
# 224 px: from scratch at 160 px the triangles' boxes came out too small (the network sees the
# image at 1/16 and 1/32 of its size), and every object was found on 0-4 of the 8 test images in
# 300-600 steps; at 224 px all 8 (BENCHMARKS.md#quick-start). 32 sampled regions per image instead of
# torchvision's 512: the sample images hold one to four objects, and on a CPU the box head's
# RoIAlign backward is most of a step.
$PY training_starter.py --runtime "$runtime" \
    --src_json_path files/metadata.json \
    --image_folder_path files/images/ \
    --class_map_path files/class_map.pbtxt \
    --network fasterrcnn_mobilenet_v3_large_320_fpn \
    --weights coco --weights_fallback none \
    --image_size 224 \
    --box_batch_size_per_image 32 \
    --number_of_steps 300 \
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
