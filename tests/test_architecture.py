"""The tree shows the architecture: imports run down the layers, with no cycle, and the wheel
holds every package.

The layers, from the top (a module imports only from its own layer or below):

    entry points   drip.cli, drip.launcher, drip.__main__ (and the starters)
    runtimes       drip.runtime.*
    stages         drip.stages.*
    packages       drip.training.*, drip.evaluation.*, drip.deploy.*
                   drip.detectors.*
                   drip.data.*
    basics         drip (its __init__), drip.config, drip.session, drip.errors, drip.console,
                   drip.parallel, drip.stops

Imports made inside functions count: they are the same dependency, taken later. The graph is
read from the source with ``ast``, so these tests import nothing of Drip's and take a second.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "drip"

BASICS = {"drip", "drip.config", "drip.session", "drip.errors", "drip.console", "drip.parallel", "drip.stops"}
ENTRY_POINTS = {"drip.cli", "drip.launcher", "drip.__main__"}
# Layer of each package; the packages on one line of the docstring share a number.
LAYERS = {
    "basics": 0,
    "drip.data": 1,
    "drip.detectors": 2,
    "drip.training": 3, "drip.evaluation": 3, "drip.deploy": 3,
    "drip.stages": 4,
    "drip.runtime": 5,
    "entry points": 6,
}
# The host side: what the starters and ``drip doctor`` import before any container starts. It must
# start on a machine without PyTorch (and answer --help at once).
HOST_SIDE = ("drip.launcher", "drip.cli", "drip.runtime.docker", "drip.runtime.relay", "drip.runtime.torchrun")
MAX_LOOSE_MODULES = 10


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def import_graph(modules: dict[str, Path] | None = None) -> dict[str, set[str]]:
    """Each Drip module -> the Drip modules it imports, anywhere in its body."""
    modules = modules if modules is not None else _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # ``from pkg import module`` depends on that module; ``from module import name`` on
                # the module.
                targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                           for alias in node.names]
            else:
                continue
            for target in targets:
                # ``import drip.data.tiling`` names a module; keep the longest name that is one.
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    found.add(target)
        graph[name] = found
    return graph


def layer_of(module: str) -> tuple[str, int]:
    """(the layer's name, its height) of a Drip module."""
    if module in BASICS:
        return "basics", LAYERS["basics"]
    if module in ENTRY_POINTS:
        return "entry points", LAYERS["entry points"]
    package = ".".join(module.split(".")[:2])
    if package in LAYERS:
        return package, LAYERS[package]
    raise AssertionError(
        f"{module} has no layer: put it in a package (tests/test_architecture.py lists them), or add it "
        "to BASICS or ENTRY_POINTS there"
    )


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None (depth-first search, iterative)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_every_module_has_a_layer():
    for module in _modules():
        layer_of(module)


def test_no_import_runs_up_the_layers():
    graph = import_graph()
    upward = []
    for module, targets in sorted(graph.items()):
        name, height = layer_of(module)
        for target in sorted(targets):
            target_name, target_height = layer_of(target)
            if target_height > height:
                upward.append(f"{module} ({name}) imports {target} ({target_name})")
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def test_no_import_cycle_between_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_between_packages():
    """Packages on one layer may use each other one way only (training and deploy use
    evaluation, never the reverse), so each can be read, tested and changed above the other."""
    packages: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        name = layer_of(module)[0] if module not in BASICS | ENTRY_POINTS else module
        for target in targets:
            other = layer_of(target)[0] if target not in BASICS | ENTRY_POINTS else target
            if other != name:
                packages.setdefault(name, set()).add(other)
        packages.setdefault(name, set())
    cycle = find_cycle(packages)
    assert cycle is None, "packages import each other: " + " -> ".join(cycle)


def test_the_checks_catch_what_they_are_for(tmp_path):
    """The graph reader sees imports inside functions and relative ones, and both checks fire."""
    pkg = tmp_path / "drip"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "data" / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "data" / "b.py").write_text("from ..data.a import f\nfrom .. import cli\n")
    (pkg / "cli.py").write_text("import drip.data.a\n")
    modules = {
        ".".join(p.relative_to(tmp_path).with_suffix("").parts).removesuffix(".__init__"): p
        for p in pkg.rglob("*.py")
    }
    graph = import_graph(modules)
    assert graph["drip.data.a"] == {"drip.data.b"}
    assert graph["drip.data.b"] == {"drip.data.a", "drip.cli"}
    assert graph["drip.cli"] == {"drip.data.a"}
    assert find_cycle(graph) in (["drip.cli", "drip.data.a", "drip.data.b", "drip.cli"],
                                 ["drip.data.a", "drip.data.b", "drip.data.a"])
    assert layer_of("drip.cli")[1] > layer_of("drip.data.b")[1]  # so b -> cli runs up
    with pytest.raises(AssertionError, match="drip.stray has no layer"):
        layer_of("drip.stray")


def test_few_modules_loose_at_the_top():
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(loose) <= MAX_LOOSE_MODULES, f"{len(loose)} modules at the top of drip/: {loose}"


# Stand-ins for the heavy packages: importing any of them fails, as on a host without them.
NO_HEAVY = (
    "import sys\n"
    "for m in ('torch', 'torchvision', 'numpy', 'PIL', 'cv2', 'albumentations', 'yaml', 'tensorboard',\n"
    "          'transformers', 'onnxruntime', 'pycocotools', 'matplotlib'):\n"
    "    sys.modules[m] = None\n"
    "import importlib\n"
    "for name in sys.argv[1:]:\n"
    "    importlib.import_module(name)\n"
)


def test_the_host_side_imports_no_heavy_package():
    out = subprocess.run([sys.executable, "-c", NO_HEAVY, *HOST_SIDE], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr


@pytest.mark.slow
def test_a_wheel_from_a_clean_checkout_holds_every_package(tmp_path):
    """What git tracks, built into a wheel: every package under drip/ and the built-in policy."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    if not tracked:
        pytest.skip("not a git checkout")
    src = tmp_path / "src"
    for name in tracked.decode().split("\0"):
        if name and (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((ROOT / name).read_bytes())
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
         str(src)],
        check=True, capture_output=True, text=True,
    )
    (wheel,) = (tmp_path / "dist").glob("drip-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {p.relative_to(src).as_posix() for p in (src / "drip").rglob("__init__.py")}
    assert packages, "no packages found in the checkout"
    missing = sorted(packages - names)
    assert not missing, f"packages missing from the wheel: {missing}"
    modules = {p.relative_to(src).as_posix() for p in (src / "drip").rglob("*.py")}
    assert not sorted(modules - names), f"modules missing from the wheel: {sorted(modules - names)}"
    assert "drip/data/policies/default.yaml" in names
