"""Errors a user can act on: each names the file, the line and the key path at fault."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input file."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class HeedfulError(Exception):
    """Base class for errors heedful reports without a traceback."""


class ConfigError(HeedfulError):
    """A pipeline or stage config is invalid; nothing has run."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class DataError(HeedfulError):
    """An input data file is malformed (names file, line and field)."""


class StageFailed(HeedfulError):
    """A stage raised; carries the stage name so the driver can say which."""

    def __init__(self, stage: str, message: str):
        self.stage = stage
        super().__init__(f"stage '{stage}' failed: {message}")
