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
from drip.data.synthetic import make_dataset, write_drip_json  # noqa: E402


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


def gpu_unavailable_reason() -> str | None:
    """None when a CUDA GPU can be used here, else why not (one line, for the skip)."""
    import torch

    if not torch.cuda.is_available():
        built = torch.version.cuda or "none (a CPU-only build)"
        return f"needs an NVIDIA GPU: torch.cuda.is_available() is False (torch {torch.__version__}, CUDA {built})"
    return None


_GPU_REASON: list[str | None] = []  # asked once per session: importing torch is not free


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Tests marked ``gpu`` skip, with the reason, where no CUDA GPU answers.

    With DRIP_REQUIRE_GPU=1 (scripts/gpu_checks.sh sets it when nvidia-smi sees a GPU) they fail
    instead: a GPU check that skipped would prove nothing.
    """
    if item.get_closest_marker("gpu") is None:
        return
    if not _GPU_REASON:
        _GPU_REASON.append(gpu_unavailable_reason())
    reason = _GPU_REASON[0]
    if reason is None:
        return
    if os.environ.get("DRIP_REQUIRE_GPU") == "1":
        pytest.fail(f"DRIP_REQUIRE_GPU=1, but this test {reason}", pytrace=False)
    pytest.skip(reason)


def in_ci() -> bool:
    """Whether this run is CI's (``$CI`` set, as .ci/run sets it and most CI services do)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(reason: str) -> None:
    """Skip the test with ``reason``, or, under CI, fail with it: CI's machine can always run it
    (it installs Chromium and a Docker engine), so a skip there would hide a check that never ran."""
    if in_ci():
        pytest.fail(f"CI must run this test, but {reason}", pytrace=False)
    pytest.skip(reason)


def _no_skips() -> bool:
    return os.environ.get("DRIP_NO_SKIPS") == "1"


def _as_failure(report, what: str) -> None:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = (f"{what} skipped ({reason.removeprefix('Skipped: ')}), and DRIP_NO_SKIPS=1 allows none: "
                       "scripts/gpu_checks.sh leaves out by name, with the reason, what this machine cannot run")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under DRIP_NO_SKIPS=1 (scripts/gpu_checks.sh) a skip is a failure: a check that skipped
    proves nothing, and the script deselects, naming them, the tests impossible on the machine."""
    outcome = yield
    report = outcome.get_result()
    if _no_skips() and report.skipped and not hasattr(report, "wasxfail"):
        _as_failure(report, item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """The same for a whole module skipped while collected (``pytest.importorskip``)."""
    outcome = yield
    report = outcome.get_result()
    if _no_skips() and report.skipped:
        _as_failure(report, collector.nodeid)
