#!/usr/bin/env python3
"""Wheels for a GPU machine that cannot reach a package index: what Drip needs beyond what its
Python already has, downloaded here for that Python, to travel with the working tree.

    python3 scripts/gpu_wheels.py                  # into .gpu-wheels/ (git ignores it)
    python3 scripts/gpu_wheels.py --check DIR      # only check a folder made earlier
    scripts/gpu_checks.sh --wheels .gpu-wheels     # there: installs them, then runs the checks

The machine lent for GPU checks (an H100 or H200, no internet) has Python 3.12 with PyTorch,
torchvision, OpenCV, SciPy, NumPy, Pillow, lxml, TensorBoard, Matplotlib, ONNX Runtime (CPU) and
pytest (``DEVICE_HAS``), and an older transformers; it lacks albumentations, pycocotools and
google-crc32c. ``WHEELS`` are those, Drip's pinned transformers, and what they need that the
machine lacks, at the versions Drip's tests run with. The check refuses a folder where a wheel
needs a package that is neither in it nor on the machine, or that is larger than what travels.
Standard library only, plus ``packaging`` for the markers (pip vendors it; so does the device).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WHEELS = (
    "albumentations==2.0.8",  # requirements.txt's pin
    "albucore==0.0.24",  # albumentations 2.0.8 pins it
    "stringzilla==5.3.2", "simsimd==6.5.16",  # albucore's
    "pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0", "typing-inspection==0.4.5",
    "typing-extensions==4.16.0",  # pydantic 2.14 needs a newer one than some images hold
    "pycocotools==2.0.11",  # the COCO evaluator
    "google-crc32c==1.9.0",  # TFRecord checksums
    "transformers==5.22.2",  # requirements.txt's pin (the device has 5.17): D-FINE, RT-DETRv2
    "docker==7.2.0",  # the host side's Docker SDK
)

# What the device's Python holds already (.library/device/KINDS.md, read 2026-11-17), by
# normalised name: a wheel's needs among these travel no further.
DEVICE_HAS = frozenset("""
torch torchvision numpy scipy pillow opencv-python-headless lxml tensorboard matplotlib onnx onnxruntime protobuf
pyyaml tqdm packaging regex safetensors tokenizers huggingface-hub typer filelock fsspec requests jinja2 networkx
sympy triton pytest pytest-timeout hypothesis typing-extensions urllib3
""".split())

PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
LIMIT_MIB = 40  # the device tool carries 64 MiB with the tree (about 4 MiB) and what else a run needs


def normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def download(folder: Path, python_version: str = PYTHON_VERSION) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", python_version, "--implementation", "cp", *platforms, "-d", str(folder),
                    *WHEELS], check=True)


def requirements(wheel: Path) -> list[str]:
    """The wheel's Requires-Dist lines (its METADATA)."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode("utf-8", "replace")
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def problems(folder: Path, python_version: str = PYTHON_VERSION) -> list[str]:
    """What is wrong with ``folder`` as the device's wheels (empty: nothing)."""
    from packaging.requirements import Requirement

    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        return [f"{folder}: no wheels; run python3 scripts/gpu_wheels.py first"]
    carried: dict[str, list[str]] = {}
    for w in wheels:
        carried.setdefault(normalised(w.name.split("-")[0]), []).append(w.name)
    found = [f"{folder}: {len(names)} versions of {name} ({', '.join(names)}): pip refuses to install both"
             for name, names in carried.items() if len(names) > 1]
    found += [f"{folder}: {spec} is missing" for spec in WHEELS if normalised(spec.split("==")[0]) not in carried]
    env = {"python_version": python_version, "python_full_version": f"{python_version}.0", "extra": "",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "os_name": "posix"}
    for w in wheels:
        for line in requirements(w):
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            name = normalised(req.name)
            if name not in carried and name not in DEVICE_HAS:
                found.append(f"{w.name} needs {req}, which is neither in {folder} nor on the device (DEVICE_HAS)")
    size = sum(w.stat().st_size for w in wheels) / 2**20
    if size > LIMIT_MIB:
        found.append(f"{folder}: {size:.1f} MiB of wheels, more than the {LIMIT_MIB} MiB that can travel with the tree")
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", nargs="?", default=str(ROOT / ".gpu-wheels"))
    p.add_argument("--check", action="store_true", help="only check the folder, download nothing")
    p.add_argument("--python-version", default=PYTHON_VERSION, help="the device's Python (default: %(default)s)")
    args = p.parse_args(argv)
    folder = Path(args.folder)
    if not args.check:
        download(folder, args.python_version)
    found = problems(folder, args.python_version)
    for line in found:
        print(f"gpu_wheels.py: {line}", file=sys.stderr)
    if not found:
        size = sum(w.stat().st_size for w in folder.glob("*.whl")) / 2**20
        print(f"gpu_wheels.py: {len(list(folder.glob('*.whl')))} wheels, {size:.1f} MiB in {folder}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
