"""The detector contract (drip.detectors): one place knows the families, no library imports a stage."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from drip import detectors
from drip.errors import ModelError

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, relative imports resolved against the ``drip`` package."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


# That no library module imports a stage is tests/test_architecture.py's: imports run down the layers.


def test_stages_do_not_import_each_other_for_helpers():
    assert not {m for m in imported_modules(ROOT / "drip" / "stages" / "train.py") if m.startswith("drip.stages")}


def test_only_the_adapters_reach_into_torchvision_detectors():
    reach_ins = ("roi_heads", "score_thresh", "backbone.body", ".transform.", "resize_boxes")
    for path in (ROOT / "drip").rglob("*.py"):
        if path.parent.name == "detectors":
            continue
        text = path.read_text()
        assert not [r for r in reach_ins if r in text], path


def test_every_network_has_a_family_and_published_figures():
    names = detectors.network_names()
    assert names[0] == "fasterrcnn_mobilenet_v3_large_fpn"
    assert {"dfine_n", "dfine_s", "dfine_m", "dfine_l", "dfine_x",
            "rtdetr_v2_r18", "rtdetr_v2_r34", "rtdetr_v2_r50", "rtdetr_v2_r101"} <= set(names)
    for name in names:
        figures = detectors.published(name)
        assert figures.coco_ap and figures.params_m > 0 and figures.licence and figures.source, name
    assert detectors.published("dfine_n").coco_ap == 42.8
    assert detectors.published("fasterrcnn_mobilenet_v3_large_fpn").coco_ap == 32.8


def test_unknown_network_suggests_and_lists_every_family():
    with pytest.raises(ModelError) as err:
        detectors.family("dfine_nano")
    assert "did you mean 'dfine_n'" in str(err.value) and "rtdetr_v2_r18" in str(err.value)


def test_drip_networks_prints_the_table_without_importing_transformers():
    code = (
        "import sys; from drip.cli import main; main(['networks']); "
        "assert 'transformers' not in sys.modules, 'listing networks imported transformers'"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["network", "COCO", "AP", "latency", "params", "licence"]
    row = next(line for line in lines if line.startswith("dfine_s "))
    assert "48.5" in row and "Apache-2.0" in row and "10 M" in row
    assert any(line.startswith("[") and "D-FINE" in line for line in lines)


def test_recipe_of_the_detr_families():
    assert detectors.recipe("dfine_s") == {"grad_clip": 0.1}
    assert detectors.recipe("fasterrcnn_mobilenet_v3_large_fpn") == {}
    assert detectors.default_optimizer("rtdetr_v2_r18", 10**6) == "adamw"
    # The authors' rate at their batch (D-FINE-S: 2e-4 at 32), square-root scaled.
    assert detectors.default_learning_rate("dfine_s", 32, "adamw") == pytest.approx(2e-4)
    assert detectors.default_learning_rate("dfine_s", 8, "adamw") == pytest.approx(1e-4)


def test_adamw_slows_the_wide_layers_of_torchvision_detectors_and_sgd_does_not():
    """Under AdamW a weight learns at min(1, 1024 / fan-in) of the rate: the box head's 12,544-input
    fc6 at 1024/12544, the 3x3 FPN and RPN convolutions (2,304 inputs) at 1024/2304; every
    parameter is in exactly one group. SGD keeps one rate for all."""
    from drip.detectors import models

    model = models.build_model("fasterrcnn_mobilenet_v3_large_320_fpn", 4, "none", 160)
    scale_of = {}
    for group in detectors.param_groups(model, "adamw"):
        for param in group["params"]:
            assert id(param) not in scale_of
            scale_of[id(param)] = group["lr_scale"]
    named = dict(model.named_parameters())
    assert len(scale_of) == len(named)
    assert scale_of[id(named["roi_heads.box_head.fc6.weight"])] == pytest.approx(1024 / 12544)
    assert scale_of[id(named["rpn.head.conv.0.0.weight"])] == pytest.approx(1024 / 2304)
    assert scale_of[id(named["roi_heads.box_head.fc7.weight"])] == 1.0  # 1,024 inputs
    assert scale_of[id(named["roi_heads.box_head.fc6.bias"])] == 1.0
    assert {g["lr_scale"] for g in detectors.param_groups(model, "sgd")} == {1.0}
