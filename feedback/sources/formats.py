"""Which feedback format a file holds, decided once from its first row, for every reader.

Formats (names used by the readers, the Argilla bridge and error messages):
- `qa_feedback`: FineGrainedRLHF's `question`, `passages`, `prediction 1..4`, `feedback`,
  `preference` (the last two may be Python-literal strings);
- `clariq`: `initial_request`, `question`, `answer` (+ `facet_id`);
- a heedful record kind (`pipeline.schema.KINDS`: reactions, verbal_feedback, span_feedback,
  preferences, followups) when the row's `kind` says so;
- `trl_preferences`: TRL's `prompt`, `chosen`, `rejected`;
- `span_feedback` / `verbal_feedback` without a `kind`: rows with `spans` / `critique`;
- `logs`: production logs with a `reaction` and a `reply` (or `response`);
- `responses`: `prompt` + `response` (the `generate` stage's rows);
- `unknown` otherwise.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

from pipeline.errors import DataError
from pipeline.records import load_rows
from pipeline.schema import KINDS, Provenance

RECORD_KINDS = {cls.model_fields["kind"].default: kind for kind, cls in KINDS.items()}  # "span" -> "span_feedback"


def detect_format(row: dict[str, Any]) -> str:
    if "prediction 1" in row and "feedback" in row:
        return "qa_feedback"
    if {"initial_request", "question", "answer"} <= set(row):
        return "clariq"
    if row.get("kind") in RECORD_KINDS:
        return RECORD_KINDS[row["kind"]]
    if "chosen" in row and "rejected" in row:
        return "trl_preferences"
    if "spans" in row:
        return "span_feedback"
    if "critique" in row:
        return "verbal_feedback"
    if "reaction" in row and ("reply" in row or "response" in row):
        return "logs"
    if "prompt" in row and "response" in row:
        return "responses"
    return "unknown"


def load_feedback(path: Path) -> tuple[str, list[dict[str, Any]]]:
    """The rows of a feedback file and their format; an unrecognised format is an error."""
    rows = load_rows(path, what="feedback")
    if not rows:
        raise DataError(f"{path}: no rows")
    fmt = detect_format(rows[0])
    if fmt == "unknown":
        raise DataError(
            f"{path} row 0: unrecognised feedback format (fields: {', '.join(sorted(rows[0]))}); see "
            "feedback/sources/formats.py for the accepted formats"
        )
    return fmt, rows


def literal(value: Any, where: str, field: str) -> Any:
    """A field that may hold a Python-literal string (qa-feedback's released format)."""
    if isinstance(value, str):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError) as exc:
            raise DataError(f"{where}: field '{field}' is not a Python literal ({exc})") from None
    return value


def provenance(source: str, dataset: str, i: int, **extra: Any) -> Provenance:
    return Provenance(source=source, dataset=dataset, record_id=str(i), extra=json.dumps(extra) if extra else "{}")
