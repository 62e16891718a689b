"""Property tests of box geometry: conversions round-trip, augmented boxes stay usable.

The conversions of ``drip.data.boxes`` link every format Drip reads or writes (COCO ``xywh``, Pascal
VOC's 1-based inclusive corners, the normalized boxes of TFRecords and inference results) to the
pixel ``xyxy`` the stages exchange. Augmentation must hand the records stage boxes inside the
augmented image with a positive size, whatever the image, the boxes and the random draw.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drip.data import boxes
from drip.data.augment import load_policy, parse_policy, reseed
from drip.stages.augment import _inside

FAST = settings(
    max_examples=int(os.environ.get("DRIP_PROPERTY_EXAMPLES", "80")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

sizes = st.integers(min_value=1, max_value=8192)
coords = st.floats(min_value=-1e4, max_value=1e5, allow_nan=False, allow_infinity=False)


@st.composite
def pixel_boxes(draw, width=None, height=None):
    """A box with positive size, inside a ``width`` x ``height`` image when those are given."""
    if width is None:
        x0, y0 = draw(coords), draw(coords)
        w = draw(st.floats(min_value=1e-3, max_value=1e5))
        h = draw(st.floats(min_value=1e-3, max_value=1e5))
        return [x0, y0, x0 + w, y0 + h]
    x0 = draw(st.floats(min_value=0, max_value=width - 1))
    y0 = draw(st.floats(min_value=0, max_value=height - 1))
    x1 = draw(st.floats(min_value=x0 + 1, max_value=width))
    y1 = draw(st.floats(min_value=y0 + 1, max_value=height))
    return [x0, y0, x1, y1]


def close(a, b, scale=1.0) -> bool:
    # A conversion is one addition or division per coordinate: a few ulps of the largest value.
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-12, abs_tol=1e-9 * scale) for x, y in zip(a, b))


# -- conversions ------------------------------------------------------------------------------
@FAST
@given(pixel_boxes())
def test_coco_xywh_round_trip(box):
    xywh = boxes.xyxy_to_xywh(box)
    assert xywh[2] > 0 and xywh[3] > 0
    assert close(boxes.xywh_to_xyxy(xywh), box, scale=max(map(abs, box)))
    assert close(boxes.xyxy_to_xywh(boxes.xywh_to_xyxy(xywh)), xywh, scale=max(map(abs, box)))


@FAST
@given(pixel_boxes())
def test_voc_round_trip(box):
    voc = boxes.xyxy_to_voc(box)
    assert close(boxes.voc_to_xyxy(voc), box, scale=max(map(abs, box)) + 1)


def test_voc_whole_image_is_the_whole_image():
    # VOC (1, 1, W, H) covers every pixel of a W x H image: pixels 0..W in continuous coordinates.
    assert boxes.voc_to_xyxy([1, 1, 640, 480]) == [0, 0, 640, 480]
    assert boxes.xyxy_to_voc([0, 0, 640, 480]) == [1, 1, 640, 480]
    assert boxes.xywh_to_xyxy([10, 20, 30, 40]) == [10, 20, 40, 60]


@FAST
@given(sizes, sizes, st.data())
def test_normalized_round_trip_and_range(width, height, data):
    box = data.draw(pixel_boxes(width, height)) if width > 1 and height > 1 else [0.0, 0.0, width, height]
    norm = boxes.normalize(box, width, height)
    assert all(0.0 <= v <= 1.0 for v in norm)
    assert boxes.has_area(norm)
    assert close(boxes.denormalize(norm, width, height), box, scale=max(width, height))
    assert boxes.clip_normalized(norm) == norm


@FAST
@given(sizes, sizes, pixel_boxes())
def test_clipped_normalized_box_is_inside_the_image(width, height, box):
    clipped = boxes.clip_normalized(boxes.normalize(box, width, height))
    assert all(0.0 <= v <= 1.0 for v in clipped)
    if boxes.has_area(clipped):
        # What is left is the part of the box inside the image.
        x0, y0, x1, y1 = boxes.denormalize(clipped, width, height)
        assert x0 >= min(box[0], width) - 1e-6 * width and x1 <= max(box[2], 0) + 1e-6 * width
        assert y0 >= min(box[1], height) - 1e-6 * height and y1 <= max(box[3], 0) + 1e-6 * height


@FAST
@given(pixel_boxes())
def test_every_format_reaches_the_same_pixels(box):
    """COCO -> pixels -> VOC -> pixels -> normalized -> pixels: still the same box."""
    width, height = 2 * max(map(abs, box)) + 1, 3 * max(map(abs, box)) + 1
    via = boxes.xywh_to_xyxy(boxes.xyxy_to_xywh(box))
    via = boxes.voc_to_xyxy(boxes.xyxy_to_voc(via))
    via = boxes.denormalize(boxes.normalize(via, width, height), width, height)
    assert close(via, box, scale=max(width, height))


# -- augmentation -----------------------------------------------------------------------------
# Geometry that moves boxes as far as albumentations can: large rotations and shifts push boxes
# partly or wholly out of the image, crops and perspective change its size. min_width/min_height
# 1: with sliver boxes (under a pixel wide after clipping) albumentations 2.0's BBoxSafeRandomCrop
# and RandomSizedBBoxSafeCrop raise "We should have x_min < x_max"; Drip drops such boxes anyway.
HARSH = """
bbox: {min_visibility: 0.0, min_area: 0, min_width: 1, min_height: 1}
transforms:
  - HorizontalFlip: {p: 0.5}
  - VerticalFlip: {p: 0.5}
  - RandomRotate90: {p: 0.5}
  - Affine: {p: 0.9, scale: [0.5, 1.6], translate_percent: [-0.4, 0.4], rotate: [-60, 60], shear: [-20, 20], border_mode: 0, fill: 0}
  - Perspective: {p: 0.5, scale: [0.05, 0.2]}
  - BBoxSafeRandomCrop: {p: 0.5, erosion_rate: 0.3}
  - RandomSizedBBoxSafeCrop: {p: 0.3, height: 48, width: 80}
"""


@pytest.fixture(scope="module")
def policies():
    return {"default": load_policy(None).build(), "harsh": parse_policy(HARSH, "harsh.yaml").build()}


@st.composite
def augment_inputs(draw):
    width, height = draw(st.integers(16, 128)), draw(st.integers(16, 128))
    n = draw(st.integers(0, 6))
    bxs = [draw(pixel_boxes(width, height)) for _ in range(n)]
    seed = draw(st.integers(0, 2**32 - 1))
    return width, height, bxs, seed


@FAST
@pytest.mark.parametrize("name", ["default", "harsh"])
@given(inputs=augment_inputs())
def test_augmented_boxes_stay_inside_the_image_with_positive_size(policies, name, inputs):
    width, height, bxs, seed = inputs
    transform = policies[name]
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    reseed(transform, seed)
    result = transform(image=image, bboxes=np.asarray(bxs, dtype=np.float64).reshape(-1, 4), object_ids=list(range(len(bxs))))
    out_h, out_w = result["image"].shape[:2]
    ids = [int(i) for i in result["object_ids"]]
    assert len(result["bboxes"]) == len(ids) and len(set(ids)) == len(ids) and set(ids) <= set(range(len(bxs)))
    # albumentations' own output (clip=True, invalid boxes filtered): inside, with an area.
    for x0, y0, x1, y1 in np.asarray(result["bboxes"]).reshape(-1, 4).tolist():
        assert -1e-6 <= x0 < x1 <= out_w + 1e-6 and -1e-6 <= y0 < y1 <= out_h + 1e-6
    # What the augment stage writes to the manifest: clipped, rounded, at least a pixel each way.
    kept, kept_ids = _inside(result["bboxes"], ids, out_w, out_h)
    assert set(kept_ids) <= set(ids)
    for x0, y0, x1, y1 in kept:
        assert 0 <= x0 and x1 <= out_w and 0 <= y0 and y1 <= out_h
        assert x1 - x0 >= 1 and y1 - y0 >= 1
        # ... and it survives the records stage's normalization with an area.
        assert boxes.has_area(boxes.clip_normalized(boxes.normalize([x0, y0, x1, y1], out_w, out_h)))
