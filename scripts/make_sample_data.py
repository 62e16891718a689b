#!/usr/bin/env python3
"""Regenerates the bundled sample data in files/ (run from the project root).

    files/images/{shapes_a,shapes_b}/*.jpg   120 labelled training images, 320x240
    files/metadata.json                      their boxes, in Drip's JSON format
    files/class_map.pbtxt                    the three classes
    files/test_images/{batch_1,batch_2}/     8 test images for inference, never trained on
    files/test_images/annotations.json       their boxes (paths relative to files/test_images/),
                                             so the quick start scores what it found

Synthetic on purpose: the repository ships no third-party images, and shapes on textured
backgrounds are learnable in minutes on a CPU. The objects are a quarter to half of the
shorter side and never hide each other, so that the quick start (trained from scratch at
160 px for a few minutes) has objects of 30-60 px to find, the size its smallest anchors fit,
and a drawn result a person can check by eye.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drip.data.labelmap import LabelMap  # noqa: E402
from drip.data.synthetic import CLASSES, make_dataset, write_drip_json  # noqa: E402

import shutil  # noqa: E402

files = Path("files")
scene = {"size": (320, 240), "object_size": (0.25, 0.5), "overlap": False}
for old in ("images", "test_images"):
    shutil.rmtree(files / old, ignore_errors=True)
train = make_dataset(files / "images", 120, folders=("shapes_a", "shapes_b"), seed=7, **scene)
write_drip_json(files / "metadata.json", train)
LabelMap.from_names(CLASSES).write(files / "class_map.pbtxt")
test = make_dataset(files / "test_images", 8, folders=("batch_1", "batch_2"), seed=8, **scene)
write_drip_json(files / "test_images" / "annotations.json", test)
print(f"wrote {len(train)} training images and {len(test)} test images under {files}/")
