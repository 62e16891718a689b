#!/usr/bin/env python3
"""Regenerates the bundled sample data in files/ (run from the project root).

    files/images/{shapes_a,shapes_b}/*.jpg   40 labelled training images, 320x240
    files/metadata.json                      their boxes, in Drip's JSON format
    files/class_map.pbtxt                    the three classes
    files/test_images/{batch_1,batch_2}/     8 unlabelled images for inference

Synthetic on purpose: the repository ships no third-party images, and shapes on textured
backgrounds are learnable in minutes on a CPU.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drip.labelmap import LabelMap  # noqa: E402
from drip.synthetic import CLASSES, make_dataset, write_drip_json  # noqa: E402

files = Path("files")
train = make_dataset(files / "images", 40, size=(320, 240), folders=("shapes_a", "shapes_b"), seed=7)
write_drip_json(files / "metadata.json", train)
LabelMap.from_names(CLASSES).write(files / "class_map.pbtxt")
make_dataset(files / "test_images", 8, size=(320, 240), folders=("batch_1", "batch_2"), seed=8)
print(f"wrote {len(train)} training images and 8 test images under {files}/")
