"""Judgment rows for CUT and KTO: instruction, response, judgment (text), positive (bool).

Sources: heedful VerbalFeedback records, any JSONL with those columns (a few common
aliases accepted), and qa-feedback (FineGrainedRLHF), whose human error spans on
`prediction 1` become a written negative judgment and whose `corrected-prediction` becomes
a positive example.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.errors import DataError

from .formats import literal
from .qa_feedback import POSITIVE_JUDGMENT, qa_feedback_judgment


def from_verbal(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """VerbalFeedback rows: 'good' -> positive, 'needs_work' (or no judgment) -> negative."""
    return [
        {
            "id": r["id"],
            "instruction": r["prompt"],
            "response": r["response"],
            "judgment": r["critique"],
            "positive": r.get("judgment") == "good",
        }
        for r in records
    ]


_ALIASES = {
    "instruction": ("instruction", "prompt", "input"),
    "response": ("response", "output", "completion"),
    "judgment": ("judgment", "critique", "feedback"),
}


def normalize(rows: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """Rows from a file: columns by name or alias; `positive` from a bool, a label
    ('positive'/'negative') or a VerbalFeedback-style judgment ('good'/'needs_work')."""
    out = []
    for i, row in enumerate(rows):
        item: dict[str, Any] = {"id": str(row.get("id", i))}
        for field, names in _ALIASES.items():
            value = next((row[n] for n in names if row.get(n) not in (None, "")), None)
            if value is None:
                raise DataError(f"{where} row {i}: field '{field}' is missing (or one of {', '.join(names)})")
            item[field] = value
        item["positive"] = _positive(row, f"{where} row {i}")
        out.append(item)
    return out


def _positive(row: dict[str, Any], where: str) -> bool:
    for key in ("positive", "label", "polarity"):
        if key in row:
            value = row[key]
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("positive", "good", "true", "1"):
                return True
            if str(value).lower() in ("negative", "needs_work", "bad", "false", "0"):
                return False
            raise DataError(f"{where}: field '{key}': expected positive/negative, got {value!r}")
    if row.get("judgment") in ("good", "needs_work") and "critique" in row:
        return row["judgment"] == "good"
    raise DataError(f"{where}: field 'positive' is missing (true/false, or label: positive/negative)")


def from_qa_feedback(
    path: Path, with_passages: bool = False, limit: int | None = None, positives: bool = True
) -> list[dict[str, Any]]:
    """qa-feedback rows -> judgments: prediction 1 with its span judgment (negative), and the
    corrected prediction (positive) when `positives`. `feedback` may be a Python-literal
    string (the released format) or already a dict."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    out: list[dict[str, Any]] = []
    for i, row in enumerate(data[:limit] if limit else data):
        where = f"{path} item {i}"
        for key in ("question", "prediction 1", "feedback"):
            if key not in row:
                raise DataError(f"{where}: field '{key}' is missing")
        feedback = literal(row["feedback"], where, "feedback")
        response = row["prediction 1"]
        for k, err in enumerate(feedback.get("errors", [])):
            if not (0 <= err["start"] < err["end"] <= len(response)):
                raise DataError(f"{where}: feedback.errors[{k}]: span [{err['start']}, {err['end']}) is outside prediction 1")
        instruction = row["question"]
        if with_passages and row.get("passages"):
            context = "\n".join(f"{p[0]}: {' '.join(p[1:])}" for p in row["passages"])
            instruction = f"{instruction}\n\nPassages:\n{context}"
        judgment = qa_feedback_judgment(response, feedback)
        if judgment is None:
            out.append(
                {
                    "id": f"qa{i}",
                    "instruction": instruction,
                    "response": response,
                    "judgment": POSITIVE_JUDGMENT,
                    "positive": True,
                }
            )
        else:
            out.append(
                {"id": f"qa{i}", "instruction": instruction, "response": response, "judgment": judgment, "positive": False}
            )
        corrected = feedback.get("corrected-prediction")
        if positives and corrected and corrected.strip() and corrected.strip() != response.strip():
            out.append(
                {
                    "id": f"qa{i}-corrected",
                    "instruction": instruction,
                    "response": corrected.strip(),
                    "judgment": POSITIVE_JUDGMENT,
                    "positive": True,
                }
            )
    return out
