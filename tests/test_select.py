"""drip.evaluation.select: uncertain and diverse, on hand-made predictions; ``drip select`` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from drip.evaluation.select import Candidate, choose, entropy_bits, uncertainty


def candidate(name, scores, feature, labels=None):
    labels = labels or ["circle"] * len(scores)
    return Candidate(name, [[0, 0, 10, 10]] * len(scores), labels, list(scores), (100, 100), np.asarray(feature, float))


def test_half_sure_boxes_count_more_than_sure_or_no_boxes():
    assert entropy_bits([0.5])[0] == pytest.approx(1.0)
    sure = uncertainty(candidate("sure", [0.99, 0.98], [0]))[0]
    empty = uncertainty(candidate("empty", [], [0]))[0]
    doubtful = uncertainty(candidate("doubt", [0.5, 0.4, 0.6], [0]))[0]
    assert doubtful > sure and doubtful > empty == 0.0


def test_uncertain_images_first_but_not_near_copies():
    """Three copies of one hard scene and one other hard scene: the other comes second."""
    hard = [candidate(f"copy{i}.jpg", [0.5, 0.5, 0.5], [1, 0, 0, 0]) for i in range(3)]
    other = candidate("other.jpg", [0.5, 0.45, 0.6], [0, 0, 0, 5])
    easy = [candidate(f"easy{i}.jpg", [0.99], [0, i, 0, 0]) for i in range(4)]
    chosen = choose(hard + [other] + easy, 3)
    names = [row["image"] for row in chosen]
    assert names[0].startswith("copy") and names[1] == "other.jpg"
    assert [row["rank"] for row in chosen] == [1, 2, 3]
    assert all(row["reason"] for row in chosen)
    assert len(set(names)) == 3


def test_more_asked_than_there_are():
    assert len(choose([candidate("a.jpg", [0.5], [0])], 5)) == 1
    assert choose([], 3) == []


@pytest.mark.slow
def test_drip_select_end_to_end(tmp_path, dataset):
    """A tiny model, a folder of images: N chosen, best first, with reasons; an earlier output to trash."""
    from drip.cli import main

    folder = tmp_path / "session"
    assert main([
        "train", "--session_folder", str(folder), "--src_json_path", str(dataset["metadata"]),
        "--image_folder_path", str(dataset["images"]), "--network", "fasterrcnn_mobilenet_v3_large_320_fpn",
        "--weights", "none", "--image_size", "64", "--batch_size", "2", "--number_of_steps", "2", "--augmentations", "0",
        "--num_workers", "0", "--warmup_steps", "1", "--device", "cpu", "--eval_percentage", "0", "--report", "false",
    ]) == 0
    output = tmp_path / "out" / "next.json"
    argv = ["select", "--model", str(folder), "--images_path", str(dataset["images"]), "--count", "4",
            "--output", str(output), "--device", "cpu"]
    assert main(argv) == 0
    first = json.loads(output.read_text())
    rows = first["images"]
    assert len(rows) == 4 and first["candidates"] == 12
    assert {row["image"] for row in rows} <= {a.file for a in dataset["annotations"]}
    assert all(set(row) >= {"image", "path", "reason", "rank", "uncertainty_bits"} for row in rows)
    assert all(Path(row["path"]) == dataset["images"] / row["image"] for row in rows)
    assert main(argv) == 0
    assert list((output.parent / "trash").glob("*/next.json"))
