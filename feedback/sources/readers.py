"""Training data for reward models from any feedback format (see formats.py): reactions
(P[Love]), span feedback (fine-grained RMs) and preference pairs (FLR, completeness RM).
Errors name the file and row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.chat import reply_text
from pipeline.errors import DataError
from pipeline.schema import Preference, Reaction, SpanFeedback, rows_to_records

from .clariq import clariq_reactions
from .formats import load_feedback, provenance
from .qa_feedback import qa_preferences, qa_spans


def log_reactions(rows: list[dict[str, Any]], where: str, positive: set[str]) -> list[Reaction]:
    """Production logs: reaction may be a word (love/like/thumbs_up/...), a bool or 0/1."""
    out = []
    for i, row in enumerate(rows):
        at = f"{where} row {i}"
        value = row["reaction"]
        if isinstance(value, bool) or isinstance(value, (int, float)):
            label = "love" if value else "dislike"
        elif isinstance(value, str):
            label = (
                "love"
                if value.strip().lower() in positive
                else ("dislike" if value.strip().lower() in {"dislike", "thumbs_down", "negative", "0", "false"} else "neutral")
            )
        else:
            raise DataError(f"{at}: field 'reaction' must be a word, a bool or 0/1, got {type(value).__name__}")
        prompt = row.get("conversation") if row.get("conversation") is not None else row.get("prompt")
        if prompt is None:
            raise DataError(f"{at}: field 'conversation' (or 'prompt') is missing")
        extra = {"time": row["time"]} if row.get("time") is not None else {}
        prov = provenance("logs", where, i, **extra)
        if row.get("time") is not None:
            prov.timestamp = str(row["time"])
        out.append(
            Reaction(
                id=str(row.get("id", f"log-{i}")),
                prompt=prompt,
                response=row.get("reply") if row.get("reply") is not None else row.get("response"),
                reaction=label,
                user_id=None if row.get("user_id") is None else str(row["user_id"]),
                provenance=prov,
            )
        )
    return out


def reactions(path: Path, positive: list[str]) -> list[Reaction]:
    fmt, rows = load_feedback(path)
    if fmt == "reactions":
        return rows_to_records("reactions", rows, str(path))  # type: ignore[return-value]
    if fmt == "clariq":
        return clariq_reactions(rows, str(path))
    if fmt == "logs":
        return log_reactions(
            rows, str(path), {p.lower() for p in positive} | {"love", "like", "thumbs_up", "positive", "1", "true"}
        )
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
    """Preference pairs from rows `load_feedback` already read (format `fmt`), with text replies:
    the reward models that read them score words, and a conversational pair's replies (the
    simulated users' and the server's preferences are) become their assistant messages' words
    (`pipeline.chat.reply_text`)."""
    if fmt == "preferences":
        records: list[Preference] = rows_to_records("preferences", rows, str(path))  # type: ignore[assignment]
        return [r.model_copy(update={"chosen": reply_text(r.chosen), "rejected": reply_text(r.rejected)}) for r in records]
    if fmt == "qa_feedback":
        return qa_preferences(rows, str(path))
    if fmt == "trl_preferences":
        out = []
        for i, row in enumerate(rows):
            chosen, rejected = row["chosen"], row["rejected"]
            out.append(
                Preference(
                    id=str(row.get("id", i)),
                    prompt=row["prompt"],
                    chosen=reply_text(chosen),
                    rejected=reply_text(rejected),
                    provenance=provenance("import", str(path), i),
                )
            )
        return out
    raise DataError(f"{path}: expected preference pairs (records, TRL prompt/chosen/rejected or qa-feedback), got {fmt}")
