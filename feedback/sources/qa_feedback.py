"""FineGrainedRLHF's qa-feedback (Wu et al. 2023): a question with passages, four predictions,
human error spans and a correction on `prediction 1`, and six pairwise preferences.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.chat import as_messages
from pipeline.errors import DataError
from pipeline.schema import Preference, SpanFeedback

from .formats import literal, provenance

#: the pairs of predictions, in the order of qa-feedback's `preference` list
QA_PAIRS = [(1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4)]
#: qa-feedback's error types as heedful span labels
QA_LABELS = {
    "Irrelevant": "irrelevant",
    "Redundant": "redundant",
    "Incoherent": "incoherent",
    "Wrong-Grounding": "wrong_grounding",
    "Unverifiable": "unverifiable",
}

#: how each qa-feedback error type reads in a judgment
ERROR_PHRASES = {
    "Irrelevant": "is irrelevant to the question",
    "Redundant": "repeats information already given",
    "Incoherent": "is incoherent",
    "Wrong-Grounding": "contradicts the passages",
    "Unverifiable": "cannot be verified from the passages",
}
POSITIVE_JUDGMENT = "The answer is relevant, accurate and complete."
MISSING_INFO = "It also leaves out important information from the passages."


def qa_prompt(row: dict[str, Any]) -> list[dict[str, str]]:
    """The question as a chat prompt; the grounding passages ride along as a system message."""
    passages = row.get("passages") or []
    context = "\n".join(f"wikipage: {p[0]} text: {' '.join(p[1:])}" for p in passages if p)
    return as_messages(row["question"], context)


def qa_spans(rows: list[dict[str, Any]], where: str, numbers: list[int] | None = None) -> list[SpanFeedback]:
    """Human error spans on `prediction 1` as SpanFeedback records. `numbers`: the rows' item numbers
    in the file (for ids and messages) when `rows` is a selection of it; default 0, 1, 2, ..."""
    out = []
    for i, row in zip(numbers if numbers is not None else range(len(rows)), rows):
        at = f"{where} row {i}"
        feedback = literal(row["feedback"], at, "feedback")
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
            out.append(
                SpanFeedback(
                    id=f"qa-{i}",
                    prompt=qa_prompt(row),
                    response=response,
                    spans=spans,
                    corrected_response=feedback.get("corrected-prediction"),
                    missing_info=json.dumps(feedback.get("missing-info") or []),
                    provenance=provenance("import", where, i),
                )
            )
        except Exception as exc:
            raise DataError(f"{at}: {exc}") from None
    return out


def qa_preferences(rows: list[dict[str, Any]], where: str) -> list[Preference]:
    """The six pairwise judgments per question (1 = first better, 2 = second, 0 = tie: dropped)."""
    out = []
    for i, row in enumerate(rows):
        at = f"{where} row {i}"
        prefs = literal(row["preference"], at, "preference")
        if not isinstance(prefs, (list, tuple)) or len(prefs) != 6:
            raise DataError(f"{at}: field 'preference' must list 6 judgments (1v2,1v3,1v4,2v3,2v4,3v4), got {prefs!r}")
        for (a, b), p in zip(QA_PAIRS, prefs):
            if p not in (0, 1, 2):
                raise DataError(f"{at}: field 'preference' has {p!r}; expected 0, 1 or 2")
            if p == 0:
                continue
            good, bad = (a, b) if p == 1 else (b, a)
            out.append(
                Preference(
                    id=f"qa-{i}-{a}v{b}",
                    prompt=qa_prompt(row),
                    chosen=row[f"prediction {good}"],
                    rejected=row[f"prediction {bad}"],
                    provenance=provenance("import", where, i),
                )
            )
    return out


def qa_feedback_judgment(response: str, feedback: dict[str, Any], max_quote: int = 80) -> str | None:
    """A written judgment from error spans on `response`; None when the annotator found nothing."""
    sentences = []
    for error in sorted(feedback.get("errors", []), key=lambda e: e["start"]):
        quote = " ".join(response[error["start"] : error["end"]].split())
        if len(quote) > max_quote:
            quote = quote[: max_quote - 3].rstrip() + "..."
        phrase = ERROR_PHRASES.get(error["error type"], f"has a problem ({error['error type']})")
        sentences.append(f'"{quote}" {phrase}.')
    if feedback.get("missing-info"):
        sentences.append(MISSING_INFO)
    return " ".join(["The answer has problems."] + sentences) if sentences else None
