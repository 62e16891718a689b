"""drip.evaluation.audit: labels against out-of-fold predictions, on hand-made boxes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from drip.errors import InputError
from drip.evaluation.audit import (
    Calibration, ImageLabels, ImagePredictions, apply_suggestions, assign_folds, find_issues, summary,
)

CIRCLE, SQUARE = [10.0, 10.0, 40.0, 40.0], [60.0, 60.0, 90.0, 90.0]


def clean(n: int, score: float = 0.9):
    """``n`` images labelled right, each predicted right at ``score`` plus one false box at 0.1."""
    pairs = []
    for i in range(n):
        labels = ImageLabels(f"clean/{i}.jpg", [CIRCLE, SQUARE], ["circle", "square"])
        preds = ImagePredictions(labels.image, [CIRCLE, SQUARE, [100, 100, 120, 120]], ["circle", "square", "circle"],
                                 [score, score, 0.1])
        pairs.append((labels, preds))
    return pairs


def one(image, label_boxes, label_names, pred_boxes, pred_names, scores):
    return ImageLabels(image, label_boxes, label_names), ImagePredictions(image, pred_boxes, pred_names, scores)


def kinds_of(audit, image):
    return [issue.kind for issue in audit.issues if issue.image == image]


def test_clean_labels_give_no_sure_issue():
    audit = find_issues(clean(20))
    assert audit.recall == 1.0
    assert all(issue.score < 0.5 for issue in audit.issues), audit.issues


def test_each_kind_is_found_on_the_image_that_has_it():
    faults = [
        one("missing.jpg", [CIRCLE], ["circle"], [CIRCLE, SQUARE], ["circle", "square"], [0.9, 0.9]),
        one("wrong.jpg", [CIRCLE, SQUARE], ["square", "square"], [CIRCLE, SQUARE], ["circle", "square"], [0.9, 0.9]),
        one("moved.jpg", [[25, 10, 55, 40], SQUARE], ["circle", "square"], [CIRCLE, SQUARE], ["circle", "square"],
            [0.9, 0.9]),
        one("off.jpg", [[45, 10, 75, 40], SQUARE], ["circle", "square"], [CIRCLE, SQUARE], ["circle", "square"],
            [0.9, 0.9]),
        one("far.jpg", [[150, 150, 180, 180], SQUARE], ["circle", "square"], [CIRCLE, SQUARE], ["circle", "square"],
            [0.9, 0.9]),
        one("twice.jpg", [CIRCLE, [11, 10, 40, 41], SQUARE], ["circle", "circle", "square"], [CIRCLE, SQUARE],
            ["circle", "square"], [0.9, 0.9]),
        one("nothing.jpg", [CIRCLE, SQUARE, [100, 10, 130, 40]], ["circle", "square", "circle"], [CIRCLE, SQUARE],
            ["circle", "square"], [0.9, 0.9]),
    ]
    audit = find_issues(clean(30) + faults)
    by_image = {issue.image: issue for issue in audit.issues if issue.score >= 0.05}
    assert kinds_of(audit, "missing.jpg") == ["missing"]
    assert by_image["missing.jpg"].box == SQUARE and by_image["missing.jpg"].suggested_label == "square"
    assert kinds_of(audit, "wrong.jpg") == ["wrong_class"]
    assert by_image["wrong.jpg"].label == "square" and by_image["wrong.jpg"].suggested_label == "circle"
    assert by_image["wrong.jpg"].box == CIRCLE and by_image["wrong.jpg"].index == 0
    assert kinds_of(audit, "moved.jpg") == ["bad_box"]
    assert by_image["moved.jpg"].box == [25, 10, 55, 40] and by_image["moved.jpg"].suggested_box == CIRCLE
    # A box moved just off its object: one bad box, not a spurious box and a missing one.
    assert kinds_of(audit, "off.jpg") == ["bad_box"] and by_image["off.jpg"].suggested_box == CIRCLE
    # Far away, the two are not taken for one another: an object missing, a box around nothing.
    assert sorted(kinds_of(audit, "far.jpg")) == ["missing", "spurious"]
    assert kinds_of(audit, "twice.jpg") == ["duplicate"] and by_image["twice.jpg"].index == 1
    assert kinds_of(audit, "nothing.jpg") == ["spurious"]
    assert by_image["nothing.jpg"].suggested_label is None
    # What the model sees ranks above what it does not: the spurious box comes last.
    ranked = [issue.image for issue in audit.issues]
    assert ranked[-1] == "nothing.jpg" or audit.issues[-1].score <= by_image["nothing.jpg"].score
    assert all(by_image[name].score > by_image["nothing.jpg"].score
               for name in ("missing.jpg", "wrong.jpg", "moved.jpg", "off.jpg", "twice.jpg"))
    scores = [issue.score for issue in audit.issues]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    assert summary(audit.issues)["by_kind"] == {
        "missing": 2, "wrong_class": 1, "bad_box": 2, "duplicate": 1, "spurious": 2,
    }


def test_overlapping_objects_the_model_sees_twice_are_no_sure_duplicate():
    near = [12.0, 10.0, 42.0, 40.0]  # IoU 0.88 with CIRCLE
    partly = [25.0, 10.0, 55.0, 40.0]  # IoU 0.33: two objects, however alike
    audit = find_issues(clean(30) + [
        one("two.jpg", [CIRCLE, near], ["circle", "circle"], [CIRCLE, near], ["circle", "circle"], [0.9, 0.9]),
        one("apart.jpg", [CIRCLE, partly], ["circle", "circle"], [CIRCLE, partly], ["circle", "circle"], [0.9, 0.9]),
    ])
    assert all(i.score < 0.2 for i in audit.issues if i.image in ("two.jpg", "apart.jpg"))


def test_scores_follow_the_models_own_precision_not_its_raw_scores():
    """A weak model whose right boxes score 0.3 is as sure at 0.3 as a strong one at 0.9."""
    weak = find_issues(clean(30, score=0.3) + [
        one("missing.jpg", [CIRCLE], ["circle"], [CIRCLE, SQUARE], ["circle", "square"], [0.3, 0.3])
    ])
    (issue,) = [i for i in weak.issues if i.image == "missing.jpg"]
    assert issue.kind == "missing" and issue.score > 0.9
    # A prediction at a score where the model is usually wrong is not a sure missing box.
    low = find_issues(clean(30) + [one("low.jpg", [CIRCLE], ["circle"], [CIRCLE, SQUARE], ["circle", "square"],
                                       [0.9, 0.1])])
    assert all(i.score < 0.2 for i in low.issues if i.image == "low.jpg")


def test_spurious_scores_rise_with_the_models_recall():
    """A model that finds every labelled object makes an unfound label more suspect than one that
    misses half of them."""
    extra = one("nothing.jpg", [CIRCLE, [100, 10, 130, 40]], ["circle", "circle"], [CIRCLE], ["circle"], [0.9])
    good = find_issues(clean(30) + [extra] + [
        one(f"m{i}.jpg", [CIRCLE], ["circle"], [CIRCLE, SQUARE], ["circle", "square"], [0.9, 0.9]) for i in range(3)
    ])
    half = clean(15) + [
        one(f"blind{i}.jpg", [CIRCLE, SQUARE], ["circle", "square"], [CIRCLE], ["circle"], [0.9]) for i in range(15)
    ]
    poor = find_issues(half + [extra] + [
        one(f"m{i}.jpg", [CIRCLE], ["circle"], [CIRCLE, SQUARE], ["circle", "square"], [0.9, 0.9]) for i in range(3)
    ])

    def spurious(audit):
        return max(i.score for i in audit.issues if i.image == "nothing.jpg" and i.kind == "spurious")

    assert spurious(good) > spurious(poor)


def test_calibration_is_monotone_and_matches_the_hit_rate():
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.8, 0.9, 0.95])
    hits = np.array([0, 1, 0, 0, 1, 1, 1])
    cal = Calibration(scores, hits)
    out = cal(np.linspace(0, 1, 21))
    assert np.all(np.diff(out) >= 0)
    # pooled: 0 | 1 0 0 -> 1/3 | 1 1 1
    assert cal([0.9])[0] == 1.0 and cal([0.1])[0] == 0.0 and cal([0.3])[0] == pytest.approx(1 / 3)


def test_suggestions_apply_each_kind():
    images = [ImageLabels("a.jpg", [CIRCLE, SQUARE, [1, 1, 5, 5]], ["square", "square", "circle"])]
    from drip.evaluation.audit import Issue

    issues = [
        Issue("a.jpg", "wrong_class", 0.9, CIRCLE, "square", "circle", index=0),
        Issue("a.jpg", "bad_box", 0.8, SQUARE, "square", "square", suggested_box=[61, 61, 91, 91], index=1),
        Issue("a.jpg", "spurious", 0.7, [1, 1, 5, 5], "circle", None, index=2),
        Issue("a.jpg", "missing", 0.6, [100, 100, 130, 130], None, "circle"),
        Issue("a.jpg", "missing", 0.2, [200, 200, 230, 230], None, "circle"),  # too unsure to apply
    ]
    ((name, boxes, labels, changes),) = apply_suggestions(images, issues)
    assert name == "a.jpg"
    assert boxes == [CIRCLE, [61, 61, 91, 91], [100, 100, 130, 130]]
    assert labels == ["circle", "square", "circle"]
    assert changes == ["wrong_class", "bad_box", "missing"]


def test_folds_are_even_and_every_class_is_in_two_of_them():
    images = [ImageLabels(f"{i}.jpg", [CIRCLE], ["rare" if i in (3, 7) else "common"]) for i in range(10)]
    folds = assign_folds(images, 2, seed=1)
    assert sorted(folds.count(f) for f in range(2)) == [5, 5]
    assert folds[3] != folds[7]
    assert folds == assign_folds(images, 2, seed=1)


@pytest.mark.parametrize("images, folds, message", [
    ([], 2, "list no images"),
    ([ImageLabels("a.jpg", [], [])] * 6, 2, "hold no boxes"),
    ([ImageLabels(f"{i}.jpg", [CIRCLE], ["c"]) for i in range(5)], 3, "too few for --folds 3"),
    ([ImageLabels(f"{i}.jpg", [CIRCLE], ["c"]) for i in range(3)], 2, "too few to audit"),
    ([ImageLabels(f"{i}.jpg", [CIRCLE], ["c" if i else "lonely"]) for i in range(6)], 2, "'lonely' has boxes in only 1"),
    ([ImageLabels(f"{i}.jpg", [CIRCLE], ["c"]) for i in range(6)], 1, "--folds 1"),
])
def test_bad_input_is_one_line_naming_it(images, folds, message):
    with pytest.raises(InputError, match=message) as caught:
        assign_folds(images, folds)
    assert "\n" not in str(caught.value)


# -- drip audit, end to end ------------------------------------------------------------------------
TINY = ["--network", "fasterrcnn_mobilenet_v3_large_320_fpn", "--weights", "none", "--image_size", "64",
        "--batch_size", "2", "--number_of_steps", "2", "--augmentations", "0", "--num_workers", "0",
        "--warmup_steps", "1", "--device", "cpu", "--box_batch_size_per_image", "16"]


def _audit(tmp_path, dataset, annotations, *extra):
    from drip.cli import main
    from drip.data.synthetic import write_drip_json

    labels = tmp_path / "labels.json"
    write_drip_json(labels, annotations)
    folder = tmp_path / "audit session"
    code = main(["audit", "--session_folder", str(folder), "--src_json_path", str(labels),
                 "--image_folder_path", str(dataset["images"]), *TINY, *extra])
    return code, folder


@pytest.mark.parametrize("change, extra, message", [
    (lambda a: a[:3], [], "3 images are too few to audit"),
    (lambda a: a[:5], ["--folds", "3"], "5 images are too few for --folds 3"),
    (lambda a: [], [], "no images"),
    (lambda a: [_relabel(a[0], "unicorn")] + a[1:], [], "class 'unicorn' has boxes in only 1 image"),
])
def test_bad_input_to_drip_audit_is_one_line_and_writes_nothing(tmp_path, dataset, capsys, change, extra, message):
    from drip.session import Session

    earlier = Session(tmp_path / "audit session")
    earlier.start_new()
    (earlier.dl / "model.pt").write_bytes(b"the earlier session's")
    code, folder = _audit(tmp_path, dataset, change(list(dataset["annotations"])), *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and message in err[0], err
    assert (folder / "dl" / "model.pt").read_bytes() == b"the earlier session's"  # not moved, not touched
    assert not (folder / "trash").exists()


def _relabel(annotation, label):
    import dataclasses

    return dataclasses.replace(annotation, labels=[label] + annotation.labels[1:])


@pytest.mark.slow
def test_drip_audit_end_to_end_writes_the_issues_the_page_and_a_session(tmp_path, dataset):
    """Two tiny folds and a final model (about a minute): every file with its schema, a planted
    duplicate box found, suggested.json is COCO without it, the page loads in a browser and the
    report links to it; the session serves drip infer as any other."""
    import dataclasses

    from test_report import assert_page_loads, images_in_browser

    annotations = list(dataset["annotations"])
    first = annotations[0]
    annotations[0] = dataclasses.replace(first, boxes=first.boxes + [list(first.boxes[0])],
                                         labels=first.labels + [first.labels[0]])
    code, folder = _audit(tmp_path, dataset, annotations, "--eval_percentage", "25")
    assert code == 0
    audit = folder / "dl" / "audit"
    issues = json.loads((audit / "label_issues.json").read_text())
    assert issues, "the planted duplicate was not found"
    for issue in issues:
        assert set(issue) >= {"image", "kind", "score", "box", "label", "suggested_label"}
        assert issue["kind"] in ("missing", "wrong_class", "bad_box", "duplicate", "spurious")
        assert 0 <= issue["score"] <= 1 and len(issue["box"]) == 4
        assert issue["image"] in {a.file for a in annotations}
        assert ("suggested_box" in issue) == (issue["kind"] == "bad_box")
    assert [i["score"] for i in issues] == sorted((i["score"] for i in issues), reverse=True)
    duplicate = [i for i in issues if i["kind"] == "duplicate"]
    assert duplicate and duplicate[0]["image"] == first.file and duplicate[0]["box"] == first.boxes[0]
    assert duplicate[0]["box_index"] == len(first.boxes)

    coco = json.loads((audit / "suggested.json").read_text())
    assert {"images", "annotations", "categories"} <= set(coco)
    image_id = next(im["id"] for im in coco["images"] if im["file_name"] == first.file)
    assert len([a for a in coco["annotations"] if a["image_id"] == image_id]) == len(first.boxes)
    assert len(coco["images"]) == len(annotations)

    crops = {f"crops/{p.name}" for p in (audit / "crops").iterdir()}
    assert len(crops) == min(len(issues), 120)
    # a crop is 2.6 inches on its long side, the box and a margin of 0.6 its size on every side
    assert_page_loads(audit / "index.html", tmp_path, crops, smallest=(60, 60))
    assert "duplicate" in (audit / "index.html").read_text()
    predictions = json.loads((audit / "predictions.json").read_text())
    assert set(predictions) == {a.file for a in annotations}  # every image predicted out of fold
    for k in (1, 2):
        trained = json.loads((audit / "folds" / f"fold-{k}" / "train.json").read_text())["images"]
        assert 0 < len(trained) < len(annotations)

    # The final model's session: model.pt and a report that links to the audit page.
    assert (folder / "dl" / "model.pt").is_file()
    stages = json.loads((folder / "dl" / "session.json").read_text())["stages"]
    assert stages["audit"]["issues"] == len(issues) and {"split", "train"} <= set(stages)
    report_page = folder / "dl" / "report" / "index.html"
    assert 'href="../audit/index.html"' in report_page.read_text()
    images_in_browser(report_page, tmp_path)  # loads


@pytest.mark.parametrize("given, trained", [({}, "yolox_nano"), ({"network": "fasterrcnn_mobilenet_v3_large_fpn"},
                                                                  "fasterrcnn_mobilenet_v3_large_fpn")])
def test_drip_audit_trains_yolox_nano_unless_a_network_is_given(tmp_path, dataset, monkeypatch, given, trained):
    """A mock of the training only: which network the folds would train, with and without --network."""
    from drip.data.synthetic import write_drip_json
    from drip.runtime import audit, local

    class Trained(Exception):
        pass

    def train(session, config, *args, **kwargs):
        raise Trained(config.network)

    monkeypatch.setattr(local, "run_all_stages", train)
    labels = tmp_path / "labels.json"
    write_drip_json(labels, list(dataset["annotations"]))
    with pytest.raises(Trained) as caught:
        audit.audit(tmp_path / "session", {"src_json_path": str(labels), "image_folder_path": str(dataset["images"]),
                                           **given}, {})
    assert str(caught.value) == trained


def test_one_label_gets_its_surest_explanation():
    """A box moved off its object often has a faint prediction of another class under it: that
    must not hide the bad box (the surer explanation). And a label whose object the model finds
    under it is no bad box, so it does not take the prediction that a sure missing box is."""
    # Scores 0.3 and 0.6, where this model is right 20% and 70% of the time.
    mixed = [one(f"mixed/{score}-{i}.jpg", [CIRCLE], ["circle"], [CIRCLE], ["circle"], [score]) if i < hits else
             one(f"mixed/{score}-{i}.jpg", [CIRCLE], ["circle"], [CIRCLE, [100, 100, 120, 120]], ["circle", "circle"],
                 [0.9, score])
             for score, hits in ((0.3, 2), (0.6, 7)) for i in range(10)]
    moved = [25.0, 10.0, 55.0, 40.0]  # the circle's label, moved by half its width (IoU 0.33)
    beside = [45.0, 10.0, 75.0, 40.0]  # an unlabelled circle beside one the model finds less surely
    audit = find_issues(clean(30) + mixed + [
        one("moved.jpg", [moved, SQUARE], ["circle", "square"], [CIRCLE, SQUARE, moved], ["circle", "square", "square"],
            [0.9, 0.9, 0.3]),
        one("beside.jpg", [CIRCLE, SQUARE], ["circle", "square"], [CIRCLE, SQUARE, beside],
            ["circle", "square", "circle"], [0.6, 0.9, 0.9]),
    ])
    (issue,) = [i for i in audit.issues if i.image == "moved.jpg" and i.score >= 0.05]
    assert issue.kind == "bad_box" and issue.suggested_box == CIRCLE and issue.score > 0.5
    (issue,) = [i for i in audit.issues if i.image == "beside.jpg" and i.score >= 0.05]
    assert issue.kind == "missing" and issue.box == beside and issue.score > 0.5


def test_a_class_the_model_sees_where_nothing_is_counts_for_less():
    """Calibrated per class: a model that puts squares on bare background at high scores is less
    sure of an unlabelled square than of an unlabelled circle at the same raw score."""
    pairs = []
    for i in range(210):  # 210 predictions of circles, 315 of squares: enough to calibrate each alone
        labels = ImageLabels(f"c/{i}.jpg", [CIRCLE, SQUARE], ["circle", "square"])
        boxes, names, scores = [CIRCLE, SQUARE], ["circle", "square"], [0.9, 0.9]
        if i % 2:  # half the images: a square on the background, as sure as the real ones
            boxes, names, scores = boxes + [[100, 100, 130, 130]], names + ["square"], scores + [0.9]
        pairs.append((labels, ImagePredictions(labels.image, boxes, names, scores)))
    pairs += [
        one("circle.jpg", [SQUARE], ["square"], [CIRCLE, SQUARE], ["circle", "square"], [0.9, 0.9]),
        one("square.jpg", [CIRCLE], ["circle"], [CIRCLE, SQUARE], ["circle", "square"], [0.9, 0.9]),
    ]
    audit = find_issues(pairs)
    (circle,) = [i for i in audit.issues if i.image == "circle.jpg" and i.kind == "missing"]
    (square,) = [i for i in audit.issues if i.image == "square.jpg" and i.kind == "missing"]
    assert circle.score > 0.95 and square.score < 0.75
