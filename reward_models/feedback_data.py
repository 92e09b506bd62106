"""Feedback rows in any supported format → heedful records, for training reward models.

Accepted (detected per file from the first row):
- heedful records (`pipeline.schema`: kind reaction / span / preference / followup / verbal);
- production logs: `conversation` (or `prompt`), `reply`, `reaction`, `user_id`, `time`;
- TRL preference rows: `prompt`, `chosen`, `rejected`;
- qa-feedback (FineGrainedRLHF): `question`, `passages`, `prediction 1..4`, `feedback`, `preference`
  (`feedback`/`preference` may be Python-literal strings);
- ClariQ (`initial_request`, `question`, `answer`, `facet_id`): the user's yes/no answer to a
  clarifying question is a real reaction to that system turn (yes → love, no → dislike).
Errors name the file and row.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

from pipeline.errors import DataError
from pipeline.records import load_rows
from pipeline.schema import KINDS, Preference, Provenance, Reaction, SpanFeedback, rows_to_records

RECORD_KINDS = {cls.model_fields["kind"].default: kind for kind, cls in KINDS.items()}  # "span" -> "span_feedback"
_YES = ("yes", "yeah", "yep", "yup", "sure", "correct", "exactly", "right", "absolutely", "definitely", "of course")
_NO = ("no", "nope", "not", "neither", "none", "nothing", "nah", "never", "wrong")


def detect_format(row: dict[str, Any]) -> str:
    if "prediction 1" in row and "feedback" in row:
        return "qa_feedback"
    if {"initial_request", "question", "answer"} <= set(row):
        return "clariq"
    if row.get("kind") in RECORD_KINDS:
        return RECORD_KINDS[row["kind"]]
    if "reaction" in row and ("reply" in row or "response" in row):
        return "logs"
    if {"prompt", "chosen", "rejected"} <= set(row):
        return "trl_preferences"
    return "unknown"


def load_feedback(path: Path) -> tuple[str, list[dict[str, Any]]]:
    rows = load_rows(path, what="feedback")
    if not rows:
        raise DataError(f"{path}: no rows")
    fmt = detect_format(rows[0])
    if fmt == "unknown":
        raise DataError(f"{path} row 0: unrecognised feedback format (fields: {', '.join(sorted(rows[0]))}); see "
                        "reward_models/feedback_data.py for the accepted formats")
    return fmt, rows


def _literal(value: Any, where: str, field: str) -> Any:
    if isinstance(value, str):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError) as exc:
            raise DataError(f"{where}: field '{field}' is not a Python literal ({exc})") from None
    return value


def _prov(source: str, dataset: str, i: int, **extra: Any) -> Provenance:
    return Provenance(source=source, dataset=dataset, record_id=str(i), extra=json.dumps(extra) if extra else "{}")


# ----------------------------------------------------------------------------- qa-feedback


def qa_prompt(row: dict[str, Any]) -> list[dict[str, str]]:
    """The question as a chat prompt; the grounding passages ride along as a system message."""
    passages = row.get("passages") or []
    context = "\n".join(f"wikipage: {p[0]} text: {' '.join(p[1:])}" for p in passages if p)
    messages = [{"role": "system", "content": context}] if context else []
    return messages + [{"role": "user", "content": row["question"]}]


def qa_spans(rows: list[dict[str, Any]], where: str) -> list[SpanFeedback]:
    """Human error spans on `prediction 1` as SpanFeedback records."""
    out = []
    for i, row in enumerate(rows):
        at = f"{where} row {i}"
        feedback = _literal(row["feedback"], at, "feedback")
        if not isinstance(feedback, dict) or "errors" not in feedback:
            raise DataError(f"{at}: field 'feedback' has no 'errors' list")
        response = row["prediction 1"]
        spans = []
        for j, err in enumerate(feedback["errors"]):
            try:
                spans.append({"start": int(err["start"]), "end": int(err["end"]), "label": err["error type"]})
            except (KeyError, TypeError, ValueError):
                raise DataError(f"{at}: feedback.errors[{j}] needs start, end and 'error type'") from None
        try:
            out.append(SpanFeedback(
                id=f"qa-{i}", prompt=qa_prompt(row), response=response, spans=spans,
                corrected_response=feedback.get("corrected-prediction"),
                missing_info=json.dumps(feedback.get("missing-info") or []),
                provenance=_prov("import", where, i),
            ))
        except Exception as exc:
            raise DataError(f"{at}: {exc}") from None
    return out


QA_PAIRS = [(1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4)]


def qa_preferences(rows: list[dict[str, Any]], where: str) -> list[Preference]:
    """The six pairwise judgments per question (1 = first better, 2 = second, 0 = tie: dropped)."""
    out = []
    for i, row in enumerate(rows):
        at = f"{where} row {i}"
        prefs = _literal(row["preference"], at, "preference")
        if not isinstance(prefs, (list, tuple)) or len(prefs) != 6:
            raise DataError(f"{at}: field 'preference' must list 6 judgments (1v2,1v3,1v4,2v3,2v4,3v4), got {prefs!r}")
        for (a, b), p in zip(QA_PAIRS, prefs):
            if p not in (0, 1, 2):
                raise DataError(f"{at}: field 'preference' has {p!r}; expected 0, 1 or 2")
            if p == 0:
                continue
            good, bad = (a, b) if p == 1 else (b, a)
            out.append(Preference(id=f"qa-{i}-{a}v{b}", prompt=qa_prompt(row), chosen=row[f"prediction {good}"],
                                  rejected=row[f"prediction {bad}"], provenance=_prov("import", where, i)))
    return out


# ----------------------------------------------------------------------------- reactions


def clariq_reactions(rows: list[dict[str, Any]], where: str) -> list[Reaction]:
    out = []
    for i, row in enumerate(rows):
        answer = (row.get("answer") or "").strip().lower()
        first = answer.split()[0].strip(",.!") if answer else ""
        reaction = "love" if first in _YES else "dislike" if first in _NO else "neutral"
        out.append(Reaction(id=f"clariq-{i}", prompt=row["initial_request"], response=row["question"], reaction=reaction,
                            user_id=row.get("facet_id") or None, provenance=_prov("import", where, i, answer=row.get("answer"))))
    return out


def log_reactions(rows: list[dict[str, Any]], where: str, positive: set[str]) -> list[Reaction]:
    """Production logs: reaction may be a word (love/like/thumbs_up/...), a bool or 0/1."""
    out = []
    for i, row in enumerate(rows):
        at = f"{where} row {i}"
        value = row["reaction"]
        if isinstance(value, bool) or isinstance(value, (int, float)):
            label = "love" if value else "dislike"
        elif isinstance(value, str):
            label = "love" if value.strip().lower() in positive else (
                "dislike" if value.strip().lower() in {"dislike", "thumbs_down", "negative", "0", "false"} else "neutral")
        else:
            raise DataError(f"{at}: field 'reaction' must be a word, a bool or 0/1, got {type(value).__name__}")
        prompt = row.get("conversation", row.get("prompt"))
        if prompt is None:
            raise DataError(f"{at}: field 'conversation' (or 'prompt') is missing")
        extra = {"time": row["time"]} if row.get("time") is not None else {}
        prov = _prov("logs", where, i, **extra)
        if row.get("time") is not None:
            prov.timestamp = str(row["time"])
        out.append(Reaction(id=str(row.get("id", f"log-{i}")), prompt=prompt, response=row.get("reply", row.get("response")),
                            reaction=label, user_id=None if row.get("user_id") is None else str(row["user_id"]), provenance=prov))
    return out


# ----------------------------------------------------------------------------- dispatch


def reactions(path: Path, positive: list[str]) -> list[Reaction]:
    fmt, rows = load_feedback(path)
    if fmt == "reactions":
        return rows_to_records("reactions", rows, str(path))  # type: ignore[return-value]
    if fmt == "clariq":
        return clariq_reactions(rows, str(path))
    if fmt == "logs":
        return log_reactions(rows, str(path), {p.lower() for p in positive} | {"love", "like", "thumbs_up", "positive", "1", "true"})
    raise DataError(f"{path}: P[Love] trains on reactions (heedful reaction records, logs or ClariQ), got {fmt}")


def span_feedback(path: Path) -> list[SpanFeedback]:
    fmt, rows = load_feedback(path)
    if fmt == "span_feedback":
        return rows_to_records("span_feedback", rows, str(path))  # type: ignore[return-value]
    if fmt == "qa_feedback":
        return qa_spans(rows, str(path))
    raise DataError(f"{path}: fine-grained RMs train on span feedback (records or qa-feedback), got {fmt}")


def preferences(path: Path) -> list[Preference]:
    fmt, rows = load_feedback(path)
    return preferences_from(fmt, rows, path)


def preferences_from(fmt: str, rows: list[dict[str, Any]], path: Path) -> list[Preference]:
    """Preference pairs from rows `load_feedback` already read (format `fmt`)."""
    if fmt == "preferences":
        return rows_to_records("preferences", rows, str(path))  # type: ignore[return-value]
    if fmt == "qa_feedback":
        return qa_preferences(rows, str(path))
    if fmt == "trl_preferences":
        out = []
        for i, row in enumerate(rows):
            chosen, rejected = row["chosen"], row["rejected"]
            out.append(Preference(id=str(row.get("id", i)), prompt=row["prompt"], chosen=_reply_text(chosen),
                                  rejected=_reply_text(rejected), provenance=_prov("import", str(path), i)))
        return out
    raise DataError(f"{path}: expected preference pairs (records, TRL prompt/chosen/rejected or qa-feedback), got {fmt}")


def _reply_text(value: Any) -> str:
    """TRL conversational completions are a list of messages; the reply is the last one's content."""
    if isinstance(value, list):
        return str(value[-1]["content"]) if value else ""
    return str(value)


def prompt_key(prompt: Any) -> str:
    """A stable key for grouping by prompt (split without leakage)."""
    if isinstance(prompt, list):
        users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
        return users[-1] if users else json.dumps(prompt, sort_keys=True)
    return str(prompt)
