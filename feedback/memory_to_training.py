"""What users taught the memory becomes the next adapter's training data.

MemPrompt keeps a user's clarification ("when I ask 'akin to', I want a synonym") and attaches
it to later requests like the one it was given on. That helps only while the entry stays in
memory, and every request pays a retrieval and a longer prompt. This turns the memory into
training rows: the request *as the user sent it* (without the clarification) and the reply the
user accepted once the model heeded the clarification, so an adapter trained on them answers
that way with memory off, and the memory can be cleared without losing what users taught
(bench/memprompt_adapter.py measures whether it does; docs/memory-to-adapter.md).

Input: an export folder (`heedful memory export`, `serving.export.export_memory`), whose
feedback already passed the quarantine: `memory.jsonl` (the entries: key query,
clarification, owner, shared flag, the completion it was given on) and `preferences/`.
An entry's accepted answers are
  - the user's `edit` of the clarified reply (their own words for the reply they wanted), and
  - a reply the user loved that used this entry from memory, or that answered the same request
    (the export's memory-distillation and same-prompt pairs whose *rejected* reply is the one
    the user clarified).
An entry without one (the model missed again, or the user never came back) teaches nothing
yet: it is skipped and counted.

Two shapes of output:
- `preferences`: `Preference` records (prompt, chosen = the accepted answer, rejected = the reply
  the user clarified), so `sft` trains on `chosen` and `dpo` can use the pair as it stands. (For
  a memory-distillation pair the rejected reply answered the *earlier* request of the same
  phrasing, as in the export.) The same (prompt, accepted answer) is kept once.
- `c3po_data`: the same rows in scope (baseline = the clarified reply, revised = the accepted
  answer), plus *anchors* out of scope: replies the user loved that needed no clarification
  (no memory used). Trained on corrections alone, an adapter learns "say what the corrections
  said" for every request and forgets what the model already did right (measured: SmolLM2
  trained on 49 homophone/synonym corrections named "homophone" for every antonym query,
  docs/memory-to-adapter.md); the anchors are C3PO's regularizer for exactly that, and the
  `sft` stage's `data` input trains on both.

Privacy: a private entry steers only its owner's requests. Rows for one adapter that every
user gets (`user=None`) come only from shared entries and from a single-user server's memory
(owner `default`, which the server's global scope already applies to every request); rows for
one user's adapter (`user="alice"`) come from alice's own entries, and only from alice's own
conversations (anchors too): another user's entry, private or shared, is never mixed in. A shared
entry of bob's teaches alice's adapter nothing even when alice loved a reply that used it, because
the pair's rejected reply is the one bob clarified, in bob's conversation (counted as
`replies_from_other_users`); shared entries reach every user through the adapter everyone gets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from pipeline.errors import DataError
from pipeline.records import load_rows, write_jsonl
from pipeline.schema import Preference, Provenance, Reaction, records_to_rows, rows_to_records
from serving.identity import SINGLE_USER


@dataclass
class MemoryTraining:
    """Training rows from one export, the anchors, and what was left out (by reason)."""

    rows: list[Preference]
    anchors: list[Reaction] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def row_dicts(self) -> list[dict[str, Any]]:
        return records_to_rows(cast("list[Any]", self.rows))

    def c3po_rows(self) -> list[dict[str, Any]]:
        """c3po_data rows: the memory rows in scope, the anchors out of scope."""
        from pipeline.chat import reply_text  # how `sft` reads a reply: the same text here

        out = []
        for row in self.rows:
            extra = row.provenance.extras()
            out.append(
                {
                    "id": row.id,
                    "scope": "in_scope",
                    "prompt": row.prompt,
                    "baseline": reply_text(row.rejected),
                    "revised": reply_text(row.chosen),
                    "feedback": extra["clarification"],
                    "memory_id": extra["memory_id"],
                }
            )
        for anchor in self.anchors:
            out.append(
                {"id": f"anchor:{anchor.id}", "scope": "out_of_scope", "prompt": anchor.prompt, "baseline": anchor.response}
            )
        return out


def _norm(prompt: Any) -> str:
    if isinstance(prompt, str):
        return " ".join(prompt.split()).lower()
    return json.dumps([[m.get("role"), " ".join(str(m.get("content", "")).split()).lower()] for m in prompt])


def _usable(entry: dict[str, Any], user: str | None) -> bool:
    """May this entry teach the adapter for `user` (None: the adapter every user gets)?"""
    if entry.get("shared"):
        return True
    owner = entry.get("user")
    return owner in (None, SINGLE_USER) if user is None else owner == user


def _accepted_pairs(prefs: list[Preference]) -> dict[str, list[Preference]]:
    """Completion id the user clarified -> pairs whose chosen reply the user accepted for that request."""
    out: dict[str, list[Preference]] = {}
    for pref in prefs:
        extra = pref.provenance.extras()
        if extra.get("feedback") == "edit":  # the user's edit of that very completion
            target = extra.get("completion_id") or pref.provenance.record_id
        else:  # export pairs: a loved reply over the clarified one
            target = extra.get("rejected_conversation")
        if target:
            out.setdefault(str(target), []).append(pref)
    return out


def memory_training_rows(export_dir: str | Path, user: str | None = None) -> MemoryTraining:
    """SFT/DPO rows from an export folder; `user`: rows for that user's own adapter (see the module doc)."""
    export_dir = Path(export_dir)
    memory_file = export_dir / "memory.jsonl"
    if not memory_file.is_file():
        raise DataError(f"{memory_file}: not found (give the folder `heedful memory export` wrote)")
    entries = load_rows(memory_file, required=["id", "key_query", "clarification"], what="memory entries")
    pref_dir = export_dir / "preferences"
    prefs = cast(
        "list[Preference]",
        rows_to_records("preferences", load_rows(pref_dir), where=str(pref_dir)) if pref_dir.exists() else [],
    )
    accepted = _accepted_pairs(prefs)
    counts = {
        "entries": len(entries),
        "entries_used": 0,
        "skipped_other_users": 0,
        "skipped_no_accepted_answer": 0,
        "answers_from_other_users": 0,
        "replies_from_other_users": 0,
        "duplicates": 0,
        "rows": 0,
    }
    rows: list[Preference] = []
    seen: set[tuple[str, str]] = set()
    for entry in entries:
        if not _usable(entry, user):
            counts["skipped_other_users"] += 1
            continue
        pairs = accepted.get(str(entry.get("conversation_id")), []) if entry.get("conversation_id") else []
        if user is not None:  # one user's adapter learns only from that user's own conversations
            own = [p for p in pairs if p.provenance.annotator == user]
            counts["answers_from_other_users"] += len(pairs) - len(own)
            pairs = own
            if pairs and entry.get("user") != user:
                # another user's shared entry: every pair's rejected reply is the one that user
                # clarified, in their own conversation, so none of it goes into this user's rows
                counts["replies_from_other_users"] += len(pairs)
                continue
        if not pairs:
            counts["skipped_no_accepted_answer"] += 1
            continue
        counts["entries_used"] += 1
        for pref in pairs:
            key = (_norm(pref.prompt), _norm(pref.chosen))
            if key in seen:
                counts["duplicates"] += 1
                continue
            seen.add(key)
            rows.append(_row(entry, pref))
    counts["rows"] = len(rows)
    anchors = _anchors(export_dir, user, counts)
    return MemoryTraining(rows, anchors, counts)


def _anchors(export_dir: Path, user: str | None, counts: dict[str, int]) -> list[Reaction]:
    """Replies the user loved that used no memory (what the model already did right), each once."""
    folder = export_dir / "reactions"
    reactions = cast(
        "list[Reaction]", rows_to_records("reactions", load_rows(folder), where=str(folder)) if folder.exists() else []
    )
    counts.update(anchors=0, anchors_from_other_users=0)
    out: list[Reaction] = []
    seen: set[tuple[str, str]] = set()
    for reaction in reactions:
        extra = reaction.provenance.extras()
        if reaction.reaction != "love" or extra.get("memory_ids") or extra.get("prompt_edited"):
            continue
        if user is not None and reaction.provenance.annotator != user:
            counts["anchors_from_other_users"] += 1
            continue
        key = (_norm(reaction.prompt), _norm(reaction.response))
        if key not in seen:
            seen.add(key)
            out.append(reaction)
    counts["anchors"] = len(out)
    return out


def _row(entry: dict[str, Any], pref: Preference) -> Preference:
    extra = {
        **pref.provenance.extras(),
        "memory_id": entry["id"],
        "clarification": entry["clarification"],
        "key_query": entry["key_query"],
        "pair": pref.id,
    }
    return Preference(
        id=f"memory:{entry['id']}:{pref.id}",
        prompt=pref.prompt,
        chosen=pref.chosen,
        rejected=pref.rejected,
        rationale=f"heeds memory #{entry['id']}: {entry['clarification']}",
        provenance=Provenance(**{**pref.provenance.model_dump(), "extra": json.dumps(extra)}),
    )


def write_memory_training(
    export_dir: str | Path, dest: str | Path, user: str | None = None, shape: Literal["preferences", "c3po_data"] = "preferences"
) -> dict[str, int]:
    """Write the rows as JSONL at `dest` (atomically) in `shape` (see the module doc); returns the counts."""
    result = memory_training_rows(export_dir, user)
    write_jsonl(result.row_dicts() if shape == "preferences" else result.c3po_rows(), Path(dest))
    return result.counts
