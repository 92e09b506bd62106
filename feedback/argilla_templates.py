"""Argilla dataset templates, one per feedback kind, shared by push and pull.

A template knows three things: the dataset settings annotators see (fields, questions,
guidelines, metadata), how to turn a heedful item into an Argilla record, and how to turn
one annotator's response back into normalized heedful records (`pipeline/schema.py`).

Items are plain dicts (see `PushItem`); records keep the exact original prompt and
responses in (undeclared) record metadata so a pull reproduces them byte for byte even
when the UI shows a rendered version.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.chat import reply_text
from pipeline.schema import Preference, Provenance, Reaction, SpanFeedback, VerbalFeedback

TemplateKind = Literal["fine_grained", "verbal", "preference", "reaction"]

#: the qa-feedback taxonomy (FineGrainedRLHF): sub-sentence relevance + sentence factuality
DEFAULT_SPAN_LABELS = ["irrelevant", "redundant", "incoherent", "wrong_grounding", "unverifiable"]
METADATA_TERMS = ["model", "adapter", "run", "stage", "sample_id"]
#: artifact kind each template's pull writes
OUTPUT_KIND = {"fine_grained": "span_feedback", "verbal": "verbal_feedback", "preference": "preferences", "reaction": "reactions"}

GUIDELINES = {
    "fine_grained": (
        "Mark every problem in the **response** by selecting the text and choosing a label:\n\n"
        "- **irrelevant**: not about what was asked\n- **redundant**: repeats something already said\n"
        "- **incoherent**: does not make sense or contradicts itself\n"
        "- **wrong_grounding**: contradicts the given context/passages\n"
        "- **unverifiable**: a claim the context does not support\n\n"
        "Then edit the pre-filled **corrected response** into the answer you would want (leave it as is "
        "if the response is fine), and note any **missing information**. Submit when done."
    ),
    "verbal": (
        "Read the prompt and the response. Write a **critique**: what should change and why, concretely "
        "enough that the model could follow it. Judge the response as **good** or **needs work**. If the "
        "feedback applies beyond this prompt, say where in **applies to** (e.g. 'questions about dates')."
    ),
    "preference": (
        "Compare the two responses to the same prompt. Pick the better one (or *tie* when neither is "
        "better) and, if you can, say why in one sentence."
    ),
    "reaction": "How do you feel about this response? **love** it, **neutral**, or **dislike** it. Go with your gut.",
}


class TemplateOptions(BaseModel):
    """What can be configured about a template (shared by push and pull configs)."""

    model_config = ConfigDict(extra="forbid")
    kind: TemplateKind = "fine_grained"
    span_labels: list[str] = Field(default_factory=lambda: list(DEFAULT_SPAN_LABELS), min_length=1)
    allow_overlapping: bool = False
    preference_question: Literal["label", "ranking"] = "label"
    guidelines: str | None = Field(default=None, description="replaces the template's guidelines text")
    min_submitted: int = Field(default=1, ge=1, description="submitted responses that complete a record")


def stable_id(*parts: Any) -> str:
    """Same sample -> same record id, so re-pushing updates instead of duplicating."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:20]


def render(prompt: Any) -> str:
    """Prompt or reply as text an annotator reads (conversations as speaker turns)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        turns = [m for m in prompt if isinstance(m, dict)]
        if len(turns) == 1 and turns[0].get("role") in ("user", "assistant"):
            return str(turns[0].get("content", ""))
        return "\n\n".join(f"**{m.get('role', '?')}:** {m.get('content', '')}" for m in turns)
    return str(prompt)


# -- settings --------------------------------------------------------------------------------


def settings(opts: TemplateOptions, client):
    """`rg.Settings` for the template, bound to `client` (the SDK needs a live client for settings)."""
    import argilla as rg

    prompt = rg.TextField(client=client, name="prompt", title="Prompt", use_markdown=True)
    fields: list = [prompt]
    questions: list = []
    kind = opts.kind
    if kind == "fine_grained":
        fields += [
            rg.TextField(client=client, name="context", title="Context / passages", use_markdown=True, required=False),
            rg.TextField(client=client, name="response", title="Response", use_markdown=False),
        ]
        questions = [
            rg.SpanQuestion(
                client=client,
                name="spans",
                field="response",
                labels=list(opts.span_labels),
                title="Mark the problems",
                allow_overlapping=opts.allow_overlapping,
                required=False,
            ),
            rg.TextQuestion(
                client=client,
                name="corrected_response",
                title="Corrected response",
                required=True,
                description="edit the pre-filled response into the one you would want",
            ),
            rg.TextQuestion(client=client, name="missing_info", title="Missing information", required=False),
        ]
    elif kind == "verbal":
        fields.append(rg.TextField(client=client, name="response", title="Response", use_markdown=True))
        questions = [
            rg.TextQuestion(client=client, name="critique", title="What should change and why?", required=True),
            rg.LabelQuestion(
                client=client,
                name="judgment",
                title="Overall",
                labels={"good": "good", "needs_work": "needs work"},
                required=False,
            ),
            rg.TextQuestion(
                client=client,
                name="scope",
                title="Applies to (optional)",
                required=False,
                description="where else this feedback applies, e.g. 'questions about dates'",
            ),
        ]
    elif kind == "preference":
        fields += [
            rg.TextField(client=client, name="response_a", title="Response A", use_markdown=True),
            rg.TextField(client=client, name="response_b", title="Response B", use_markdown=True),
        ]
        if opts.preference_question == "ranking":
            choice = rg.RankingQuestion(
                client=client,
                name="preference",
                title="Rank the responses (equal rank = tie)",
                values={"a": "Response A", "b": "Response B"},
                required=True,
            )
        else:
            choice = rg.LabelQuestion(
                client=client,
                name="preference",
                title="Which response is better?",
                labels={"a": "A is better", "b": "B is better", "tie": "tie"},
                required=True,
            )
        questions = [choice, rg.TextQuestion(client=client, name="rationale", title="Why? (optional)", required=False)]
    elif kind == "reaction":
        fields.append(rg.TextField(client=client, name="response", title="Response", use_markdown=True))
        questions = [
            rg.LabelQuestion(
                client=client,
                name="reaction",
                title="Your reaction",
                labels={"love": "love", "neutral": "neutral", "dislike": "dislike"},
                required=True,
            )
        ]
    metadata = [rg.TermsMetadataProperty(client=client, name=name, visible_for_annotators=False) for name in METADATA_TERMS]
    return rg.Settings(
        fields=fields,
        questions=questions,
        metadata=metadata,
        guidelines=opts.guidelines or GUIDELINES[kind],
        distribution=rg.TaskDistribution(min_submitted=opts.min_submitted),
        allow_extra_metadata=True,
    )


def detect_kind(question_names: set[str]) -> TemplateKind:
    """Which template an existing dataset follows (by its question names)."""
    for kind, marker in (
        ("fine_grained", "spans"),
        ("verbal", "critique"),
        ("preference", "preference"),
        ("reaction", "reaction"),
    ):
        if marker in question_names:
            return kind  # type: ignore[return-value]
    raise ValueError(
        f"questions {sorted(question_names)} match no heedful template (expected one of: spans, critique, preference, reaction)"
    )


# -- push: items -> records ------------------------------------------------------------------


class PushItem(BaseModel):
    """One thing to annotate. `responses` are only for imports of existing human feedback."""

    model_config = ConfigDict(extra="forbid")
    id: str
    prompt: Any
    response: str | None = None
    response_a: Any = None
    response_b: Any = None
    context: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict, description="undeclared metadata kept verbatim")
    suggestions: dict[str, dict[str, Any]] = Field(default_factory=dict, description="question -> {value, score, agent}")
    responses: list[dict[str, Any]] = Field(default_factory=list, description="{user, values: {q: v}, status}")


def to_record(item: PushItem, opts: TemplateOptions, user_ids: dict[str, Any] | None = None):
    """An `rg.Record` (external id = item.id) with suggestions and, for imports, responses."""
    import argilla as rg

    fields: dict[str, Any] = {"prompt": render(item.prompt)}
    extra = {"heedful_prompt": json.dumps(item.prompt, ensure_ascii=False), **item.extra}
    suggestions = dict(item.suggestions)
    if opts.kind == "preference":
        fields["response_a"], fields["response_b"] = reply_text(item.response_a), reply_text(item.response_b)
        extra["heedful_a"] = json.dumps(item.response_a, ensure_ascii=False)
        extra["heedful_b"] = json.dumps(item.response_b, ensure_ascii=False)
    else:
        fields["response"] = item.response or ""
        if opts.kind == "fine_grained":
            if item.context:
                fields["context"] = item.context
            suggestions.setdefault("corrected_response", {"value": item.response or "", "agent": "heedful:copy"})
    responses = item.responses
    if opts.kind == "preference" and opts.preference_question == "ranking":  # label answers -> rankings
        if "preference" in suggestions:  # the SDK takes ranking suggestions as an ordered list of values
            order = [
                item["value"] for item in sorted(as_ranking(suggestions["preference"]["value"]), key=lambda item: item["rank"])
            ]
            suggestions["preference"] = {**suggestions["preference"], "value": order}
        responses = [
            {**r, "values": {**r["values"], "preference": as_ranking(r["values"]["preference"])}}
            if "preference" in r["values"]
            else r
            for r in responses
        ]
    metadata = {k: str(v) for k, v in item.metadata.items() if k in METADATA_TERMS and v not in (None, "")}
    metadata.update(extra)
    rg_suggestions = [
        rg.Suggestion(question_name=q, value=s["value"], score=s.get("score"), agent=s.get("agent"))
        for q, s in suggestions.items()
        if s.get("value") is not None
    ]
    rg_responses = []
    for resp in responses:
        uid = (user_ids or {}).get(resp["user"])
        for question, value in resp["values"].items():
            if value is not None:
                rg_responses.append(
                    rg.Response(question_name=question, value=value, user_id=uid, status=resp.get("status", "submitted"))
                )
    return rg.Record(id=item.id, fields=fields, metadata=metadata, suggestions=rg_suggestions, responses=rg_responses)


# -- pull: a response -> heedful records -----------------------------------------------------


class InvalidSpan(ValueError):
    """A span that does not fit the response text (reported with the record id)."""


def _meta(record: dict[str, Any], key: str, default: Any = None) -> Any:
    return (record.get("metadata") or {}).get(key, default)


def _json_meta(record: dict[str, Any], key: str, fallback: Any) -> Any:
    raw = _meta(record, key)
    if raw is None:
        return fallback
    try:
        return json.loads(raw)
    except (TypeError, ValueError):
        return fallback


def _value(response: dict[str, Any], question: str) -> Any:
    return ((response.get("values") or {}).get(question) or {}).get("value")


def provenance(record: dict[str, Any], response: dict[str, Any], annotator: str, dataset: str) -> Provenance:
    """Where a pulled answer came from; items pushed for review (argilla_push `select:`) say so and why."""
    extra: dict[str, Any] = {
        "status": response.get("status"),
        "response_id": str(response.get("id")),
        "argilla_record_id": str(record["id"]),
        "sample_id": _meta(record, "sample_id"),
    }
    reviewed = _meta(record, "review_reason") is not None
    if reviewed:
        extra["review"] = {k: _meta(record, f"review_{k}") for k in ("reason", "score", "detail")}
    return Provenance(
        source="argilla review" if reviewed else "argilla",
        annotator=annotator,
        timestamp=_iso(response.get("updated_at") or response.get("inserted_at")),
        model=_meta(record, "model"),
        adapter=_meta(record, "adapter"),
        run=_meta(record, "run"),
        stage=_meta(record, "stage"),
        dataset=dataset,
        record_id=str(record.get("external_id") or record["id"]),
        extra=json.dumps(extra),
    )


def _iso(value: str | None) -> str:
    """Server timestamps are naive UTC ('2026-01-01T10:00:00.123456'): mark them as UTC."""
    if not value:
        from pipeline.schema import utc_now

        return utc_now()
    return value if value.endswith("Z") or "+" in value[10:] else value + "Z"


def check_spans(spans: list[dict[str, Any]], text: str, labels: list[str] | None, record_id: str) -> list[dict]:
    """Spans as schema dicts with their text; raises InvalidSpan naming the record."""
    out = []
    for i, span in enumerate(spans or []):
        start, end, label = span.get("start"), span.get("end"), span.get("label")
        if not isinstance(start, int) or not isinstance(end, int) or not (0 <= start < end <= len(text)):
            raise InvalidSpan(
                f"record {record_id}: spans[{i}] [{start}, {end}) label {label!r} does not fit the "
                f"response text (length {len(text)})"
            )
        if labels is not None and label not in labels:
            raise InvalidSpan(f"record {record_id}: spans[{i}] label {label!r} is not one of {labels}")
        out.append({"start": start, "end": end, "label": label, "text": text[start:end]})
    return sorted(out, key=lambda s: (s["start"], s["end"], s["label"]))


def row_id(record: dict[str, Any], annotator: str) -> str:
    """The id of the heedful record one annotator's response to `record` becomes: one per
    (record, annotator), so a changed answer replaces the earlier one, and a withdrawn answer
    names the row it withdraws."""
    return f"{record.get('external_id') or record['id']}:{annotator}"


def parse_response(
    kind: TemplateKind,
    record: dict[str, Any],
    response: dict[str, Any],
    annotator: str,
    dataset: str,
    labels: list[str] | None = None,
):
    """Heedful records for one annotator's response (a tie yields none; an invalid span raises)."""
    external = str(record.get("external_id") or record["id"])
    rec_id = row_id(record, annotator)
    fields = record.get("fields") or {}
    prompt = _json_meta(record, "heedful_prompt", fields.get("prompt", ""))
    prov = provenance(record, response, annotator, dataset)
    if kind == "fine_grained":
        text = fields.get("response") or ""
        spans = check_spans(_value(response, "spans") or [], text, labels, external)
        return [
            SpanFeedback(
                id=rec_id,
                prompt=prompt,
                response=text,
                spans=spans,
                provenance=prov,
                corrected_response=_value(response, "corrected_response"),
                missing_info=_value(response, "missing_info"),
            )
        ]
    if kind == "verbal":
        critique = _value(response, "critique")
        if critique is None:
            return []
        return [
            VerbalFeedback(
                id=rec_id,
                prompt=prompt,
                response=fields.get("response") or "",
                critique=critique,
                judgment=_value(response, "judgment"),
                scope=_value(response, "scope"),
                provenance=prov,
            )
        ]
    if kind == "reaction":
        reaction = _value(response, "reaction")
        if reaction is None:
            return []
        return [
            Reaction(
                id=rec_id,
                prompt=prompt,
                response=fields.get("response") or "",
                reaction=reaction,
                user_id=annotator,
                provenance=prov,
            )
        ]
    winner = preferred(_value(response, "preference"))
    if winner is None:
        return []
    a = _json_meta(record, "heedful_a", fields.get("response_a", ""))
    b = _json_meta(record, "heedful_b", fields.get("response_b", ""))
    chosen, rejected = (a, b) if winner == "a" else (b, a)
    return [
        Preference(
            id=rec_id, prompt=prompt, chosen=chosen, rejected=rejected, rationale=_value(response, "rationale"), provenance=prov
        )
    ]


def as_ranking(value: Any) -> Any:
    """A label answer ('a', 'b', 'tie') as a ranking answer; rankings pass through."""
    if not isinstance(value, str):
        return value
    if value == "tie":
        return [{"value": "a", "rank": 1}, {"value": "b", "rank": 1}]
    other = "b" if value == "a" else "a"
    return [{"value": value, "rank": 1}, {"value": other, "rank": 2}]


def preferred(value: Any) -> str | None:
    """'a' / 'b' from a label ('a', 'b', 'tie') or a ranking ([{value, rank}]); None for a tie."""
    if isinstance(value, str):
        return value if value in ("a", "b") else None
    if isinstance(value, list):
        ranks = {item.get("value"): item.get("rank") for item in value if isinstance(item, dict)}
        rank_a, rank_b = ranks.get("a"), ranks.get("b")
        if rank_a is None or rank_b is None or rank_a == rank_b:
            return None
        return "a" if rank_a < rank_b else "b"
    return None
