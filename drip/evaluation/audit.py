"""Which labels are wrong: a dataset's boxes compared with out-of-fold predictions.

``drip audit`` (``drip.runtime.audit``) trains models that never saw an image's labels, predicts
each image with one of them, and hands this module the labels and the predictions. Everything
here is plain Python and numpy, so it is tested on hand-made boxes.

How sure the model is comes from the model itself, not from constants tuned on one dataset:
``Calibration`` maps a raw score to the fraction of the model's predictions at that score which
match a label (same class, IoU >= 0.5), a monotone fit over the whole dataset, one for each class
the model predicts often enough (``ClassCalibration``: a model that puts one class on bare
background is less sure of that class). A prediction at a score where the model is right 95% of
the time, with no label under it, is a missing box at 0.95; the same raw score from a weaker model
counts for less. Each label gets one explanation and each prediction explains one label: the
surest candidates (wrong class, bad box) are taken first. The kinds of issue:

* ``missing``: a prediction that no label covers (IoU < ``COVER_IOU`` with every label);
  the score is the prediction's calibrated score.
* ``wrong_class``: a label whose object the model sees as another class: the best prediction of
  another class on it (IoU >= 0.5) is surer than the best of the label's class;
  ``p_other * (1 - p_same)``.
* ``bad_box``: a label whose object the model does not find under it (``p_same`` < 0.5), and
  whose class it finds beside it: a prediction of the same class that lies on no other label's
  object (another class's label the model finds does not count), overlapping the box or within
  ``NEAR`` of it; ``p_pred * (1 - p_same)``, and for a prediction that does not even touch the
  box, times ``1 - p_any`` (the label may be another object the model missed).
  ``suggested_box`` is the prediction.
* ``duplicate``: a second label of the same class on the same object (IoU >= ``DUPLICATE_IOU``
  between the labels); their IoU times the model's doubt that a second object is there.
* ``spurious``: a label under which the model predicts nothing. Absence of evidence is weak
  evidence: Bayes' rule with the model's recall on this dataset and the rate of the other issues
  as the prior, times ``1 - p_any``. On clean labels (few other issues) it stays low.

Writes nothing: ``drip.runtime.audit`` writes ``label_issues.json`` and ``suggested.json`` from
what this returns, and ``drip.evaluation.audit_page`` draws them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import InputError
from .report import box_iou

KINDS = ("missing", "wrong_class", "bad_box", "duplicate", "spurious")
MATCH_IOU = 0.5  # a prediction and a label are the same object from here up (COCO's AP50)
# Two labels of one class this alike are one object drawn twice: annotators' duplicates are near
# copies, while two real objects overlapping this much are rare (and the model then sees two).
DUPLICATE_IOU = 0.7
# A bad box's object lies at most this far from it (centre to centre, in the larger box's
# diagonals) when the two do not overlap: a box moved by up to about its own size.
NEAR = 1.0
COVER_IOU = 0.3  # a prediction overlapping a label this much is that label's business, never "missing"
PER_CLASS = 200  # predictions of a class enough to calibrate it alone
MIN_SCORE = 0.05  # issues below this are not listed: the tail of a ranked list nobody reads
# Suggestions applied in suggested.json: at least as likely right as not.
APPLY_SCORE = 0.5


@dataclass
class ImageLabels:
    """One image's labels as the annotations give them (boxes in its pixels)."""

    image: str
    boxes: list[list[float]]
    labels: list[str]


@dataclass
class ImagePredictions:
    """One image's out-of-fold predictions (boxes in its pixels, class names, raw scores)."""

    image: str
    boxes: list[list[float]]
    labels: list[str]
    scores: list[float]


@dataclass
class Issue:
    image: str
    kind: str
    score: float
    box: list[float]
    label: str | None  # as given (None for a missing box)
    suggested_label: str | None  # None: remove the box (spurious, duplicate)
    suggested_box: list[float] | None = None  # bad_box only
    index: int | None = None  # the label's position among the image's boxes (None for missing)
    evidence: str = ""

    def to_json(self) -> dict[str, Any]:
        out = {
            "image": self.image, "kind": self.kind, "score": round(float(self.score), 4),
            "box": [round(float(v), 2) for v in self.box], "label": self.label,
            "suggested_label": self.suggested_label,
        }
        if self.suggested_box is not None:
            out["suggested_box"] = [round(float(v), 2) for v in self.suggested_box]
        out["box_index"] = self.index
        out["evidence"] = self.evidence
        return out


# -- folds ----------------------------------------------------------------------------------------
def assign_folds(images: Sequence[ImageLabels], folds: int, seed: int = 0) -> list[int]:
    """The fold (0..folds-1) of each image, so that every class has boxes in at least two folds
    (every fold's model then trains on every class) and folds differ in size by one at most.

    Rarest classes are placed first, each image into the fold that has the fewest images of its
    rarest class, then the fewest images. An InputError when it cannot be done.
    """
    if not images:
        raise InputError("the annotations list no images; nothing to audit")
    if not any(image.boxes for image in images):
        raise InputError("the annotations hold no boxes; label some objects first, then audit them")
    if folds < 2:
        raise InputError(f"--folds {folds}: need at least 2 (each image predicted by a model that did not train on it)")
    if len(images) < 2 * folds:
        raise InputError(
            f"{len(images)} images are too few for --folds {folds}: each fold needs at least 2; "
            f"use --folds {max(2, len(images) // 2)} or label more images"
        ) if len(images) >= 4 else InputError(
            f"{len(images)} images are too few to audit: {2 * folds} are needed for --folds {folds}; label more images"
        )
    counts: dict[str, int] = {}
    for image in images:
        for name in set(image.labels):
            counts[name] = counts.get(name, 0) + 1
    rare = sorted((n, name) for name, n in counts.items() if n < 2)
    if rare:
        n, name = rare[0]
        raise InputError(
            f"class {name!r} has boxes in only {n} image: every fold's model must see it, so it needs "
            "boxes in at least 2 images; label more of it or leave it out (--class_map_path)"
        )
    order = list(range(len(images)))
    random.Random(seed).shuffle(order)
    rarest = {i: min((counts[name] for name in set(images[i].labels)), default=len(images) + 1) for i in order}
    order.sort(key=lambda i: rarest[i])
    fold_of = [0] * len(images)
    sizes = [0] * folds
    full = -(-len(images) // folds)
    per_class = {name: [0] * folds for name in counts}
    for i in order:
        names = sorted(set(images[i].labels), key=lambda name: counts[name])
        # A full fold only when all are: sizes differ by one at most.
        key = (lambda f: (sizes[f] >= full, per_class[names[0]][f], sizes[f], f)) if names else (lambda f: (sizes[f], f))
        fold = min(range(folds), key=key)
        fold_of[i] = fold
        sizes[fold] += 1
        for name in names:
            per_class[name][fold] += 1
    for name, spread in per_class.items():
        if sum(1 for n in spread if n) < 2:
            raise InputError(
                f"class {name!r} has boxes in one of the {folds} folds only, so one fold's model never sees it; "
                "label more of it or use fewer --folds"
            )
    return fold_of


# -- calibration ----------------------------------------------------------------------------------
class Calibration:
    """Raw score -> the fraction of the model's predictions at that score that match a label.

    Fitted by isotonic regression (pool adjacent violators) on every prediction of the dataset:
    1 where it matches a label of its class at IoU >= 0.5 (each label once, best score first),
    else 0. Monotone in the score, and what it says is the model's own precision there.
    """

    def __init__(self, scores: np.ndarray, hits: np.ndarray):
        order = np.argsort(scores, kind="stable")
        scores, hits = np.asarray(scores, float)[order], np.asarray(hits, float)[order]
        values: list[float] = []
        weights: list[float] = []
        ends: list[float] = []
        for s, h in zip(scores, hits):
            values.append(h)
            weights.append(1.0)
            ends.append(s)
            while len(values) > 1 and values[-2] > values[-1]:
                w = weights[-2] + weights[-1]
                v = (values[-2] * weights[-2] + values[-1] * weights[-1]) / w
                values[-2:], weights[-2:], ends[-2:] = [v], [w], [ends[-1]]
        self.ends = np.asarray(ends)
        self.values = np.asarray(values)

    def __call__(self, scores) -> np.ndarray:
        scores = np.asarray(scores, float)
        if not len(self.ends):
            return np.zeros_like(scores)
        i = np.searchsorted(self.ends, scores, side="left")
        return self.values[np.clip(i, 0, len(self.values) - 1)]


def _match(labels: ImageLabels, preds: ImagePredictions, iou: np.ndarray) -> tuple[dict[int, int], np.ndarray]:
    """Labels matched to predictions of their class at IoU >= MATCH_IOU, best score first:
    {label index: prediction index}, and which predictions matched."""
    matched: dict[int, int] = {}
    hit = np.zeros(len(preds.scores), bool)
    for d in np.argsort(-np.asarray(preds.scores, float), kind="stable"):
        best, best_iou = None, MATCH_IOU
        for g in range(len(labels.boxes)):
            if g in matched or labels.labels[g] != preds.labels[d]:
                continue
            if iou[g, d] >= best_iou:
                best, best_iou = g, iou[g, d]
        if best is not None:
            matched[best] = int(d)
            hit[d] = True
    return matched, hit


class ClassCalibration:
    """A ``Calibration`` for each predicted class with ``PER_CLASS`` predictions or more (a model
    is surer of some classes than of others: a class it often sees where nothing is labelled
    counts for less), the whole model's for the rest."""

    def __init__(self, scores: np.ndarray, hits: np.ndarray, classes: Sequence[str]):
        scores, hits, classes = np.asarray(scores, float), np.asarray(hits, float), np.asarray(classes, object)
        self.overall = Calibration(scores, hits)
        self.by_class = {name: Calibration(scores[classes == name], hits[classes == name])
                         for name in set(classes.tolist()) if int((classes == name).sum()) >= PER_CLASS}

    def __call__(self, scores, classes: Sequence[str]) -> np.ndarray:
        scores = np.asarray(scores, float)
        out = self.overall(scores)
        for name, calibration in self.by_class.items():
            mask = np.asarray([c == name for c in classes], bool)
            if mask.any():
                out[mask] = calibration(scores[mask])
        return out


def calibrate(pairs: Sequence[tuple[ImageLabels, ImagePredictions]]) -> ClassCalibration:
    scores, hits, classes = [], [], []
    for labels, preds in pairs:
        iou = box_iou(labels.boxes, preds.boxes)
        _, hit = _match(labels, preds, iou)
        scores += list(preds.scores)
        hits += list(hit)
        classes += list(preds.labels)
    return ClassCalibration(np.asarray(scores, float), np.asarray(hits, float), classes)


# -- the issues -----------------------------------------------------------------------------------
@dataclass
class Audit:
    issues: list[Issue]  # ranked, best first
    recall: float  # labels the model finds (same class, IoU >= 0.5, calibrated score >= 0.5)
    labels: int
    predictions: int
    calibration: ClassCalibration = field(repr=False, default=None)


def find_issues(pairs: Sequence[tuple[ImageLabels, ImagePredictions]], min_score: float = MIN_SCORE) -> Audit:
    """Every issue of every image, ranked by score (0-1, how sure), best first."""
    calibration = calibrate(pairs)
    issues: list[Issue] = []
    unfound: list[tuple[Issue, float]] = []  # spurious candidates and 1 - p_any, scored once the prior is known
    found = total = n_preds = 0
    for labels, preds in pairs:
        p = calibration(preds.scores, preds.labels) if preds.scores else np.zeros(0)
        image_issues, image_unfound, image_found = _image_issues(labels, preds, p)
        issues += image_issues
        unfound += image_unfound
        found += image_found
        total += len(labels.boxes)
        n_preds += len(preds.scores)
    recall = found / total if total else 0.0
    # The prior that a label is wrong: how many other issues the model is sure of, per label.
    sure = sum(1 for issue in issues if issue.kind != "duplicate" and issue.score >= 0.5)
    prior = max(sure, 0.5) / max(total, 1)
    miss = 1.0 - recall
    posterior = prior / (prior + miss) if prior + miss > 0 else 0.0
    for issue, absent in unfound:
        issue.score = posterior * absent
        issue.evidence += f"; the model finds {recall:.0%} of the labels, and {prior:.1%} look wrong otherwise"
        issues.append(issue)
    issues = [issue for issue in issues if issue.score >= min_score]
    issues.sort(key=lambda issue: (-issue.score, issue.image, KINDS.index(issue.kind), issue.index or -1))
    return Audit(issues, recall, total, n_preds, calibration)


def _image_issues(labels: ImageLabels, preds: ImagePredictions, p: np.ndarray):
    boxes = np.asarray(labels.boxes, float).reshape(-1, 4)
    pboxes = np.asarray(preds.boxes, float).reshape(-1, 4)
    iou = box_iou(boxes, pboxes)
    label_iou = box_iou(boxes, boxes)
    matched, _ = _match(labels, preds, iou)
    p_same = np.array([p[matched[g]] if g in matched else 0.0 for g in range(len(boxes))])
    used = np.zeros(len(pboxes), bool)
    used[list(matched.values())] = True
    done = np.zeros(len(boxes), bool)
    issues: list[Issue] = []
    unfound: list[tuple[Issue, float]] = []
    image = labels.image

    def overlapping(g: int, low: float) -> np.ndarray:
        return np.flatnonzero(iou[g] >= low) if len(pboxes) else np.zeros(0, int)

    # duplicates: a later label of the same class on an earlier one, where the model sees one object
    for g in range(len(boxes)):
        for h in range(g):
            if done[h] or labels.labels[g] != labels.labels[h] or label_iou[g, h] < DUPLICATE_IOU:
                continue
            near = sorted((p[d] for d in np.union1d(overlapping(g, MATCH_IOU), overlapping(h, MATCH_IOU))
                           if preds.labels[d] == labels.labels[g]), reverse=True)
            second = near[1] if len(near) > 1 else 0.0  # the model's belief in a second object there
            score = float(label_iou[g, h] * (1 - second))
            issues.append(Issue(image, "duplicate", score, list(labels.boxes[g]), labels.labels[g],
                                None, index=g, evidence=f"IoU {label_iou[g, h]:.2f} with box {h} of the same class"))
            done[g] = True
            break

    # wrong class: the model is surer of another class on the object than of the label's; bad box:
    # the label's class found beside it by a prediction that explains no other label. One label,
    # one explanation, and one prediction explains one label: the surest are taken first (a box
    # moved off its object often has a faint prediction of another class under it, and the
    # object it was moved off may lie under another label that the model finds as that one's class).
    found = p_same >= 0.5
    cover = iou.max(axis=0) if len(boxes) else np.zeros(len(pboxes))
    candidates = []  # (score, distance, kind, label, prediction)
    for g in range(len(boxes)):
        if done[g]:
            continue
        for d in overlapping(g, MATCH_IOU):
            if preds.labels[d] != labels.labels[g] and not used[d] and p[d] > p_same[g]:
                candidates.append((float(p[d] * (1 - p_same[g])), 0.0, "wrong_class", g, int(d)))
        if found[g]:
            continue  # the model finds the label's object under it: not a box that misses its object
        p_any = float(p[overlapping(g, COVER_IOU)].max()) if len(overlapping(g, COVER_IOU)) else 0.0
        for d in range(len(pboxes)):
            if used[d] or preds.labels[d] != labels.labels[g] or p[d] <= p_same[g]:
                continue
            # On another label's object: unless that label is another class, which the model finds.
            if any(iou[h, d] >= COVER_IOU and (labels.labels[h] == preds.labels[d] or not found[h])
                   for h in range(len(boxes)) if h != g):
                continue
            score = float(p[d] * (1 - p_same[g]))
            distance = _centre_distance(boxes[g], pboxes[d])
            if iou[g, d] <= 0:
                if distance > NEAR:
                    continue
                score *= 1 - p_any  # not even touching: only when nothing is seen under the label
            if score > 0:
                candidates.append((score, distance, "bad_box", g, d))
    for score, _, kind, g, d in sorted(candidates, key=lambda c: (-c[0], c[1], c[2])):
        if done[g] or used[d]:
            continue
        if kind == "wrong_class":
            issues.append(Issue(image, "wrong_class", score, list(labels.boxes[g]), labels.labels[g], preds.labels[d],
                                index=g, evidence=f"the model sees {preds.labels[d]} ({p[d]:.0%} sure) "
                                f"rather than {labels.labels[g]} ({p_same[g]:.0%})"))
        else:
            issues.append(Issue(image, "bad_box", score, list(labels.boxes[g]), labels.labels[g], labels.labels[g],
                                suggested_box=[float(v) for v in pboxes[d]], index=g,
                                evidence=f"the model finds the {labels.labels[g]} at IoU {iou[g, d]:.2f} "
                                f"with the box ({p[d]:.0%} sure)"))
        used[d] = done[g] = True

    # missing: sure predictions under no label (one per object, whatever its class)
    kept: list[int] = []
    for d in np.argsort(-p, kind="stable"):
        if used[d] or cover[d] >= COVER_IOU:
            continue
        if any(box_iou(pboxes[d], pboxes[k])[0, 0] >= MATCH_IOU for k in kept):
            continue
        if kept and p[d] < MIN_SCORE:
            break
        kept.append(int(d))
        issues.append(Issue(image, "missing", float(p[d]), [float(v) for v in pboxes[d]], None, preds.labels[d],
                            evidence=f"the model finds a {preds.labels[d]} ({p[d]:.0%} sure) under no label"))

    # spurious: nothing seen under the label
    for g in range(len(boxes)):
        if done[g] or p_same[g] >= 0.5:
            continue
        seen = overlapping(g, COVER_IOU)
        p_any = float(p[seen].max()) if len(seen) else 0.0
        unfound.append((Issue(image, "spurious", 0.0, list(labels.boxes[g]), labels.labels[g], None, index=g,
                              evidence=f"the model sees nothing there (best {p_any:.0%})"), 1 - p_any))
    found = int((p_same >= 0.5).sum())
    return issues, unfound, found


def _centre_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Distance of the centres, in units of the larger box's diagonal."""
    ca, cb = (a[:2] + a[2:]) / 2, (b[:2] + b[2:]) / 2
    diag = max(np.hypot(*(a[2:] - a[:2])), np.hypot(*(b[2:] - b[:2])), 1e-9)
    return float(np.hypot(*(ca - cb)) / diag)


# -- what the issues mean for the annotations ---------------------------------------------------
def summary(issues: Sequence[Issue]) -> dict[str, Any]:
    """Counts by kind and by class (the label as given, else the suggested one)."""
    by_kind = {kind: 0 for kind in KINDS}
    by_class: dict[str, dict[str, int]] = {}
    for issue in issues:
        by_kind[issue.kind] += 1
        name = issue.label if issue.label is not None else issue.suggested_label
        by_class.setdefault(str(name), {kind: 0 for kind in KINDS})[issue.kind] += 1
    return {"issues": len(issues), "by_kind": by_kind, "by_class": dict(sorted(by_class.items()))}


def apply_suggestions(images: Sequence[ImageLabels], issues: Sequence[Issue], min_score: float = APPLY_SCORE):
    """Each image's boxes and labels with the issues scored ``min_score`` and up applied: a
    missing box added, a class or a box replaced, a duplicate or spurious box removed. Returns
    ``[(image, boxes, labels, changes)]`` where ``changes[i]`` names the issue behind box i, or None."""
    by_image: dict[str, list[Issue]] = {}
    for issue in issues:
        if issue.score >= min_score:
            by_image.setdefault(issue.image, []).append(issue)
    out = []
    for image in images:
        boxes = [list(b) for b in image.boxes]
        labels = list(image.labels)
        changes: list[str | None] = [None] * len(boxes)
        removed: set[int] = set()
        added = []
        for issue in by_image.get(image.image, []):
            if issue.kind == "missing":
                added.append((issue.box, issue.suggested_label, "missing"))
            elif issue.index is None or issue.index >= len(boxes):
                continue
            elif issue.kind in ("duplicate", "spurious"):
                removed.add(issue.index)
            elif issue.kind == "wrong_class":
                labels[issue.index], changes[issue.index] = issue.suggested_label, "wrong_class"
            elif issue.kind == "bad_box":
                boxes[issue.index], changes[issue.index] = list(issue.suggested_box), "bad_box"
        keep = [i for i in range(len(boxes)) if i not in removed]
        out.append((image.image, [boxes[i] for i in keep] + [a[0] for a in added],
                    [labels[i] for i in keep] + [a[1] for a in added],
                    [changes[i] for i in keep] + [a[2] for a in added]))
    return out
