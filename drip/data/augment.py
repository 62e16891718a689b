"""Augmentation policies: the user-edited YAML file that lists the albumentations transforms.

A policy (``files/augmentations.yaml`` by default; Drip ships the same content as
``drip/data/policies/default.yaml`` and uses it when that file is missing) looks like::

    bbox:
      min_visibility: 0.3
      min_area: 16
    transforms:
      - HorizontalFlip: {p: 0.5}
      - OneOf:
          p: 0.2
          transforms:
            - GaussianBlur: {blur_limit: [3, 5]}
            - GaussNoise: {std_range: [0.02, 0.06]}

``load_policy`` reads the file and builds it once, so a misspelt transform, an unknown or invalid
argument or broken YAML stops the run before any image is touched, with the file, line and fix in
one line. ``Policy.build`` turns it into an ``A.Compose`` that carries Pascal VOC boxes. Reads
only the policy file; writes nothing.
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import os
import random
import sys
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from .. import console
from ..config import Config
from ..errors import ConfigError

DEFAULT_POLICY_PATH = Path(Config.fields()["augmentation_policy"].default)
BUILTIN_SOURCE = "drip/data/policies/default.yaml (built-in)"

# Box settings a policy may change. Format, label fields and clipping are Drip's: every stage
# exchanges Pascal VOC pixel boxes, and a box sticking out of the image is clipped, not an error.
_BBOX_LIMITS = {
    "min_visibility": (0.0, 1.0),
    "min_area": (0.0, None),
    "min_width": (0.0, None),
    "min_height": (0.0, None),
}

# Names exported by albumentations that are base classes or need Python callables, not
# transforms a YAML file can configure.
_NOT_CONFIGURABLE = {
    "BaseCompose", "BasicTransform", "DualTransform", "ImageOnlyTransform", "Transform3D",
    "Compose", "ReplayCompose", "Lambda",
}


def albumentations():
    """The albumentations module, imported without its update check.

    The check is a synchronous web request on every import (in every worker process too); Drip
    runs offline in containers, where it would only add seconds and a warning.
    """
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    # albumentations imports its optional PyTorch helpers (and so PyTorch, ~3.5 s of CPU in
    # every augment worker) inside suppress(ImportError); Drip never uses them.
    sys.modules.setdefault("albumentations.pytorch", None)
    import albumentations as A

    return A


@lru_cache(maxsize=None)
def transform_registry() -> dict[str, type]:
    """Every transform a policy may name, by class name."""
    A = albumentations()
    from albumentations.core.composition import BaseCompose
    from albumentations.core.transforms_interface import BasicTransform

    return {
        name: obj
        for name, obj in sorted(vars(A).items())
        if inspect.isclass(obj)
        and issubclass(obj, (BasicTransform, BaseCompose))
        and name not in _NOT_CONFIGURABLE
    }


@dataclass
class Policy:
    """A checked policy file. Plain data, so it travels to worker processes as is."""

    source: str  # the file it came from, named in every message and in session.json
    text: str  # the YAML as read, for line numbers in messages
    bbox: dict[str, float]
    transforms: list[Any]  # the 'transforms:' list as written
    sha256: str = field(default="")
    path: Path | None = None  # the file read; None for the built-in policy

    def build(self, seed: int | None = None):
        """An ``A.Compose`` of the transforms that carries boxes given as ``bboxes=`` (Pascal VOC
        pixels) with their ``object_ids=``; seeded with ``seed`` (see ``reseed``)."""
        A = albumentations()
        transforms = self._make_list(self.transforms, ("transforms",))
        bbox = dict(self.bbox)
        # albumentations 2.0's bbox-safe crops fail ("x_min < x_max") on a box under a pixel
        # wide; such a box is no object to learn from anyway, so one pixel is the floor.
        for side in ("min_width", "min_height"):
            bbox[side] = max(1.0, float(bbox.get(side, 0.0)))
        params = A.BboxParams(
            format="pascal_voc",
            label_fields=["object_ids"],
            clip=True,
            filter_invalid_bboxes=True,
            **bbox,
        )
        try:
            compose = A.Compose(transforms, bbox_params=params)
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"{self.source}: the transforms cannot be combined ({_one_line(exc)}); fix the policy"
            ) from None
        reseed(compose, seed)
        return compose

    # -- building, with messages that point into the file ------------------------------------
    def _make_list(self, items: Any, path: tuple) -> list:
        if not isinstance(items, list):
            raise ConfigError(
                f"{self._where(path)}: 'transforms' must be a list of '- TransformName: {{p: 0.5}}' entries"
            )
        return [self._make(item, path + (i,)) for i, item in enumerate(items)]

    def _make(self, item: Any, path: tuple):
        if isinstance(item, str):
            name, args = item, {}
        elif isinstance(item, dict) and len(item) == 1:
            name, args = next(iter(item.items()))
            args = {} if args is None else args
        else:
            raise ConfigError(
                f"{self._where(path)}: expected one '- TransformName: {{p: 0.5, ...}}' entry, found {item!r}"
            )
        registry = transform_registry()
        if name not in registry:
            raise ConfigError(
                f"{self._where(path)}: unknown transform {name!r}; {_suggest_transform(str(name), registry)}"
            )
        if not isinstance(args, dict):
            raise ConfigError(
                f"{self._where(path)}: arguments of {name} must be a mapping like {{p: 0.5}}, found {args!r}"
            )
        cls = registry[name]
        accepted = [
            p.name
            for p in inspect.signature(cls).parameters.values()
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        ]
        for arg in args:
            if arg not in accepted:
                # albumentations 2.x only warns about an unknown argument and ignores it; a policy
                # setting that silently does nothing (often a 1.x name) is worse than an error.
                close = difflib.get_close_matches(str(arg), accepted, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"it takes {', '.join(accepted)}"
                raise ConfigError(f"{self._where(path)}: {name} has no argument {arg!r}; {hint}")
        args = dict(args)
        if "transforms" in accepted and "transforms" in args:
            args["transforms"] = self._make_list(args["transforms"], path + (name, "transforms"))
        try:
            return cls(**args)
        except (TypeError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
            raise ConfigError(f"{self._where(path)}: invalid arguments for {name}: {_one_line(exc)}") from None

    def _where(self, path: tuple) -> str:
        dotted = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
        line = _line_of(self.text, path)
        return f"{self.source} line {line} ({dotted})" if line else f"{self.source} ({dotted})"


def reseed(compose, seed: int | None) -> None:
    """Give every transform in ``compose`` one shared random stream started from ``seed``.

    ``A.Compose(seed=...)`` and ``set_random_seed`` seed each transform with the same number, so
    two transforms with the same ``p`` are applied together or not at all (a flip always comes
    with a brightness change). One stream shared in order keeps their choices independent.
    """
    import numpy as np

    compose.set_random_state(np.random.default_rng(seed), random.Random(seed))


def load_policy(path: Path | None) -> Policy:
    """Read and check a policy file; None, or the default path when it is missing, gives the
    policy packaged with Drip."""
    if path is not None:
        path = Path(path)
        if not path.exists():
            if path == DEFAULT_POLICY_PATH:
                console.info(
                    f"{path} not found; using Drip's built-in augmentation policy "
                    f"({_builtin_path()}); copy it to {path} to edit it"
                )
                path = None
            else:
                raise ConfigError(
                    f"{path}: augmentation policy not found; check --augmentation_policy or "
                    f"leave it out to use {DEFAULT_POLICY_PATH} (or the built-in policy)"
                )
    if path is None:
        text = resources.files("drip.data.policies").joinpath("default.yaml").read_text(encoding="utf-8")
        source = BUILTIN_SOURCE
    else:
        if path.is_dir():
            raise ConfigError(f"{path}: is a folder; --augmentation_policy must name a YAML file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not UTF-8 text; save the augmentation policy as UTF-8") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the augmentation policy ({exc.strerror})") from None
        source = str(path)
    policy = parse_policy(text, source)
    policy.path = None if path is None else path.resolve()
    return policy


def parse_policy(text: str, source: str) -> Policy:
    """Check policy ``text`` read from ``source`` completely, by building it once."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise ConfigError(f"{source}{where}: not valid YAML ({problem}); fix that line") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected 'bbox:' and 'transforms:' sections, found {type(data).__name__}; "
            f"see {_builtin_path()}"
        )
    for key in data:
        if key not in ("bbox", "transforms"):
            close = difflib.get_close_matches(str(key), ["bbox", "transforms"], n=1)
            hint = f"did you mean {close[0]!r}?" if close else "a policy has only 'bbox:' and 'transforms:'"
            raise ConfigError(f"{source} line {_line_of(text, (key,))}: unknown section {key!r}; {hint}")
    if "transforms" not in data:
        raise ConfigError(f"{source}: no 'transforms:' list; add one (see {_builtin_path()})")
    policy = Policy(
        source=source,
        text=text,
        bbox=_check_bbox(data.get("bbox"), text, source),
        transforms=data["transforms"],
        sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        policy.build(seed=0)
    # The library corrects some values itself (an even blur kernel, say); say so once here
    # rather than from every worker process.
    for message in dict.fromkeys(" ".join(str(w.message).split()) for w in caught):
        console.warn(f"{source}: {message}")
    return policy


def _suggest_transform(name: str, registry: dict[str, type]) -> str:
    """'did you mean ...?' for a misspelt (or miscased, or shortened) transform name."""
    by_lower = {known.lower(): known for known in registry}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.6)
    if close:
        return f"did you mean {by_lower[close[0]]!r}?"
    # "Flip" or "Noise" is far, as a string, from "HorizontalFlip" or "GaussNoise".
    containing = [known for low, known in by_lower.items() if name.lower() in low][:3]
    if containing:
        return "did you mean " + " or ".join(repr(c) for c in containing) + "?"
    return "see https://albumentations.ai/docs/api-reference/ for the names"


def _check_bbox(bbox: Any, text: str, source: str) -> dict[str, float]:
    if bbox is None:
        return {}
    if not isinstance(bbox, dict):
        raise ConfigError(f"{source} line {_line_of(text, ('bbox',))}: 'bbox:' must hold 'key: value' lines")
    out = {}
    for key, value in bbox.items():
        where = f"{source} line {_line_of(text, ('bbox', key))}"
        if key not in _BBOX_LIMITS:
            close = difflib.get_close_matches(str(key), list(_BBOX_LIMITS), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(_BBOX_LIMITS)}"
            raise ConfigError(f"{where}: unknown bbox setting {key!r}; {hint}")
        low, high = _BBOX_LIMITS[key]
        if (
            not isinstance(value, (int, float))
            or isinstance(value, bool)
            or value < low
            or (high is not None and value > high)
        ):
            expected = f"a number from {low:g} to {high:g}" if high is not None else f"a number >= {low:g}"
            raise ConfigError(f"{where}: bbox {key} {value!r} must be {expected}")
        out[key] = float(value)
    return out


def _line_of(text: str, path: tuple) -> int | None:
    """1-based line of the YAML node at ``path`` (keys and list indices), or of its deepest
    ancestor found; None when the text does not parse."""
    import yaml

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    line = None
    for step in path:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            matches = [(k, v) for k, v in node.value if k.value == step]
            if not matches:
                break
            key, node = matches[0]
            line = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(step, int) and step < len(node.value):
            node = node.value[step]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _one_line(exc: Exception) -> str:
    """A library error condensed to one line; pydantic errors as 'field: problem; ...'."""
    # albumentations re-raises pydantic's ValidationError as a ValueError of its multi-line text.
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    errors = getattr(cause, "errors", None)
    if callable(errors):
        try:
            items = errors()
        except Exception:  # not pydantic after all
            items = None
        if items:
            by_field: dict[str, list[str]] = {}
            values: dict[str, Any] = {}
            for item in items:
                loc = item.get("loc") or ("arguments",)
                name = str(loc[0])
                if item.get("type") == "missing":
                    by_field.setdefault(name, []).append("required, add it")
                    continue  # pydantic's "input" here is every argument, not this one
                msg = str(item.get("msg", "")).removeprefix("Value error, ")
                by_field.setdefault(name, []).append(msg)
                values.setdefault(name, item.get("input"))
            return "; ".join(
                (f"{name}={values[name]!r}" if name in values else name)
                + f": {' or '.join(dict.fromkeys(msgs))}"
                for name, msgs in by_field.items()
            )
    return " ".join(str(exc).split())


def _builtin_path() -> str:
    return str(resources.files("drip.data.policies").joinpath("default.yaml"))
