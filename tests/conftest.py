"""Shared fixtures: small real datasets made on the fly (JPEG files + annotations)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TORCH_HOME", str(ROOT / ".pytest_cache" / "torch"))  # never a shared cache

# Hypothesis keeps its example database (and caches) in ./.hypothesis by default: in the working
# tree. Under .pytest_cache/ it stays with pytest's own cache, which git ignores.
from hypothesis.configuration import set_hypothesis_home_dir  # noqa: E402

set_hypothesis_home_dir(ROOT / ".pytest_cache" / "hypothesis")

from drip.config import Config  # noqa: E402
from drip.session import Session  # noqa: E402
from drip.synthetic import make_dataset, write_drip_json  # noqa: E402


@pytest.fixture
def dataset(tmp_path):
    """12 images (160x120) in two sub-folders, three classes, Drip JSON at ``metadata.json``.

    The folder name has a space on purpose: user paths do.
    """
    images = tmp_path / "my images"
    annotations = make_dataset(images, 12, seed=1)
    meta = tmp_path / "metadata.json"
    write_drip_json(meta, annotations)
    return {"images": images, "metadata": meta, "annotations": annotations}


@pytest.fixture
def session(tmp_path):
    s = Session(tmp_path / "pipeline")
    s.start_new()
    return s


@pytest.fixture
def config(dataset):
    """Config for a fast CPU session on ``dataset``."""
    return Config().updated(
        {
            "src_json_path": str(dataset["metadata"]),
            "image_folder_path": str(dataset["images"]),
            "network": "fasterrcnn_mobilenet_v3_large_320_fpn",
            "weights": "none",
            "image_size": 128,
            "batch_size": 2,
            "number_of_steps": 4,
            "augmentations": 1,
            "num_workers": 0,
            "checkpoint_every": 2,
            "log_every": 1,
            "warmup_steps": 2,
            "device": "cpu",
            "report": False,  # tests/test_report.py draws it; elsewhere it would only cost time
        },
        "test",
    )
