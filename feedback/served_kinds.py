"""Which of the server's feedback records become which heedful datasets: one table.

Why one place: `serve_pull` (feedback pulled from a running server) and `heedful memory
export` (feedback read from the server's memory file) turn the same stored records into
training data. When each kept its own list, the export silently dropped users' edits and
follow-ups that the pull kept. Both read `OUTPUT_OF` now, so a kind the server starts
logging is added once, here (tests/test_memory_export_kinds.py checks the table covers every
served record class in `pipeline.schema.KINDS`).
"""

from __future__ import annotations

from typing import Any

#: record kind (as the server stores it) -> heedful artifact kind (a key of pipeline.schema.KINDS)
OUTPUT_OF: dict[str, str] = {
    "reaction": "reactions",
    "verbal": "verbal_feedback",
    "preference": "preferences",
    "followup": "followups",
}


def artifact_kind(record_kind: str | None) -> str | None:
    """The dataset a stored record of `record_kind` belongs to; None for a kind no dataset takes."""
    return OUTPUT_OF.get(record_kind or "")


def conversational_preference(record: dict[str, Any]) -> dict[str, Any]:
    """A preference record with prompt/chosen/rejected as chat messages (TRL's conversational columns).

    The server stores a user's edit with plain-text `chosen` (the edit) and `rejected` (the
    reply); pairs derived from reactions are conversational. A dataset must have one shape
    per column, so plain texts become one assistant message (the prompt one user message).
    """
    from pipeline.chat import as_messages, matched_pair

    return {**record, **matched_pair(as_messages(record["prompt"]), record["chosen"], record["rejected"])}
