"""The report (drip.evaluation.report): its numbers, its pictures, and its page in a real browser."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import unavailable
from PIL import Image

from drip.evaluation import report
from drip.evaluation.metrics import STAT_NAMES, ImageDetections, ImageTruth
from drip.session import Session
from drip.stages import configure, split

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# Appended to a copy of index.html beside it: after the page has loaded, one line per <img>.
PROBE = (
    '<script>window.addEventListener("load", () => { const d = document.createElement("pre");'
    ' d.id = "drip-probe"; d.textContent = JSON.stringify([...document.images].map('
    "i => [i.getAttribute('src'), i.complete, i.naturalWidth, i.naturalHeight]));"
    " document.body.appendChild(d); });</script>"
)


def images_in_browser(index: Path, tmp_path: Path) -> list[list]:
    """``[src, complete, naturalWidth, naturalHeight]`` of every image of ``index`` as headless
    Chromium loads it from the file system (no network: every host resolves to nothing)."""
    browser = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if browser is None:
        unavailable("no Chromium to render the report page: apt-get install -y chromium (CI's .ci/run does)")
    probe = index.with_name("_probe.html")
    probe.write_text(index.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    try:
        out = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'chromium'}",
             "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=20000", "--dump-dom", probe.as_uri()],
            capture_output=True, text=True, timeout=180,
        )
    finally:
        probe.unlink()
    found = re.search(r'<pre id="drip-probe">(.*?)</pre>', out.stdout, re.S)
    assert found, f"the page did not finish loading in {browser}: {out.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


def assert_page_files(index: Path, expected: set[str], smallest: tuple[int, int] = (300, 150)) -> None:
    """Without a browser: the page fetches nothing, and its pictures are ``expected``, beside it, PNGs
    more than ``smallest`` (width, height) pixels."""
    page = index.read_text(encoding="utf-8")
    assert not re.search(r'(src|href)="(https?:)?//', page), "the page must not fetch anything"
    assert set(re.findall(r'<img src="([^"]+)"', page)) == expected
    for name in expected:
        with Image.open(index.parent / name) as image:
            assert image.format == "PNG" and image.width > smallest[0] and image.height > smallest[1], name


def assert_page_loads(index: Path, tmp_path: Path, expected: set[str], smallest: tuple[int, int] = (300, 150)) -> None:
    """In headless Chromium: every picture of the page loads (skips without one; fails under CI)."""
    assert_page_files(index, expected, smallest)
    loaded = images_in_browser(index, tmp_path)
    assert {src for src, *_ in loaded} == expected
    broken = [src for src, complete, width, height in loaded if not (complete and width > 0 and height > 0)]
    assert not broken, f"images that did not load: {broken}"


# -- the numbers --------------------------------------------------------------------------------------
def test_confusion_matrix_counts_matches_confusions_misses_and_false_boxes():
    truths = [
        ImageTruth(0, 100, 100, [[0, 0, 10, 10], [50, 50, 70, 70], [80, 80, 90, 90]], [1, 2, 2]),
        ImageTruth(1, 100, 100, [], []),
    ]
    detections = [
        ImageDetections(0, np.array([[0, 0, 10, 11],      # class 1 on the class 1 object: right
                                     [50, 50, 70, 69],    # class 1 on a class 2 object: confused
                                     [1, 1, 10, 10],      # a second box on the first object: false
                                     [80, 80, 90, 90]],   # below the threshold: the object is missed
                                    dtype=float),
                        np.array([0.9, 0.8, 0.7, 0.2]), np.array([1, 1, 1, 2])),
        ImageDetections(1, np.array([[5, 5, 30, 30]], dtype=float), np.array([0.95]), np.array([2])),
    ]
    matrix = report.confusion_matrix(truths, detections, num_classes=2, threshold=0.5)
    # rows: true circle, true square, background; columns: predicted circle, square, background
    assert matrix.tolist() == [[1, 0, 0], [1, 0, 1], [1, 1, 0]]
    assert report.confusion_matrix(truths, detections, 2, threshold=0.1)[1].tolist() == [1, 1, 0]


def stats_row(page: str) -> list[str]:
    """The 12 COCO numbers of the page's table, as shown, in its order."""
    row = re.search(r"<tr><th>AP</th>.*?</tr><tr>(.*?)</tr>", page, re.S)
    assert row, "no table of the 12 COCO numbers"
    return re.findall(r'<td class="n">([^<]*)</td>', row.group(1))


def test_the_page_shows_each_number_in_its_place(tmp_path):
    from drip.evaluation.metrics import Metrics

    values = [0.101 + i / 100 for i in range(len(STAT_NAMES))]
    values[5] = None  # no large objects
    metrics = Metrics(*values, per_class_ap={"cat": 0.5}, per_class_ap50={"cat": 0.75}, pr_curves={"cat": None},
                      recall_thresholds=[], per_class_objects={"cat": 300}, images=2, objects=300, detections=420,
                      max_detections=250)
    ev = report._Evaluation(["cat"], None, metrics, {"step": 7})
    page = report._page(Session(tmp_path / "pipeline"), report.Report(tmp_path), ev, {}, 0.6)
    assert stats_row(page) == ["0.101", "0.111", "0.121", "0.131", "0.141", "-", "0.161", "0.171", "0.181", "0.191",
                               "0.201", "0.211"]
    assert "<b>0.101</b>AP<" in page and "<b>0.111</b>AP50<" in page
    assert "counting up to 250 detections per image" in page
    assert "<td>cat</td><td class='n'>300</td><td class='n'>0.500</td><td class='n'>0.750</td>" in page


def test_box_iou():
    iou = report.box_iou(np.array([[0, 0, 10, 10]]), np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]]))
    assert np.allclose(iou, [[1.0, 50 / 150, 0.0]])


def test_scalars_of_a_resumed_run_are_read_as_tensorboard_shows_them(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path)) as writer:  # a run stopped at step 5, its checkpoint at 3
        for step in range(1, 6):
            writer.add_scalar("loss/total", 1.0, step)
    with SummaryWriter(str(tmp_path), purge_step=4) as writer:  # resumed from step 3, as training does
        for step in range(4, 8):
            writer.add_scalar("loss/total", 2.0, step)
    assert report.read_scalars(tmp_path)["loss/total"] == [(1, 1.0), (2, 1.0), (3, 1.0)] + [(s, 2.0) for s in range(4, 8)]


# -- the pictures and the page -------------------------------------------------------------------------
def report_without_a_model(session, config) -> report.Report:
    """The report of a session that was split and configured, with a log and two evaluations but no model."""
    split.run(session, config)
    configure.write(session, config)
    # A TensorBoard log and two evaluations, as training writes them.
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(session.logs_dir)) as writer:
        for step in range(1, 6):
            writer.add_scalar("loss/total", 2.0 / step, step)
            writer.add_scalar("loss/classifier", 1.0 / step, step)
            writer.add_scalar("lr", 0.001 * step, step)
    session.metrics_path.write_text("".join(
        json.dumps({"step": s, "AP": ap, "AP50": ap + 0.2}) + "\n" for s, ap in ((2, 0.1), (4, 0.3))
    ))
    assert report.read_scalars(session.logs_dir)["loss/total"] == [(s, pytest.approx(2.0 / s)) for s in range(1, 6)]
    return report.write_report(session, device="cpu", show_progress=False)


def test_a_session_without_a_model_gets_the_pictures_it_can_and_says_why_not_the_rest(session, config, dataset):
    written = report_without_a_model(session, config)
    assert [p.file for p in written.pictures] == ["training_curves.png", "dataset_classes.png", "dataset_boxes.png"]
    assert_page_files(written.index, {p.file for p in written.pictures})
    assert set(written.missing) == {"Precision-recall curves", "Confusion matrix", "Predictions on eval images"}
    page = written.index.read_text()
    assert "Not drawn: no model.pt in" in page and "fasterrcnn_mobilenet_v3_large_320_fpn" in page


def test_the_page_of_a_session_without_a_model_loads_in_a_browser(tmp_path, session, config, dataset):
    written = report_without_a_model(session, config)
    assert_page_loads(written.index, tmp_path, {p.file for p in written.pictures})


PICTURES = {"training_curves.png", "dataset_classes.png", "dataset_boxes.png", "pr_curves.png",
            "confusion_matrix.png", "eval_predictions.png"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A session trained for two steps (its report written by training), and a copy of that report.

    Trained once for the tests below: the page's numbers, ``drip report``'s redraw and the
    browser each get their own test, so a machine without Chromium still runs the first two.
    """
    from drip.cli import main
    from drip.data.synthetic import make_dataset, write_drip_json

    tmp = tmp_path_factory.mktemp("report")
    write_drip_json(tmp / "metadata.json", make_dataset(tmp / "my images", 12, seed=1))  # as conftest's dataset
    folder = tmp / "my pipeline"
    argv = [
        "--session_folder", str(folder), "--src_json_path", str(tmp / "metadata.json"),
        "--image_folder_path", str(tmp / "my images"), "--network", "fasterrcnn_mobilenet_v3_large_320_fpn",
        "--weights", "none", "--image_size", "64", "--batch_size", "1", "--number_of_steps", "2",
        "--augmentations", "0", "--num_workers", "0", "--log_every", "1", "--warmup_steps", "1",
        "--device", "cpu", "--box_batch_size_per_image", "16", "--eval_percentage", "25",
    ]
    assert main(["train", *argv]) == 0
    as_trained = tmp / "report as training wrote it"
    shutil.copytree(folder / "dl" / "report", as_trained)
    return folder, as_trained / "index.html"


@pytest.mark.slow
def test_training_writes_the_report_with_the_models_numbers(trained):
    folder, index = trained
    assert {p.name for p in index.parent.iterdir()} == PICTURES | {"index.html"}
    assert_page_files(index, PICTURES)
    page = index.read_text()
    metrics = Session(folder).read_state()["stages"]["train"]["best_metrics"]
    # The page's numbers are the exported model's on the eval split: those training recorded. (A
    # 2-step model scores about 0 everywhere; test_the_page_shows_each_number_in_its_place can
    # tell one number from another.)
    assert f"<b>{metrics['AP']:.3f}</b>AP<" in page
    assert stats_row(page) == ["-" if metrics[name] is None else f"{metrics[name]:.3f}" for name in STAT_NAMES]
    assert "objects found at 60%" in page
    assert "counting up to 100 detections per image" in page  # none of the 3 eval images has more


@pytest.mark.slow
def test_drip_report_draws_it_again_and_moves_the_earlier_one_to_the_trash(trained, capsys):
    from drip.cli import main

    folder, _ = trained
    index = folder / "dl" / "report" / "index.html"
    capsys.readouterr()
    assert main(["report", "--session_folder", str(folder), "--threshold", "0", "--device", "cpu"]) == 0
    assert "report: 6 pictures and index.html" in capsys.readouterr().err
    assert "objects found at 0%" in index.read_text()
    assert_page_files(index, PICTURES)
    earlier = list((folder / "trash").glob("*-report/report/index.html"))
    assert len(earlier) == 1 and "objects found at 60%" in earlier[0].read_text()


@pytest.mark.slow
def test_the_trained_report_loads_in_a_browser(trained, tmp_path):
    assert_page_loads(trained[1], tmp_path, PICTURES)
