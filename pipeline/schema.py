"""Normalized feedback records: every source (Argilla, simulator, logs, serving) writes these.

Each record carries provenance: where it came from, who gave it (annotator or simulator
id), when, and which model/adapter produced the reply. Datasets of records are saved with
`records_to_rows` and read back with `rows_to_records` (the artifact kinds are in `KINDS`).
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Message = dict[str, str]
Conversation = list[Message]
PromptLike = str | Conversation


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Provenance(BaseModel):
    """Who/what produced a piece of feedback, and about which reply."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    source: str = Field(description="argilla | convsim | logs | heuristic | serving | import | ...")
    annotator: str | None = Field(default=None, description="human user id or simulator id")
    timestamp: str = Field(default_factory=utc_now)
    model: str | None = None
    adapter: str | None = None
    dataset: str | None = Field(default=None, description="Argilla dataset, file or run that held it")
    record_id: str | None = None
    run: str | None = None
    stage: str | None = None
    extra: str = Field(default="{}", description="JSON object with source-specific details")

    def extras(self) -> dict[str, Any]:
        return json.loads(self.extra or "{}")


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    prompt: PromptLike
    response: str
    provenance: Provenance


class Reaction(_Record):
    """Sparse love-style reaction to a reply (P[Love] training data)."""

    kind: Literal["reaction"] = "reaction"
    reaction: Literal["love", "neutral", "dislike"]
    user_id: str | None = None

    @property
    def positive(self) -> bool:
        return self.reaction == "love"


class VerbalFeedback(_Record):
    """A critique or judgment in words (C3PO, CUT, CoH training data)."""

    kind: Literal["verbal"] = "verbal"
    critique: str
    judgment: Literal["good", "needs_work"] | None = None
    scope: str | None = Field(default=None, description="where the feedback applies (C3PO)")


class Span(BaseModel):
    model_config = ConfigDict(extra="forbid")
    start: int = Field(ge=0)
    end: int
    label: str
    text: str | None = None


class SpanFeedback(_Record):
    """Fine-grained errors as character spans of the response (fine-grained RM data)."""

    kind: Literal["span"] = "span"
    spans: list[Span] = Field(default_factory=list)
    corrected_response: str | None = None
    missing_info: str | None = None

    @model_validator(mode="after")
    def _spans_inside_response(self) -> SpanFeedback:
        for i, span in enumerate(self.spans):
            if not (0 <= span.start < span.end <= len(self.response)):
                raise ValueError(f"spans[{i}] [{span.start}, {span.end}) is outside the response (length {len(self.response)})")
            if span.text is not None and self.response[span.start : span.end] != span.text:
                raise ValueError(f"spans[{i}] text {span.text!r} does not match the response at [{span.start}, {span.end})")
        return self


class Preference(BaseModel):
    """A preference pair in TRL's column names (strings or conversational messages)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["preference"] = "preference"
    id: str
    prompt: PromptLike
    chosen: PromptLike
    rejected: PromptLike
    rationale: str | None = None
    provenance: Provenance


class FollowUp(_Record):
    """The user's next turn after a reply (FLR's raw material)."""

    kind: Literal["followup"] = "followup"
    followup: str
    satisfied: bool | None = None
    aspect: str | None = None


#: artifact kind -> record class
KINDS: dict[str, type[BaseModel]] = {
    "reactions": Reaction,
    "verbal_feedback": VerbalFeedback,
    "span_feedback": SpanFeedback,
    "preferences": Preference,
    "followups": FollowUp,
}


def records_to_rows(records: list[BaseModel]) -> list[dict[str, Any]]:
    return [r.model_dump(mode="json") for r in records]


def rows_to_records(kind: str, rows: list[dict[str, Any]], where: str = "") -> list[BaseModel]:
    """Validate rows as records of `kind`; errors name the row and field."""
    from pydantic import ValidationError

    from .errors import DataError

    cls = KINDS[kind]
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(cls.model_validate(row))
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"])
            raise DataError(f"{where or kind} row {i}: {field}: {err['msg']}") from None
    return out
