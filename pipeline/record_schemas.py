"""One schema per kind of record heedful reads from files, and the check that applies them.

A stage input names artifact kinds (`Input(kinds=...)`); a kind accepts one or more row
*formats* (TRL preference rows, heedful records, qa-feedback, ClariQ, logs ...). The
format of a file is recognised from its first row's fields (its *signature*); then every
row is validated against that format's pydantic model, streamed one row at a time.
Problems read `file:line: field 'x': what was expected, got what`, e.g.
`prefs.jsonl:3: field 'chosen': expected a string or a list of messages, got 7`.

`heedful validate` and `heedful run` call `check_pipeline_inputs` for every file input
before Ray or a model starts; `records.load_rows(kind=...)` uses the same schemas, so a
stage reading a file itself reports the same messages.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, ValidationError, create_model, model_validator
from pydantic_core import ErrorDetails, PydanticCustomError

from .errors import DataError, Problem

ROLES = ("system", "user", "assistant", "tool")


# ----------------------------------------------------------------------------- field types


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise PydanticCustomError("text", "expected a string, got {got}", {"got": _shown(value)})
    if not value.strip():
        raise PydanticCustomError("text", "is empty: expected some text")
    return value


def _messages(value: list) -> list:
    if not value:
        raise PydanticCustomError("messages", "is an empty list: expected at least one message")
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise PydanticCustomError(
                "messages", "message {i}: expected an object with role and content, got {got}", {"i": i, "got": _shown(message)}
            )
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise PydanticCustomError(
                "messages",
                "message {i}: role must be one of {roles}, got {got}",
                {"i": i, "roles": ", ".join(ROLES), "got": _shown(role)},
            )
        if not isinstance(content, str):
            raise PydanticCustomError(
                "messages", "message {i}: content must be a string, got {got}", {"i": i, "got": _shown(content)}
            )
    return value


def _text_or_messages(value: Any) -> Any:
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, list):
        return _messages(value)
    raise PydanticCustomError("text_or_messages", "expected a string or a list of messages, got {got}", {"got": _shown(value)})


#: a non-empty string
Text = Annotated[str, PlainValidator(_text)]
#: a non-empty string or a non-empty list of {role, content} messages (TRL's conversational format)
TextOrMessages = Annotated[Any, PlainValidator(_text_or_messages)]


class _Row(BaseModel):
    """Raw rows keep their other columns (ids, keywords, metadata): only named fields are checked."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)


# ----------------------------------------------------------------------------- formats


class PreferenceRow(_Row):
    """TRL's preference columns; each side a string or a conversation."""

    prompt: TextOrMessages
    chosen: TextOrMessages
    rejected: TextOrMessages


class ResponseRow(_Row):
    """A prompt and one reply (generate's output, or your own)."""

    prompt: TextOrMessages
    response: str


class PromptRow(_Row):
    """A prompt to answer (other columns, e.g. `scope` or `keywords`, are the stage's business)."""

    prompt: TextOrMessages


class C3poRow(_Row):
    """c3po_data's output: a scoped prompt, the current policy's baseline and (in scope) its revision."""

    scope: Literal["in_scope", "near_scope", "out_of_scope"]
    prompt: TextOrMessages
    baseline: str
    revised: str | None = None


class NeedRow(_Row):
    """An information need for a simulated user (the simulator's `need_field`)."""

    need: Text


class TextRow(_Row):
    text: Text


class CritiqueRow(_Row):
    """Verbal feedback as plain rows: a critique (or `feedback`) text, optionally scoped."""

    critique: Text | None = None
    feedback: Text | None = None

    @model_validator(mode="after")
    def _has_text(self) -> CritiqueRow:
        if self.critique is None and self.feedback is None:
            raise PydanticCustomError("missing", "field 'critique' (or 'feedback') is missing")
        return self


class LogReactionRow(_Row):
    """Production logs: a reply, the conversation (or prompt) before it and the user's reaction."""

    reaction: str | bool | int | float
    conversation: TextOrMessages | None = None
    prompt: TextOrMessages | None = None
    reply: str | None = None
    response: str | None = None

    @model_validator(mode="after")
    def _has_turns(self) -> LogReactionRow:
        if self.conversation is None and self.prompt is None:
            raise PydanticCustomError("missing", "field 'conversation' (or 'prompt') is missing")
        if self.reply is None and self.response is None:
            raise PydanticCustomError("missing", "field 'reply' (or 'response') is missing")
        return self


class ClariqRow(_Row):
    """ClariQ (TSV): a request, the system's clarifying question and the user's answer."""

    initial_request: Text
    question: str = ""  # some rows have no clarifying question
    answer: str = ""
    facet_id: str | None = None


class QaFeedbackRow(_Row):
    """FineGrainedRLHF qa-feedback: four predictions, error spans on the first, six pairwise judgments.
    `feedback` and `preference` may be Python-literal strings (as in the released files)."""

    question: Text
    passages: list[list[str]] = Field(default_factory=list)
    prediction_1: str = Field(alias="prediction 1")
    prediction_2: str = Field(alias="prediction 2")
    prediction_3: str = Field(alias="prediction 3")
    prediction_4: str = Field(alias="prediction 4")
    feedback: Any
    preference: Any = None

    @model_validator(mode="after")
    def _spans_and_judgments(self) -> QaFeedbackRow:
        feedback = _literal(self.feedback, "feedback")
        if not isinstance(feedback, dict) or not isinstance(feedback.get("errors", []), list):
            raise PydanticCustomError("qa", "field 'feedback': expected an object with an 'errors' list")
        n = len(self.prediction_1)
        for j, err in enumerate(feedback.get("errors", [])):
            try:
                start, end, _ = int(err["start"]), int(err["end"]), err["error type"]
            except (KeyError, TypeError, ValueError):
                raise PydanticCustomError(
                    "qa", "field 'feedback.errors[{j}]': needs start, end and 'error type'", {"j": j}
                ) from None
            if not 0 <= start < end <= n:
                raise PydanticCustomError(
                    "span",
                    "field 'feedback.errors[{j}]': span [{start}, {end}) is outside 'prediction 1' (length {n})",
                    {"j": j, "start": start, "end": end, "n": n},
                )
        if self.preference is not None:
            prefs = _literal(self.preference, "preference")
            if not isinstance(prefs, (list, tuple)) or len(prefs) != 6 or any(p not in (0, 1, 2) for p in prefs):
                raise PydanticCustomError(
                    "qa",
                    "field 'preference': expected 6 judgments of 0, 1 or 2 (1v2,1v3,1v4,2v3,2v4,3v4), got {got}",
                    {"got": _shown(self.preference)},
                )
        return self


def _literal(value: Any, field: str) -> Any:
    if isinstance(value, str):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise PydanticCustomError("literal", "field '{field}': not a JSON/Python literal", {"field": field}) from None
    return value


@dataclass(frozen=True)
class Format:
    """A row format: its model, the fields that identify it, and a name for messages."""

    name: str
    model: type[BaseModel]
    signature: tuple[str, ...] = ()
    record_kind: str | None = None  # heedful records are recognised by their `kind` value instead

    def matches(self, row: dict[str, Any]) -> bool:
        if self.record_kind is not None:
            return row.get("kind") == self.record_kind
        return all(key in row for key in self.signature)

    def required(self) -> list[str]:
        return [f.alias or n for n, f in self.model.model_fields.items() if f.is_required()]


def _record_formats() -> dict[str, Format]:
    from .schema import FollowUp, Preference, Reaction, SpanFeedback, VerbalFeedback

    return {
        "preference records": Format("preference records", Preference, record_kind="preference"),
        "reaction records": Format("reaction records", Reaction, record_kind="reaction"),
        "span feedback records": Format("span feedback records", SpanFeedback, record_kind="span"),
        "verbal feedback records": Format("verbal feedback records", VerbalFeedback, record_kind="verbal"),
        "follow-up records": Format("follow-up records", FollowUp, record_kind="followup"),
    }


def prompt_format(field: str = "prompt") -> Format:
    """Prompt rows; the prompt's column is configurable (`prompt_field` in generate/ppo)."""
    if field == "prompt":
        return Format("prompts", PromptRow, ("prompt",))
    model = create_model("PromptRow", __base__=_Row, prompt_text=(TextOrMessages, Field(alias=field)))
    return Format(f"prompts (field '{field}')", model, (field,))


def need_format(field: str = "need") -> Format:
    """Information-need rows; the column is configurable (`need_field` in simulate)."""
    if field == "need":
        return Format("needs", NeedRow, ("need",))
    model = create_model("NeedRow", __base__=_Row, need_text=(Text, Field(alias=field)))
    return Format(f"needs (field '{field}')", model, (field,))


def formats_for(kind: str, *, prompt_field: str = "prompt", need_field: str = "need") -> list[Format]:
    """The row formats a kind accepts, most specific first. Unknown kinds: none (not row data)."""
    rec = _record_formats()
    qa = Format("qa-feedback", QaFeedbackRow, ("prediction 1", "feedback"))
    clariq = Format("ClariQ", ClariqRow, ("initial_request", "question", "answer"))
    logs = [
        Format("reaction logs", LogReactionRow, ("reaction", "reply")),
        Format("reaction logs", LogReactionRow, ("reaction", "response")),
    ]
    table: dict[str, list[Format]] = {
        "preferences": [rec["preference records"], qa, Format("preferences", PreferenceRow, ("prompt", "chosen", "rejected"))],
        "reactions": [rec["reaction records"], clariq, *logs],
        "span_feedback": [rec["span feedback records"], qa],
        "verbal_feedback": [
            rec["verbal feedback records"],
            Format("critiques", CritiqueRow, ("critique",)),
            Format("critiques", CritiqueRow, ("feedback",)),
        ],
        "followups": [rec["follow-up records"], qa],
        "qa_feedback": [qa],
        "prompts": [prompt_format(prompt_field)],
        "responses": [Format("responses", ResponseRow, ("prompt", "response"))],
        "needs": [clariq, need_format(need_field), prompt_format(prompt_field)],
        "texts": [Format("texts", TextRow, ("text",))],
        "c3po_data": [Format("c3po data", C3poRow, ("scope", "prompt", "baseline"))],
    }
    table["feedback"] = [
        f for k in ("reactions", "span_feedback", "preferences", "followups", "verbal_feedback") for f in table[k]
    ]
    return list(table.get(kind, []))


#: kinds whose inputs are folders a stage reads itself (models, adapters, databases), not rows
NOT_ROWS = {"adapter", "reward_model", "memory", "export", "argilla_records", "model"}


# ----------------------------------------------------------------------------- validation


def _field_problem(where: str, err: ErrorDetails) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("prompt_text", "need_text"))
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        return f"{where}: field '{loc}' is missing"
    if err["type"] == "extra_forbidden":
        return f"{where}: field '{loc}' is not allowed here"
    if msg.startswith("field '") or not loc:
        return f"{where}: {msg}"
    if err["type"] == "literal_error":
        msg += f", got {_shown(err.get('input'))}"
    return f"{where}: field '{loc}': {msg}"


def _describe(kinds: Iterable[str]) -> str:
    return " or ".join(k.replace("_", " ") for k in kinds)


def validated_rows(
    path: Path, kinds: Iterable[str], *, prompt_field: str = "prompt", need_field: str = "need"
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Stream `(where, row)` from a file (or dataset folder), each row validated as one of `kinds`.

    The format is recognised from the first row; raises DataError at the first bad row,
    naming file, line and field, and at the end if there was no row at all.
    """
    from .records import iter_rows

    kinds = [k for k in kinds if k not in NOT_ROWS]
    formats: list[Format] = []
    for kind in kinds:
        formats += [f for f in formats_for(kind, prompt_field=prompt_field, need_field=need_field) if f not in formats]
    # most specific first: heedful records (by `kind`), then the formats identified by more fields
    formats.sort(key=lambda f: (f.record_kind is None, -len(f.signature)))
    # a kind without a schema here (e.g. kto's unpaired rows, cut's judgments) is checked by its
    # stage: rows in no known format are then let through rather than refused
    open_ended = any(not formats_for(k) for k in kinds)
    count = 0
    chosen: Format | None = None
    recognised = False
    for where, row in iter_rows(path):
        count += 1
        if formats and not recognised:
            recognised = True
            chosen = _recognise(where, row, formats, kinds, strict=not open_ended)
        if chosen is not None:
            try:
                chosen.model.model_validate(row)
            except ValidationError as exc:
                raise DataError(_field_problem(where, exc.errors()[0])) from None
        yield where, row
    if count == 0 and kinds:
        raise DataError(f"{path} is empty: a {_describe(kinds[:1])} input needs at least one record")


def _recognise(where: str, row: dict[str, Any], formats: list[Format], kinds: list[str], strict: bool) -> Format | None:
    """The first format whose signature the row carries; else say which field is missing
    (or None when `strict` is off: the stage knows formats this module does not)."""
    for fmt in formats:
        if fmt.matches(row):
            return fmt
    if not strict:
        return None
    closest = min(formats, key=lambda f: len([k for k in f.required() if k not in row]))
    missing = [k for k in closest.required() if k not in row]
    if closest.record_kind is not None or not missing:
        raise DataError(
            f"{where}: not a {_describe(kinds)} record (fields: {', '.join(sorted(row)) or 'none'}); "
            f"expected e.g. {', '.join(closest.required())}"
        )
    raise DataError(f"{where}: field '{missing[0]}' is missing ({closest.name} need {', '.join(closest.required())})")


def check_rows(path: Path, kinds: Iterable[str], **field_names: str) -> int:
    """Validate a whole file as rows of one of `kinds` without keeping them; returns the row count.
    `field_names`: `prompt_field` / `need_field` when a stage reads those columns under other names."""
    return sum(1 for _ in validated_rows(path, kinds, **field_names))


def input_field_names(stage) -> dict[str, str]:
    """Column names a stage's config renames (`prompt_field: question` reads prompts from `question`)."""
    return {
        "prompt_field": getattr(stage.config, "prompt_field", None) or "prompt",
        "need_field": getattr(stage.config, "need_field", None) or "need",
    }


def check_stage_inputs(stage) -> list[Problem]:
    """Problems in a resolved stage's file inputs (upstream outputs are checked when produced)."""
    problems = []
    for name, ref in stage.inputs.items():
        if ref.stage is not None or ref.path is None or not ref.path.exists():
            continue
        declared = stage.cls.inputs.get(name)
        if declared is None or not any(formats_for(k) for k in declared.kinds):
            continue  # no row kind this module knows (folders, stage-specific formats): the stage checks it
        try:
            check_rows(ref.path, declared.kinds, **input_field_names(stage))
        except DataError as exc:
            problems.append(Problem(f"stages.{stage.name}.inputs.{name}", None, "", str(exc)))
    return problems


def check_pipeline_inputs(pipeline, only: Iterable[str] | None = None) -> None:
    """Validate every file input of the pipeline's stages (or of `only`); raises DataError listing all problems.

    Each file is read once per stage input, one row at a time.
    """
    wanted = set(only) if only is not None else None
    problems: list[Problem] = []
    for stage in pipeline.stages:
        if wanted is None or stage.name in wanted:
            problems += check_stage_inputs(stage)
    if problems:
        raise DataError("\n".join(p.message for p in problems), problems=problems)
