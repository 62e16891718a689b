"""Class ids and names, read from and written to TF label-map text (``class_map.pbtxt``)::

    item {
      id: 1
      name: 'circle'
    }

Ids are 1-based as in the TF Object Detection API; 0 is the background class of torchvision's
detectors. Standard library only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<comment>\#[^\n]*)
      | (?P<brace>[{}])
      | (?P<key>[A-Za-z_][A-Za-z0-9_]*)\s*:?
      | (?P<string>'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*")
      | (?P<number>-?\d+)
    )""",
    re.VERBOSE,
)


@dataclass(frozen=True)
class LabelMap:
    """Class names in id order: ``names[0]`` has id 1."""

    names: tuple[str, ...]

    @classmethod
    def from_names(cls, names) -> "LabelMap":
        return cls(tuple(names))

    @property
    def ids(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names, start=1)}

    def name_of(self, class_id: int) -> str:
        return self.names[class_id - 1]

    def __len__(self) -> int:
        return len(self.names)

    def to_text(self) -> str:
        items = []
        for i, name in enumerate(self.names, start=1):
            escaped = name.translate(_ESCAPE)
            items.append(f"item {{\n  id: {i}\n  name: '{escaped}'\n}}\n")
        return "\n".join(items)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_text(), encoding="utf-8")

    @classmethod
    def read(cls, path: Path) -> "LabelMap":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise InputError(f"{path}: label map not found; check --class_map_path") from None
        except UnicodeDecodeError:
            raise InputError(f"{path}: not UTF-8 text; save the label map as UTF-8") from None
        return cls.parse(text, str(path))

    @classmethod
    def parse(cls, text: str, source: str = "label map") -> "LabelMap":
        items = _parse_items(text, source)
        if not items:
            raise InputError(f"{source}: no 'item {{ id: N name: ... }}' entries; add one per class")
        by_id: dict[int, str] = {}
        for line, item in items:
            if "id" not in item or "name" not in item:
                raise InputError(f"{source} line {line}: an item needs both 'id' and 'name'")
            class_id, name = item["id"], item["name"]
            if not isinstance(class_id, int) or class_id < 1:
                raise InputError(f"{source} line {line}: id {class_id!r} must be an integer >= 1")
            if not isinstance(name, str) or not name.strip():
                raise InputError(f"{source} line {line}: name {name!r} must be a non-empty quoted string, e.g. name: 'cat'")
            if class_id in by_id:
                raise InputError(f"{source} line {line}: id {class_id} is used twice; ids must be unique")
            if name in by_id.values():
                raise InputError(f"{source} line {line}: name {name!r} is used twice; names must be unique")
            by_id[class_id] = name
        expected = list(range(1, len(by_id) + 1))
        if sorted(by_id) != expected:
            raise InputError(
                f"{source}: ids {sorted(by_id)} must run 1..{len(by_id)} without gaps; renumber them"
            )
        return cls(tuple(by_id[i] for i in expected))


def _parse_items(text: str, source: str) -> list[tuple[int, dict]]:
    """Parse ``item { key: value ... }`` blocks into (line, fields) pairs."""
    items: list[tuple[int, dict]] = []
    pos, current, key, item_line = 0, None, None, 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        line = text.count("\n", 0, pos) + 1
        if not match:
            raise InputError(f"{source} line {line}: cannot read {text[pos:pos + 20].strip()!r}")
        pos = match.end()
        kind = match.lastgroup
        value = match.group(kind)
        if kind == "comment":
            continue
        if current is None:
            if kind == "key" and value == "item":
                continue
            if kind == "brace" and value == "{":
                current, item_line = {}, line
                continue
            raise InputError(f"{source} line {line}: expected 'item {{', found {value!r}")
        if kind == "brace" and value == "}":
            if key is not None:
                raise InputError(f"{source} line {line}: {key!r} has no value")
            items.append((item_line, current))
            current = None
        elif kind == "key" and key is None:
            key = value
        elif kind in ("string", "number") and key is not None:
            current[key] = _unquote(value) if kind == "string" else int(value)
            key = None
        else:
            raise InputError(f"{source} line {line}: unexpected {value!r}")
    if current is not None:
        raise InputError(f"{source}: an 'item {{' is never closed; add '}}'")
    return items


# A string token cannot span lines, so a newline in a name must be written as an escape; these
# are the C escapes TF's text format uses.
_ESCAPE = str.maketrans({"\\": "\\\\", "'": "\\'", "\n": "\\n", "\r": "\\r"})
_UNESCAPE = {"n": "\n", "r": "\r", "t": "\t"}


def _unquote(token: str) -> str:
    body = token[1:-1]
    return re.sub(r"\\(.)", lambda m: _UNESCAPE.get(m.group(1), m.group(1)), body)
