"""scripts/gpu_checks.sh and scripts/gpu_wheels.py, where there is no GPU.

The script runs on a lent GPU machine for a few minutes at most, so what can be checked before
that is checked here: it refuses to pass without a GPU, a skip under its policy (DRIP_NO_SKIPS=1)
is a failure, its --wheels folder installs, and the wheel folder's check finds what is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_wheels  # noqa: E402


def wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    """A minimal pure-Python wheel that pip installs: one package, its METADATA, WHEEL, RECORD."""
    module = name.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    path = folder / f"{module}-{version}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{module}/__init__.py", f"VERSION = {version!r}\n")
        z.writestr(f"{info}/METADATA", meta)
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_checks.sh"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False,
                          env={**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", **(env or {})})


def test_the_script_installs_its_wheels_and_refuses_to_pass_without_a_gpu(tmp_path):
    wheel(tmp_path, "drip-probe-pkg", "1.0")
    r = script("--wheels", str(tmp_path), "--quick")
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"== wheels from {tmp_path} installed into /tmp/drip-gpu-site." in r.stdout
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("gpu_checks.sh: no CUDA GPU here (torch.cuda.is_available() is False; torch "), last
    assert last.endswith("so nothing can be checked"), last
    site = Path(r.stdout.split("installed into ")[1].split()[0])
    assert (site / "drip_probe_pkg" / "__init__.py").is_file()
    shutil.rmtree(site)
    empty = tmp_path / "empty"
    empty.mkdir()
    r = script("--wheels", str(empty))
    assert r.returncode == 1 and "no wheels there; python3 scripts/gpu_wheels.py makes them" in r.stderr


def test_under_the_scripts_policy_a_skip_fails():
    """The GPU tests skip here, with the reason; with DRIP_NO_SKIPS=1 each one fails instead."""
    args = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "DRIP_REQUIRE_GPU": "0"}
    env.pop("DRIP_NO_SKIPS", None)
    allowed = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False, env=env)
    assert allowed.returncode == 0 and " skipped" in allowed.stdout and "failed" not in allowed.stdout, allowed.stdout
    strict = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
                            env={**env, "DRIP_NO_SKIPS": "1"})
    assert strict.returncode == 1, strict.stdout
    tests = int(allowed.stdout.split(" skipped")[0].split()[-1])
    failed = set(re.findall(r"(tests/test_gpu\.py::\w+) skipped \(", strict.stdout))
    assert len(failed) == tests >= 7 and " skipped" not in strict.stdout.splitlines()[-1], strict.stdout
    assert "skipped (needs an NVIDIA GPU: torch.cuda.is_available() is False" in strict.stdout
    assert "DRIP_NO_SKIPS=1 allows none" in strict.stdout


def test_the_wheel_folder_check_finds_what_the_device_would_miss(tmp_path):
    for spec in gpu_wheels.WHEELS:
        name, version = spec.split("==")
        wheel(tmp_path, name, version)
    assert gpu_wheels.problems(tmp_path) == []
    wheel(tmp_path, "drip-needy", "1.0", ("numpy>=1.24", "shapely>=2", 'backport-thing; python_version < "3.10"'))
    assert gpu_wheels.problems(tmp_path) == [
        "drip_needy-1.0-py3-none-any.whl needs shapely>=2, which is neither in "
        f"{tmp_path} nor on the device (DEVICE_HAS)"]  # numpy is there, the backport is for old Pythons
    (tmp_path / "drip_needy-1.0-py3-none-any.whl").unlink()
    wheel(tmp_path, "pycocotools", "2.0.8")
    (tmp_path / "google_crc32c-1.9.0-py3-none-any.whl").unlink()
    found = gpu_wheels.problems(tmp_path)
    assert any("2 versions of pycocotools" in line for line in found), found
    assert any(line.endswith("google-crc32c==1.9.0 is missing") for line in found), found


def test_the_wheels_are_drips_pins():
    """A package pinned in requirements.txt travels at that version."""
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        spec = line.split("#")[0].strip()
        if "==" in spec:
            name, version = spec.split("==")
            pins[gpu_wheels.normalised(name)] = version.strip()
    carried = dict(spec.split("==") for spec in gpu_wheels.WHEELS)
    both = {gpu_wheels.normalised(n) for n in carried} & set(pins)
    assert {"albumentations", "transformers"} <= both
    for name, version in carried.items():
        if gpu_wheels.normalised(name) in pins:
            assert version == pins[gpu_wheels.normalised(name)], name


@pytest.mark.parametrize("name", ["torch", "torchvision", "numpy", "scipy", "opencv-python-headless"])
def test_what_the_device_has_is_not_carried(name):
    """torch and friends are on the device (and far over the 64 MiB that travels)."""
    assert name in gpu_wheels.DEVICE_HAS
    assert all(gpu_wheels.normalised(spec.split("==")[0]) != name for spec in gpu_wheels.WHEELS)
