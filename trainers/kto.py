"""KTO's data: binary signals as TRL's unpaired rows (prompt, completion, label).

KTO (Ethayarajh et al., "KTO: Model Alignment as Prospect Theoretic Optimization", 2024)
learns from a thumbs-up / thumbs-down per reply, no pairs needed; the loss itself is TRL's
`KTOTrainer` (the `kto` stage). This module turns every binary signal heedful collects into
its rows, one reader for all of them:

- rows already in TRL's format: `prompt`, `completion`, `label` (true = desirable);
- reactions (`Reaction` records from simulate, Argilla, the server's `/v1/feedback` export):
  love / like / thumbs_up are desirable, dislike / thumbs_down undesirable, neutral is left out;
- judgments (VerbalFeedback records with judgment good / needs_work, or judgment rows with
  `positive`), read by feedback/sources/judgments.py.

Imports no heavy library.
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import DataError

DESIRABLE_REACTIONS = frozenset({"love", "like", "thumbs_up"})
UNDESIRABLE_REACTIONS = frozenset({"dislike", "thumbs_down"})
IGNORED_REACTIONS = frozenset({"neutral"})
_TRUE, _FALSE = {"true", "1", "desirable", "positive", "good"}, {"false", "0", "undesirable", "negative", "bad", "needs_work"}


def unpaired_rows(rows: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """Rows of any binary-signal shape -> [{prompt, completion, label}] (neutral reactions dropped).

    `prompt` stays text or messages as given; `completion` is the reply text."""
    from feedback.sources import judgments

    out: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        at = f"{where} row {i}"
        if "reaction" in row:
            label = reaction_label(row["reaction"], at)
            if label is not None and row.get("response") == "":
                continue  # a reaction to an empty reply: no completion tokens to learn from (read_feedback counts it)
            if label is not None:
                out.append({"prompt": _field(row, "prompt", at), "completion": str(_field(row, "response", at)), "label": label})
        elif "label" in row and "completion" in row:
            out.append(
                {"prompt": _field(row, "prompt", at), "completion": str(row["completion"]), "label": _label(row["label"], at)}
            )
        elif "critique" in row and "judgment" in row:  # VerbalFeedback: good -> desirable, needs_work -> not
            if row["judgment"] not in ("good", "needs_work"):
                raise DataError(f"{at}: field 'judgment': expected good or needs_work, got {row['judgment']!r}")
            item = judgments.from_verbal([{"id": str(row.get("id", i)), **row}])[0]
            out.append({"prompt": item["instruction"], "completion": str(item["response"]), "label": item["positive"]})
        else:
            item = judgments.normalize([row], at)[0]
            out.append({"prompt": item["instruction"], "completion": str(item["response"]), "label": item["positive"]})
    return out


def read_feedback(path, log) -> list[dict[str, Any]]:
    """The `feedback` file as unpaired rows; KTO needs both desirable and undesirable ones."""
    from pipeline.records import load_rows

    raw = load_rows(path, what="binary feedback")
    rows = unpaired_rows(raw, str(path))
    empty = sum(
        1 for r in raw if "reaction" in r and r.get("response") == "" and str(r["reaction"]).lower() not in IGNORED_REACTIONS
    )
    if empty:
        log.warning("%d reaction(s) to an empty reply skipped (no completion tokens to learn from)", empty)
    desirable = sum(r["label"] for r in rows)
    if not desirable or desirable == len(rows):
        raise DataError(f"{path}: KTO needs desirable and undesirable replies, got {desirable} of {len(rows)} desirable")
    log.info("%d replies (%d desirable, %d undesirable)", len(rows), desirable, len(rows) - desirable)
    return rows


def reaction_label(reaction: Any, where: str) -> bool | None:
    """True for a desirable reaction, False for an undesirable one, None for neutral."""
    value = str(reaction).strip().lower()
    if value in DESIRABLE_REACTIONS:
        return True
    if value in UNDESIRABLE_REACTIONS:
        return False
    if value in IGNORED_REACTIONS:
        return None
    known = sorted(DESIRABLE_REACTIONS | UNDESIRABLE_REACTIONS | IGNORED_REACTIONS)
    raise DataError(f"{where}: field 'reaction': {reaction!r} is not one of {', '.join(known)}")


def _label(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).strip().lower() in _TRUE:
        return True
    if str(value).strip().lower() in _FALSE:
        return False
    raise DataError(f"{where}: field 'label': expected true/false (desirable/undesirable), got {value!r}")


def _field(row: dict[str, Any], name: str, where: str) -> Any:
    if row.get(name) in (None, ""):
        raise DataError(f"{where}: field '{name}' is missing")
    return row[name]


def trl_format(rows: list[dict[str, Any]], conversational: bool) -> list[dict[str, Any]]:
    """TRL's unpaired columns: messages (prompt turns + one assistant turn) for a chat model,
    else plain text (a conversation's turns joined by newlines)."""
    from pipeline.chat import as_messages, assistant, prompt_text

    out = []
    for row in rows:
        if conversational:
            prompt: Any = as_messages(row["prompt"])
            completion: Any = assistant(row["completion"])
        else:
            prompt, completion = prompt_text(row["prompt"]), row["completion"]
        out.append({"prompt": prompt, "completion": completion, "label": bool(row["label"])})
    return out
