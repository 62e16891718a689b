"""``dl/audit/index.html``: the label issues of ``drip audit``, best first, each as a crop.

Each issue is drawn as a crop of its image around the box as labelled (red) and what Drip
suggests (green: the predicted box of a missing object, the box a bad box should be), with the
report's drawing helpers (``drip.evaluation.report``), and a summary by kind and by class heads
the page. Like the report it opens from the file system, nothing fetched from the network.

Reads the images; writes ``index.html`` and ``crops/`` into the folder it is given.
"""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any

from ..data.images import open_rgb
from ..errors import InputError
from .audit import KINDS, Audit, summary
from .report import _CSS, _draw_boxes, _figure

MAX_CROPS = 120  # issues drawn; label_issues.json lists them all
GIVEN, SUGGESTED = "#d62728", "#2ca02c"
KIND_HELP = {
    "missing": "an object with no box (the green box is the model's)",
    "wrong_class": "a box whose class looks wrong",
    "bad_box": "a box that misses its object (green: where the model finds it)",
    "duplicate": "a second box on the same object",
    "spurious": "a box around nothing the model can see",
}


def write_page(folder: Path, audit: Audit, paths: dict[str, Path]) -> Path:
    """Draw the crops and write ``folder/index.html``; ``paths`` maps each issue's image name to its file."""
    crops = folder / "crops"
    crops.mkdir(parents=True, exist_ok=True)
    drawn: list[tuple[Any, str | None]] = []
    for rank, issue in enumerate(audit.issues[:MAX_CROPS], 1):
        name = f"{rank:04d}.png"
        try:
            _draw_crop(issue, paths[issue.image], crops / name)
        except (InputError, KeyError):
            name = None
        drawn.append((issue, None if name is None else f"crops/{name}"))
    index = folder / "index.html"
    index.write_text(_page(audit, drawn), encoding="utf-8")
    return index


def _draw_crop(issue, path: Path, out: Path) -> None:
    image = open_rgb(path)
    width, height = image.size
    boxes = [issue.box] + ([issue.suggested_box] if issue.suggested_box is not None else [])
    x0 = min(b[0] for b in boxes)
    y0 = min(b[1] for b in boxes)
    x1 = max(b[2] for b in boxes)
    y1 = max(b[3] for b in boxes)
    margin = max(x1 - x0, y1 - y0) * 0.6 + 8
    left, top = max(0, int(x0 - margin)), max(0, int(y0 - margin))
    right, bottom = min(width, int(x1 + margin) + 1), min(height, int(y1 + margin) + 1)
    crop = image.crop((left, top, right, bottom))

    def shifted(box):
        return [box[0] - left, box[1] - top, box[2] - left, box[3] - top]

    scale = 2.6 / max(crop.size)
    fig = _figure(crop.size[0] * scale, crop.size[1] * scale)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(crop)
    if issue.kind == "missing":
        _draw_boxes(ax, None, [shifted(issue.box)], [1], [f"add {issue.suggested_label}"], [SUGGESTED])
    else:
        _draw_boxes(ax, None, [shifted(issue.box)], [1], [str(issue.label)], [GIVEN])
        if issue.suggested_box is not None:
            _draw_boxes(ax, None, [shifted(issue.suggested_box)], [1], [str(issue.suggested_label)], [SUGGESTED])
    ax.set_xlim(0, crop.size[0])
    ax.set_ylim(crop.size[1], 0)
    fig.savefig(out, format="png")


def _suggestion(issue) -> str:
    if issue.kind == "missing":
        return f"add a {html.escape(str(issue.suggested_label))} box"
    if issue.kind == "wrong_class":
        return f"{html.escape(str(issue.label))} &rarr; {html.escape(str(issue.suggested_label))}"
    if issue.kind == "bad_box":
        return "move the box to the green one"
    return "remove the box"


def _page(audit: Audit, drawn: list) -> str:
    from .. import __version__

    e = html.escape
    facts = summary(audit.issues)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>Drip label audit</title>",
        f"<style>{_CSS} .issues {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); "
        "gap: 1em; } .issues figure { margin: 0; } .score { font-weight: 600; }</style></head><body>",
        "<h1>Drip label audit</h1>",
        f'<p class="sub">{len(audit.issues)} issues among {audit.labels} labels; each image predicted by a model '
        f"that never saw its labels, which finds {audit.recall:.0%} of them. Written "
        f"{e(time.strftime('%Y-%m-%d %H:%M:%S %Z'))} by Drip {e(__version__)}. The list, every issue: "
        '<a href="label_issues.json">label_issues.json</a>; the suggestions applied, for a labelling tool: '
        '<a href="suggested.json">suggested.json</a>.</p>',
        '<div class="cards">' + "".join(
            f'<div class="card"><b>{facts["by_kind"][kind]}</b>{e(kind)}</div>' for kind in KINDS
        ) + "</div>",
        "<h2>By class</h2>",
        "<table><tr><th>class</th>" + "".join(f"<th>{e(k)}</th>" for k in KINDS) + "</tr>" + "".join(
            f"<tr><td>{e(name)}</td>" + "".join(f"<td class='n'>{row[k]}</td>" for k in KINDS) + "</tr>"
            for name, row in facts["by_class"].items()
        ) + "</table>",
        "<h2>The kinds</h2><ul>" + "".join(f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in KIND_HELP.items()) + "</ul>",
        f"<h2>Issues, surest first</h2><p>Red: the box as labelled; green: the suggestion. The first {MAX_CROPS} "
        "are drawn.</p>",
        '<div class="issues">',
    ]
    for rank, (issue, crop) in enumerate(drawn, 1):
        picture = f'<img src="{e(crop)}" alt="{e(issue.kind)} in {e(issue.image)}">' if crop else \
            "<p class='missing'>image not readable</p>"
        parts.append(
            f'<figure class="issue" data-kind="{e(issue.kind)}">{picture}<figcaption>#{rank} '
            f'<span class="score">{issue.score:.0%}</span> <b>{e(issue.kind)}</b>: {_suggestion(issue)}<br>'
            f"<code>{e(issue.image)}</code><br>{e(issue.evidence)}</figcaption></figure>"
        )
    parts.append("</div></body></html>")
    return "\n".join(parts) + "\n"
