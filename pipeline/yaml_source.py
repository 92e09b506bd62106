"""YAML loading that remembers where each key came from, so errors can cite a line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, Problem

KeyPath = tuple[str | int, ...]


def format_key_path(path: KeyPath) -> str:
    """('stages', 2, 'with', 'beta') -> 'stages[2].with.beta'."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


class YamlSource:
    """Parsed YAML data plus a map from key path to 1-based line number."""

    def __init__(self, data: Any, lines: dict[KeyPath, int], file: str):
        self.data = data
        self.lines = lines
        self.file = file

    @classmethod
    def load(cls, path: str | Path) -> YamlSource:
        path = Path(path)
        if not path.is_file():
            raise ConfigError([Problem(str(path), None, "", "file not found")])
        return cls.parse(path.read_text(encoding="utf-8"), str(path))

    @classmethod
    def parse(cls, text: str, file: str) -> YamlSource:
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark is not None else None
            reason = getattr(exc, "problem", None) or str(exc)
            raise ConfigError([Problem(file, line, "", f"invalid YAML: {reason}")]) from None
        lines: dict[KeyPath, int] = {}
        if node is not None:
            _index(node, (), lines)
        return cls(data, lines, file)

    def line_of(self, path: KeyPath) -> int | None:
        """Line of the deepest known prefix of `path` (a missing key points at its parent)."""
        for end in range(len(path), -1, -1):
            line = self.lines.get(tuple(path[:end]))
            if line is not None:
                return line
        return None

    def problem(self, path: KeyPath, message: str) -> Problem:
        return Problem(self.file, self.line_of(path), format_key_path(path), message)


def _index(node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int]) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            lines[path + (key,)] = key_node.start_mark.line + 1
            _index(value_node, path + (key,), lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index(item, path + (i,), lines)
