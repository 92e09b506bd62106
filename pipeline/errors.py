"""Errors a user can act on: each names the file, the line and the key path at fault.

`HeedfulError` (alias `UserError`) and its subclasses are *known* errors: the CLI prints
their message alone, without a traceback, and a stage that raises one is reported by the
runner as that message (the traceback still goes to the stage's log file). Anything else
is unexpected: a one-line summary plus where the full traceback was written.
"""

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
    """Base class for errors heedful reports without a traceback (the user can fix them)."""


#: the name the docs use: an error the user can fix (bad config, bad data, missing model ...)
UserError = HeedfulError


class ConfigError(HeedfulError):
    """A pipeline or stage config is invalid; nothing has run."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class DataError(HeedfulError):
    """An input data file is malformed (names file, line and field).

    `problems` lists every bad input when a whole pipeline was checked at once.
    """

    def __init__(self, message: str, problems: list[Problem] | None = None):
        self.problems = problems or []
        super().__init__(message)


class StageFailed(HeedfulError):
    """A stage raised; carries the stage name so the driver can say which."""

    def __init__(self, stage: str, message: str):
        self.stage = stage
        super().__init__(f"stage '{stage}' failed: {message}")


def is_user_error(exc: BaseException) -> bool:
    """Known, user-fixable errors: heedful's own classes and any exception marked `user_error = True`
    (e.g. `pipeline.models.ModelUnavailable`)."""
    return isinstance(exc, HeedfulError) or bool(getattr(exc, "user_error", False))
