"""The quick start: ``scripts/quickstart.sh`` finds the sample objects and scores itself.

Runs the real script (with ``DRIP_RUNTIME=local``) in a copy of the project's layout (the
starters, ``drip/`` and ``.venv`` linked, ``files/`` copied), so the session and results land in a
temporary folder and not in the checkout. Its install step is replaced by a no-op: the test runs
in the installed environment already. Its time is measured by ``bench/quickstart.py``, not here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The whole quick start (1200 steps, about 3-4 minutes on 2 cores), not a shortened one: after
# 600 steps every object was found on only 3 of the 8 images.


def quickstart_copy(tmp_path: Path) -> Path:
    root = tmp_path / "project with spaces"
    (root / "scripts").mkdir(parents=True)
    for name in ("drip", "training_starter.py", "inference_starter.py", ".venv"):
        (root / name).symlink_to(ROOT / name)
    shutil.copytree(ROOT / "files", root / "files", ignore=shutil.ignore_patterns("results"))
    shutil.copy(ROOT / "scripts" / "quickstart.sh", root / "scripts" / "quickstart.sh")
    (root / "scripts" / "setup.sh").write_text("#!/usr/bin/env bash\ntrue\n")
    (root / "scripts" / "setup.sh").chmod(0o755)
    return root


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """One shortened quick start for the tests below: (its output, metrics.json, the results folder)."""
    root = quickstart_copy(tmp_path_factory.mktemp("quickstart"))
    env = {**os.environ, "DRIP_RUNTIME": "local"}
    out = subprocess.run(
        ["bash", str(root / "scripts" / "quickstart.sh"), "--num_workers", "0"],
        cwd=root.parent, env=env, capture_output=True, text=True, timeout=1800,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    results = root / "files" / "results"
    return out, json.loads((results / "metrics.json").read_text()), results


@pytest.mark.slow
def test_quickstart_scores_itself_against_the_test_labels(quickstart):
    out, scores, results = quickstart
    assert "every stage runs with --runtime local" in out.stderr
    found = scores["at_threshold"]
    assert found["threshold"] == 0.5 and found["images"] == 8 and found["objects"] == 17
    assert scores["metrics"]["images"] == 8 and scores["metrics"]["AP50"] is not None
    # The console ends with the same counts the file holds (then only the stage's time).
    assert f"every object found in {found['complete_images']} of 8 images" in "\n".join(out.stderr.splitlines()[-2:])
    # The drawn results a user opens: one JPEG and one JSON per test image.
    for group in ("batch_1", "batch_2"):
        assert len(list((results / group).glob("*.jpg"))) == 4
        assert len(list((results / group).glob("img_*.json"))) == 4


@pytest.mark.slow
def test_quickstart_finds_the_sample_objects(quickstart):
    """The goal of a first run: every object found on 6 of the 8 test images, at most 2 false boxes."""
    _, scores, _ = quickstart
    found = scores["at_threshold"]
    assert found["complete_images"] >= 6, found
    assert found["false_boxes"] <= 2, found


def test_runtime_flags_reach_both_starters(tmp_path):
    """The Docker quick start without a registry: --base_image and --docker_network must reach
    inference too (it built another image on the default base and tried to pull it); the training
    flags reach training only. The starters are replaced by a Python that logs its arguments."""
    root = tmp_path / "project"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "quickstart.sh", root / "scripts" / "quickstart.sh")
    log = tmp_path / "calls"
    python = root / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/usr/bin/env bash\n{{ printf "%s\\t" "$@"; echo; }} >> "{log}"\n')
    python.chmod(0o755)
    extra = ["--base_image", "drip-test-base:bookworm", "--number_of_steps", "7", "--docker_network=host",
             "--gpus", "none", "--device", "cpu"]
    out = subprocess.run(["bash", str(root / "scripts" / "quickstart.sh"), *extra], cwd=tmp_path,
                         env={**os.environ, "DRIP_RUNTIME": "docker"}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    calls = {line.split("\t")[0]: line.rstrip("\t\n").split("\t")[1:] for line in log.read_text().splitlines()}
    train, infer = calls["training_starter.py"], calls["inference_starter.py"]
    assert train[-len(extra):] == extra and train[:2] == ["--runtime", "docker"]
    assert infer[:2] == ["--runtime", "docker"] and "--number_of_steps" not in infer
    runtime = ["--base_image", "drip-test-base:bookworm", "--docker_network=host", "--gpus", "none", "--device", "cpu"]
    assert infer[-len(runtime):] == runtime
