"""End to end through the real starters, on the CPU: train, resume, edit the config, resume, infer.

Each input format (Drip JSON, COCO, Pascal VOC, YOLO) trains a few steps from real JPEG files; the
session folder, the TensorBoard logs and the JSON results are then read back as a user would.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from drip.data.synthetic import make_dataset

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

FAST = [
    "--runtime", "local",
    "--network", "fasterrcnn_mobilenet_v3_large_320_fpn",
    "--weights", "none",
    "--image_size", "128",
    "--batch_size", "2",
    "--checkpoint_every", "2",
    "--num_workers", "0",
    "--device", "cpu",
]


def starter(name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, str(ROOT / name), *args], capture_output=True, text=True, cwd=ROOT, timeout=600
    )
    if check:
        assert out.returncode == 0, f"{name} {args} failed:\n{out.stderr[-4000:]}"
    return out


def checkpoint_steps(session: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in (session / "dl" / "checkpoints").glob("step-*.pt"))


def write_coco(path: Path, annotations) -> None:
    names = sorted({label for a in annotations for label in a.labels})
    cat_ids = {name: 10 * (i + 1) for i, name in enumerate(names)}  # non-contiguous, like COCO's
    images, anns = [], []
    for i, a in enumerate(annotations, start=100):
        images.append({"id": i, "file_name": a.file, "width": a.width, "height": a.height})
        for box, label in zip(a.boxes, a.labels):
            x0, y0, x1, y1 = box
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat_ids[label],
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    cats = [{"id": cid, "name": name, "supercategory": "shape"} for name, cid in cat_ids.items()]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))


def write_voc(folder: Path, annotations) -> None:
    folder.mkdir(parents=True)
    for a in annotations:
        objects = "".join(
            f"<object><name>{label}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>"
            f"<bndbox><xmin>{int(b[0]) + 1}</xmin><ymin>{int(b[1]) + 1}</ymin><xmax>{int(b[2])}</xmax><ymax>{int(b[3])}</ymax></bndbox></object>"
            for b, label in zip(a.boxes, a.labels)
        )
        sub, name = a.file.split("/")
        (folder / f"{sub}_{Path(name).stem}.xml").write_text(
            f"<annotation><folder>{sub}</folder><filename>{name}</filename>"
            f"<size><width>{a.width}</width><height>{a.height}</height><depth>3</depth></size>{objects}</annotation>"
        )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e data")
    images = root / "my images"
    annotations = make_dataset(images, 10, size=(160, 120), seed=3)
    drip_json = root / "metadata.json"
    drip_json.write_text(json.dumps({"images": [a.to_json() for a in annotations]}))
    write_coco(root / "instances.json", annotations)
    write_voc(root / "voc annotations", annotations)
    make_dataset(root / "test images", 4, size=(200, 150), folders=("cam 1", "cam_2"), seed=4)
    return root


def test_train_resume_edit_resume_infer(data, tmp_path):
    session = tmp_path / "pipe line"
    common = [*FAST, "--session_folder", str(session), "--src_json_path", str(data / "metadata.json"),
              "--image_folder_path", str(data / "my images")]
    before = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}

    starter("training_starter.py", *common, "--number_of_steps", "3")
    dl = session / "dl"
    for name in ("pipeline.config", "label_map.pbtxt", "split/train.json", "split/eval.json",
                 "split/report.json", "records/records.json", "model.pt", "session.json"):
        assert (dl / name).is_file(), name
    assert list((dl / "records").glob("train-*.tfrecord")) and list((dl / "records").glob("eval-*.tfrecord"))
    assert (session / "images_augmented" / "annotations.json").is_file()
    assert checkpoint_steps(session)[-1] == 3

    # Resume with a flag: continues at step 3, stops at 5.
    out = starter("training_starter.py", *common, "--resume_training", "--number_of_steps", "5")
    assert checkpoint_steps(session)[-1] == 5
    assert "step 3" in out.stderr

    # Edit pipeline.config by hand, resume again: the edits take effect. A constant schedule with
    # no warmup makes step 6 run at exactly the edited rate; unedited, it would run at about 3e-6
    # (step 5 of a 100-step warmup), and with only the rate or only the schedule edited at neither.
    config = dl / "pipeline.config"
    text = config.read_text()
    for key, value in (("number_of_steps", "6"), ("learning_rate", "0.000777"), ("lr_schedule", "constant"),
                       ("warmup_steps", "0")):
        text, edits = re.subn(rf"^{key}: .*$", f"{key}: {value}", text, flags=re.M)
        assert edits == 1, key
    config.write_text(text)
    starter("training_starter.py", "--runtime", "local", "--session_folder", str(session), "--resume_training")
    assert checkpoint_steps(session)[-1] == 6
    assert "learning_rate: 0.000777" in config.read_text()
    events = EventAccumulator(str(dl / "logs"))
    events.Reload()
    lr = events.Scalars("lr")
    assert lr[-1].step == 6 and lr[-1].value == pytest.approx(0.000777, rel=1e-6)
    assert lr[-2].step == 5 and lr[-2].value < 1e-4  # step 5 ran before the edit, still warming up
    assert {"loss/total", "throughput/images_per_sec"} <= set(events.Tags()["scalars"])

    # A typo in the edited file: one line naming the file, the key and the likely fix.
    config.write_text(config.read_text() + "numbr_of_steps: 9\n")
    out = starter("training_starter.py", "--runtime", "local", "--session_folder", str(session),
                  "--resume_training", check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "unknown key 'numbr_of_steps'; did you mean 'number_of_steps'?" in out.stderr.strip().splitlines()[-1]

    # Inference on a folder of folders: one results folder per input folder, JSON per image.
    results = tmp_path / "results"
    infer = ["--runtime", "local", "--session_folder", str(session), "--images_path", str(data / "test images"),
             "--results_path", str(results), "--device", "cpu"]
    starter("inference_starter.py", *infer, "--threshold", "0")
    for group in ("cam 1", "cam_2"):
        summary = json.loads((results / group / "detections.json").read_text())
        assert len(summary["images"]) == 2
        for item in summary["images"]:
            assert set(item) >= {"image", "width", "height", "detections"}
            assert (item["width"], item["height"]) == (200, 150)
            for det in item["detections"]:
                assert set(det) >= {"class_id", "label", "score", "box", "box_normalized"}
                assert det["label"] in ("circle", "square", "triangle") and 0 <= det["score"] <= 1
        per_image = sorted((results / group).glob("*.json"))
        assert len([p for p in per_image if p.name != "detections.json"]) == 2
        assert len(list((results / group).glob("*.jpg"))) == 2

    # Running again never overwrites: the first results go to trash.
    first = (results / "cam 1" / "detections.json").read_bytes()
    starter("inference_starter.py", *infer, "--threshold", "99")
    trashed = list((results / "trash").rglob("detections.json"))
    assert first in [p.read_bytes() for p in trashed]

    # A new session moves the old one to trash, whole.
    starter("training_starter.py", *common, "--number_of_steps", "1", "--augmentations", "0")
    # (Resumed runs redrew dl/report/, and the earlier reports went to trash as report folders.)
    old = [p for p in (session / "trash").iterdir() if not p.name.endswith("-report")]
    assert len(old) == 1 and (old[0] / "dl" / "model.pt").is_file()
    assert (old[0] / "images_augmented" / "annotations.json").is_file()

    # Nothing the user gave was modified.
    assert {p: p.read_bytes() for p in data.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("fmt", ["coco", "voc"])
def test_train_from_other_formats(data, tmp_path, fmt):
    src = data / "instances.json" if fmt == "coco" else data / "voc annotations"
    session = tmp_path / "s"
    starter("training_starter.py", *FAST, "--session_folder", str(session), "--src_json_path", str(src),
            "--image_folder_path", str(data / "my images"), "--number_of_steps", "2", "--augmentations", "0")
    report = json.loads((session / "dl" / "split" / "report.json").read_text())
    assert report["format"] == fmt
    model = torch.load(session / "dl" / "model.pt", weights_only=True)
    # COCO keeps its category order; VOC has none, so classes come in order of first appearance.
    assert sorted(model["classes"]) == ["circle", "square", "triangle"]
    label_map = (session / "dl" / "label_map.pbtxt").read_text()
    assert [line.split("'")[1] for line in label_map.splitlines() if "name:" in line] == model["classes"]


def test_a_roboflow_yolo_export_trains_and_infers_with_the_same_commands(tmp_path):
    """The dataset as Roboflow exports it: data.yaml with ../train/images, val honoured, scored."""
    from drip.data.synthetic import make_roboflow_yolo

    root = tmp_path / "Shapes v1 (yolov8)"
    make_roboflow_yolo(root, 8, 3, 2, seed=6)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    session = tmp_path / "s"
    starter("training_starter.py", *FAST, "--session_folder", str(session), "--src_json_path",
            str(root / "data.yaml"), "--number_of_steps", "2", "--augmentations", "1")
    report = json.loads((session / "dl" / "split" / "report.json").read_text())
    assert (report["format"], report["train"], report["eval"]) == ("yolo", 8, 3)
    model = torch.load(session / "dl" / "model.pt", weights_only=True)
    assert model["classes"] == ["circle", "square", "triangle"]

    results = tmp_path / "results"
    starter("inference_starter.py", "--runtime", "local", "--session_folder", str(session), "--device", "cpu",
            "--images_path", str(root / "valid"), "--results_path", str(results),
            "--src_json_path", str(root / "data.yaml"), "--threshold", "0")
    assert len(json.loads((results / "images" / "detections.json").read_text())["images"]) == 3
    metrics = json.loads((results / "metrics.json").read_text())
    assert metrics["annotation_format"] == "yolo" and metrics["not_scored"] == []
    assert metrics["metrics"]["images"] == 3  # valid/ only: train images are not under --images_path
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
