"""What every benchmark script shares: the machine it ran on, timing, and how it reports.

Each script in ``bench/`` measures Drip against a baseline side by side in one run and prints
ratios, so the figures hold on any machine; the machine line says which one it was, and the load
average says whether other work was running (a ratio taken under load is noisier, not biased
towards either side, since both sides run under the same load one after the other).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from drip.parallel import cores  # noqa: E402  (after the sys.path line above)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str | None = None) -> dict[str, Any]:
    """The machine, the software and how busy the machine was when the run started."""
    info: dict[str, Any] = {
        "cpu": cpu_name(),
        "cores": cores(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }
    try:
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
            info["bf16"] = torch.cuda.is_bf16_supported()
    except ImportError:
        pass
    if device is not None:
        info["device"] = device
    return info


def under_load(info: dict[str, Any]) -> bool:
    """Whether other work was running: a 1-minute load average above half the cores."""
    return info.get("load_average_1m", 0.0) > 0.5 * info["cores"]


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a fast check that the script works: small sizes, few repeats")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    p.add_argument("--workdir", metavar="PATH", help="where to write the synthetic data (default: a temporary folder)")
    return p


def report(name: str, info: dict[str, Any], figures: dict[str, Any], lines: list[str], json_path: str | None) -> None:
    """Print the machine and the figures; write them as JSON too when asked."""
    load = info.get("load_average_1m")
    busy = " (UNDER LOAD: other work was running; re-run on a quiet machine)" if under_load(info) else ""
    gpu = f", GPU {info['gpu']}" if "gpu" in info else ", no GPU"
    print(f"# {name}")
    print(f"machine: {info['cpu']}, {info['cores']} cores{gpu}; load average {load}{busy}")
    print(f"software: Python {info['python']}, torch {info.get('torch', '-')}, {info['platform']}")
    for line in lines:
        print(line)
    if json_path:
        Path(json_path).write_text(json.dumps({"benchmark": name, "machine": info, **figures}, indent=2) + "\n")


class Timer:
    """``with Timer() as t: ...``; ``t.seconds`` afterwards."""

    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


def median(values) -> float:
    return statistics.median(values) if values else float("nan")
