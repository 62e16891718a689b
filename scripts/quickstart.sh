#!/usr/bin/env bash
# The quick start: trains a small detector on the bundled sample data (files/), then runs it on
# files/test_images/ and writes JSON results to files/results/. Installs what it needs into .venv.
#
# It trains from scratch (--weights none) for 100 steps so that it runs on a laptop CPU and
# needs no download: a demonstration, not a good detector; for real work keep COCO weights.
# Extra arguments go to training_starter.py, e.g.  scripts/quickstart.sh --number_of_steps 50
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
PY=.venv/bin/python

# Drip uses the CPU only when asked: ask, when this machine has no NVIDIA GPU.
device=()
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 || device=(--device cpu)

$PY training_starter.py \
    --src_json_path files/metadata.json \
    --image_folder_path files/images/ \
    --class_map_path files/class_map.pbtxt \
    --network fasterrcnn_mobilenet_v3_large_320_fpn \
    --weights none \
    --image_size 256 \
    --number_of_steps 100 \
    --augmentations 1 \
    "${device[@]}" \
    "$@"

$PY inference_starter.py --images_path files/test_images/ --threshold 50 "${device[@]}"

echo "[drip] done: results in files/results/, the session in pipeline/dl/;"
echo "[drip] to watch training curves: .venv/bin/tensorboard --logdir pipeline/dl/logs"
