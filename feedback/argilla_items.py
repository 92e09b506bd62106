"""Heedful rows -> items to annotate (`PushItem`), for each input format push accepts.

- `responses` (the `generate` stage): one item per reply; for the preference template,
  replies of the same prompt are paired (sample 0 vs 1, 2 vs 3, ...).
- `preferences` (TRL prompt/chosen/rejected): the existing choice becomes a suggestion,
  and A/B positions are shuffled deterministically so annotators see no position bias.
- `span_feedback` / `verbal_feedback` / `reactions` (pipeline/schema.py records, e.g. from
  the simulator): the feedback becomes suggestions (pre-annotations) on the same reply.
- `qa_feedback` (FineGrainedRLHF's feedback json): the human feedback becomes submitted
  responses of an import user, so it can be pulled back like any annotation.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from feedback.sources.formats import detect_format as detect_source_format
from feedback.sources.qa_feedback import QA_LABELS, QA_PAIRS
from pipeline.chat import prompt_id, row_messages
from pipeline.errors import DataError

from .argilla_templates import PushItem, TemplateKind, stable_id

E = TypeVar("E")
InputFormat = Literal["auto", "responses", "preferences", "span_feedback", "verbal_feedback", "reactions", "qa_feedback"]
ACCEPTS: dict[str, set[str]] = {
    "responses": {"fine_grained", "verbal", "reaction", "preference"},
    "preferences": {"preference"},
    "span_feedback": {"fine_grained"},
    "verbal_feedback": {"verbal"},
    "reactions": {"reaction"},
    "qa_feedback": {"fine_grained", "preference"},
}
#: feedback/sources/formats.py's formats as push's input formats (TRL pairs and preference
#: records push alike, as do production logs and reaction records; follow-ups as replies)
_PUSH_FORMATS = {"trl_preferences": "preferences", "logs": "reactions", "followups": "responses"}


def detect_format(row: dict[str, Any]) -> str:
    """The push input format of a row (feedback/sources/formats.py decides, once for all readers)."""
    fmt = _PUSH_FORMATS.get(detect_source_format(row), detect_source_format(row))
    if fmt not in ACCEPTS:
        raise DataError(f"cannot tell the input format from columns {sorted(row)}: set input_format")
    return fmt


def to_items(
    rows: list[dict[str, Any]],
    kind: TemplateKind,
    fmt: str,
    defaults: dict[str, Any],
    import_user: str = "qa-feedback",
    where: str = "input",
) -> list[PushItem]:
    """Items for template `kind`; `defaults` fills metadata (run, stage) rows do not carry."""
    if not rows:
        return []
    fmt = _checked_format(rows, kind, fmt, where)
    if fmt == "qa_feedback":
        return qa_items(rows, kind, import_user, where)
    return [item for item, _ in sourced_items(rows, kind, fmt, defaults, where)]


def sourced_items(
    rows: list[dict[str, Any]], kind: TemplateKind, fmt: str, defaults: dict[str, Any], where: str = "input"
) -> list[tuple[PushItem, tuple[int, ...]]]:
    """Each item with the indices of the rows it came from (one reply or pair row, or the two
    replies a preference item pairs up), so a review selection can read their scores.
    qa-feedback imports are excluded: they already carry human answers."""
    if not rows:
        return []
    fmt = _checked_format(rows, kind, fmt, where)
    if fmt == "qa_feedback":
        raise DataError(f"{where}: qa-feedback rows are human feedback already; push them without `select`")
    if fmt == "preferences":
        return [(_preference_item(row, i, defaults, where), (i,)) for i, row in enumerate(rows)]
    if fmt == "responses" and kind == "preference":
        return _paired_items(rows, defaults, where)
    if fmt == "responses":
        return [(_reply_item(row, i, defaults, where), (i,)) for i, row in enumerate(rows)]
    return [(_feedback_item(row, i, fmt, defaults, where), (i,)) for i, row in enumerate(rows)]


def drop_repeats(entries: list[E], item_of: Callable[[E], PushItem]) -> tuple[list[E], int]:
    """`entries` with the first of each record id, and how many repeats were dropped.

    A record id is the sample's content (`stable_id(prompt, reply)`), so two identical sampled
    replies to one prompt are one record: pushing both failed ("items share an id"). Only a
    repeat with the same text is dropped; items that share an id but differ (rows carrying the
    same explicit id) are kept, so the push still refuses them."""
    first: dict[str, PushItem] = {}
    kept: list[E] = []
    for entry in entries:
        item = item_of(entry)
        seen = first.setdefault(item.id, item)
        if seen is not item and _text(seen) == _text(item):
            continue
        kept.append(entry)
    return kept, len(entries) - len(kept)


def _text(item: PushItem) -> tuple[Any, ...]:
    return item.prompt, item.response, item.response_a, item.response_b, item.context


def _checked_format(rows: list[dict[str, Any]], kind: TemplateKind, fmt: str, where: str) -> str:
    if fmt == "auto":
        fmt = detect_format(rows[0])
    if kind not in ACCEPTS[fmt]:
        raise DataError(
            f"{where}: input format '{fmt}' cannot fill the '{kind}' template (it fits: {', '.join(sorted(ACCEPTS[fmt]))})"
        )
    return fmt


def _need(row: dict[str, Any], i: int, where: str, *names: str) -> None:
    for name in names:
        if row.get(name) is None:
            raise DataError(f"{where} row {i}: field '{name}' is missing")


def _metadata(row: dict[str, Any], defaults: dict[str, Any], sample_id: str) -> dict[str, Any]:
    prov = row.get("provenance") or {}
    return {
        "model": row.get("model") or prov.get("model") or defaults.get("model"),
        "adapter": row.get("adapter") or prov.get("adapter") or None,
        "run": prov.get("run") or defaults.get("run"),
        "stage": prov.get("stage") or defaults.get("stage"),
        "sample_id": sample_id,
    }


def _sample_id(row: dict[str, Any]) -> str | None:
    if row.get("prompt_id") is not None and row.get("sample_index") is not None:
        return f"{row['prompt_id']}:{row['sample_index']}"
    return str(row["id"]) if row.get("id") is not None else None


def _reply_item(row: dict[str, Any], i: int, defaults: dict[str, Any], where: str) -> PushItem:
    _need(row, i, where, "prompt", "response")
    prompt, response = _prompt_of(row), str(row["response"])
    rid = stable_id(prompt, response)
    return PushItem(
        id=rid,
        prompt=prompt,
        response=response,
        context=row.get("context"),
        metadata=_metadata(row, defaults, _sample_id(row) or rid),
        suggestions=_row_suggestions(row),
    )


def _prompt_of(row: dict[str, Any]) -> Any:
    """The prompt as the sample saw it: with its system prompt when `generate` used one (else
    as given, so record ids of existing pushes stay the same)."""
    return row_messages(row) if row.get("system_prompt") else row["prompt"]


def _row_suggestions(row: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A `suggestions` column: {question: value} or {question: {value, score, agent}}."""
    out = {}
    for question, value in (row.get("suggestions") or {}).items():
        out[question] = value if isinstance(value, dict) and "value" in value else {"value": value}
        out[question].setdefault("agent", row.get("source") or "heedful")
    return out


def _flip(item_id: str) -> bool:
    return int(hashlib.sha1(item_id.encode()).hexdigest(), 16) % 2 == 1


def _preference_item(row: dict[str, Any], i: int, defaults: dict[str, Any], where: str) -> PushItem:
    _need(row, i, where, "prompt", "chosen", "rejected")
    rid = str(row["id"]) if row.get("id") else stable_id(row["prompt"], row["chosen"], row["rejected"])
    a, b, winner = row["chosen"], row["rejected"], "a"
    if _flip(rid):
        a, b, winner = b, a, "b"
    agent = (row.get("provenance") or {}).get("annotator") or row.get("source") or "heedful"
    suggestions = {"preference": {"value": winner, "agent": agent}}
    if row.get("rationale"):
        suggestions["rationale"] = {"value": row["rationale"], "agent": agent}
    return PushItem(
        id=rid,
        prompt=row["prompt"],
        response_a=a,
        response_b=b,
        suggestions=suggestions,
        metadata=_metadata(row, defaults, str(row.get("prompt_id") or rid)),
    )


def _paired_items(rows: list[dict[str, Any]], defaults: dict[str, Any], where: str) -> list[tuple[PushItem, tuple[int, ...]]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        _need(row, i, where, "prompt", "response")
        groups[str(row.get("prompt_id") or prompt_id(row["prompt"]))].append(i)
    items: list[tuple[PushItem, tuple[int, ...]]] = []
    for pid, group in groups.items():
        group.sort(key=lambda i: rows[i].get("sample_index", 0))
        for i, j in zip(group[0::2], group[1::2]):
            first, second = rows[i], rows[j]
            prompt = _prompt_of(first)
            rid = stable_id(prompt, first["response"], second["response"])
            item = PushItem(
                id=rid,
                prompt=prompt,
                response_a=first["response"],
                response_b=second["response"],
                metadata=_metadata(first, defaults, f"{pid}:{first.get('sample_index', 0)}v{second.get('sample_index', 1)}"),
            )
            items.append((item, (i, j)))
    return items


def _feedback_item(row: dict[str, Any], i: int, fmt: str, defaults: dict[str, Any], where: str) -> PushItem:
    _need(row, i, where, "prompt", "response")
    prov = row.get("provenance") or {}
    agent = prov.get("annotator") or prov.get("source") or "heedful"
    sug: dict[str, Any] = {}
    if fmt == "span_feedback":
        sug["spans"] = [{"label": s["label"], "start": s["start"], "end": s["end"]} for s in row.get("spans") or []]
        if row.get("corrected_response") is not None:
            sug["corrected_response"] = row["corrected_response"]
        if row.get("missing_info"):
            sug["missing_info"] = row["missing_info"]
    elif fmt == "verbal_feedback":
        sug = {"critique": row.get("critique"), "judgment": row.get("judgment"), "scope": row.get("scope")}
    elif fmt == "reactions":
        sug = {"reaction": row.get("reaction")}
    prompt, response = row["prompt"], str(row["response"])
    rid = stable_id(prompt, response)
    return PushItem(
        id=rid,
        prompt=prompt,
        response=response,
        metadata=_metadata(row, defaults, str(row.get("id") or rid)),
        suggestions={q: {"value": v, "agent": agent} for q, v in sug.items() if v not in (None, [])},
    )


# -- FineGrainedRLHF qa-feedback -------------------------------------------------------------


def _passages(row: dict[str, Any]) -> str:
    parts = []
    for passage in row.get("passages") or []:
        if passage:
            title, *sentences = passage
            parts.append(f"**{title}**\n\n" + " ".join(str(s) for s in sentences))
    return "\n\n---\n\n".join(parts)


def qa_items(rows: list[dict[str, Any]], kind: str, user: str, where: str) -> list[PushItem]:
    """qa-feedback rows -> fine-grained items (human spans/corrections as `user`'s submitted
    responses) or preference items (the 6 pairwise judgments among the 4 answers)."""
    items = []
    for n, row in enumerate(rows):
        _need(row, n, where, "question", "prediction 1", "feedback")
        base = {"model": "qa_feedback", "run": None, "stage": None}
        if kind == "fine_grained":
            fb = row["feedback"]
            text = row["prediction 1"]
            spans = []
            for j, err in enumerate(fb.get("errors") or []):
                label = QA_LABELS.get(err.get("error type"))
                if label is None:
                    raise DataError(
                        f"{where} row {n}: feedback.errors[{j}].error type {err.get('error type')!r} "
                        f"is not one of {sorted(QA_LABELS)}"
                    )
                spans.append({"label": label, "start": err["start"], "end": err["end"]})
            values = {"spans": spans, "corrected_response": fb.get("corrected-prediction")}
            if fb.get("missing-info"):
                values["missing_info"] = json.dumps(fb["missing-info"], ensure_ascii=False)
            explanations = [e.get("explanation", "") for e in fb.get("errors") or []]
            items.append(
                PushItem(
                    id=f"qa{n:04d}",
                    prompt=row["question"],
                    response=text,
                    context=_passages(row),
                    metadata={**base, "sample_id": f"qa{n:04d}:1"},
                    extra={"qa_span_explanations": json.dumps(explanations, ensure_ascii=False)} if any(explanations) else {},
                    responses=[{"user": user, "values": values, "status": "submitted"}],
                )
            )
        else:
            prefs = row.get("preference") or []
            if len(prefs) != len(QA_PAIRS):
                raise DataError(f"{where} row {n}: preference has {len(prefs)} values, expected {len(QA_PAIRS)}")
            for (i, j), value in zip(QA_PAIRS, prefs):
                label = {1: "a", 2: "b", 0: "tie"}.get(value)
                if label is None:
                    raise DataError(f"{where} row {n}: preference value {value!r} is not 0, 1 or 2")
                items.append(
                    PushItem(
                        id=f"qa{n:04d}-{i}v{j}",
                        prompt=row["question"],
                        response_a=row[f"prediction {i}"],
                        response_b=row[f"prediction {j}"],
                        metadata={**base, "sample_id": f"qa{n:04d}:{i}v{j}"},
                        responses=[{"user": user, "values": {"preference": label}, "status": "submitted"}],
                    )
                )
    return items


def qa_expected(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What a pull of imported qa-feedback must give back (for checks and tests)."""
    spans, prefs = {}, {}
    for n, row in enumerate(rows):
        fb = row["feedback"]
        spans[f"qa{n:04d}"] = {
            "spans": sorted((e["start"], e["end"], QA_LABELS[e["error type"]]) for e in fb["errors"]),
            "corrected_response": fb["corrected-prediction"],
            "missing_info": fb["missing-info"],
        }
        for (i, j), value in zip(QA_PAIRS, row["preference"]):
            prefs[f"qa{n:04d}-{i}v{j}"] = value
    return {"span_feedback": spans, "preferences": prefs}
