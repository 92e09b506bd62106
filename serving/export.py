"""Turn what serving collected into datasets the next training round reads.

Written under one folder (temp folder + rename, so a crash leaves nothing half-written):
  reactions/         Reaction records (P[Love] reward model)
  verbal_feedback/   VerbalFeedback records: critiques and clarifications (C3PO, CUT, CoH)
  preferences/       Preference pairs in TRL's conversational columns (DPO):
                     - a user's edit: their text (chosen) over the reply (rejected);
                     - same prompt, a loved reply vs. a disliked one;
                     - memory distillation: a reply the user had to clarify (rejected) vs. a later
                       reply to the same request that used that clarification from memory and was
                       loved (chosen), with the *unedited* prompt, so the policy learns to answer
                       as if it had the clarification.
  followups/         FollowUp records: the user's next turn after a reply (FLR)
  memory.jsonl       the memory entries (less those whose clarification was quarantined)
  quarantine/        quarantine.jsonl: the feedback held back, each with its reason (see below)
  export.json        counts and where it came from
A kind with no records is left out (an empty `datasets` folder cannot be loaded back).
Which stored record becomes which dataset is `feedback.served_kinds.OUTPUT_OF`, the table
`serve_pull` reads too, so the two ways out of the server keep the same feedback.

Every feedback record passes `feedback.quarantine` first (verified author, per-user rate
and volume caps, instruction-like clarifications, injections, duplicates and floods); only
what it keeps becomes reactions, verbal feedback, preference pairs and follow-ups.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from feedback.quarantine import QuarantineSettings, candidate_from_record, quarantine
from feedback.served_kinds import OUTPUT_OF, artifact_kind, conversational_preference
from pipeline.records import save_rows, write_jsonl
from pipeline.schema import Preference, Provenance, records_to_rows, rows_to_records

from .store import MemoryStore

if TYPE_CHECKING:
    from pydantic import BaseModel


def _norm(messages: list[dict[str, str]]) -> str:
    return json.dumps([[m.get("role"), " ".join(m.get("content", "").split()).lower()] for m in messages])


def preference_pairs(store: MemoryStore, records: list[dict[str, Any]] | None = None) -> list[Preference]:
    """Pairs from `records` (the feedback records that passed quarantine; default: all of them)."""
    convs = {c.id: c for c in store.conversations()}
    reactions: dict[str, str] = {}
    clarified: dict[str, int] = {}  # conversation id -> memory id of its clarification
    records = store.feedback() if records is None else records
    for row in (r for r in records if r.get("kind") == "reaction"):
        reactions[row["provenance"]["record_id"]] = row["reaction"]  # the latest reaction wins
    for row in (r for r in records if r.get("kind") == "verbal"):
        extra = json.loads(row["provenance"].get("extra") or "{}")
        if extra.get("feedback") == "clarification":
            clarified[row["provenance"]["record_id"]] = extra.get("memory_id")
    pairs: list[Preference] = []
    seen: set[tuple[str, str]] = set()

    def add(prompt_conv, chosen_conv, rejected_conv, why: str) -> None:
        key = (chosen_conv.id, rejected_conv.id)
        if key in seen or chosen_conv.response.strip() == rejected_conv.response.strip():
            return
        seen.add(key)
        pairs.append(
            Preference(
                id=f"pref:{chosen_conv.id}:{rejected_conv.id}",
                prompt=prompt_conv.messages,
                chosen=[{"role": "assistant", "content": chosen_conv.response}],
                rejected=[{"role": "assistant", "content": rejected_conv.response}],
                rationale=why,
                provenance=Provenance(
                    source="serving",
                    annotator=chosen_conv.user,
                    model=chosen_conv.model,
                    adapter=chosen_conv.adapter,
                    dataset=str(store.path),
                    record_id=chosen_conv.id,
                    extra=json.dumps({"rejected_conversation": rejected_conv.id}),
                ),
            )
        )

    by_prompt: dict[str, list] = {}
    for conv in convs.values():
        by_prompt.setdefault(_norm(conv.messages), []).append(conv)
    memory_source = {mid: cid for cid, mid in clarified.items() if mid is not None}
    for group in by_prompt.values():
        loved = [c for c in group if reactions.get(c.id) == "love"]
        disliked = [c for c in group if reactions.get(c.id) == "dislike"]
        for good in loved:
            for bad in disliked:
                add(good, good, bad, "same prompt: loved vs. disliked reply")
    for conv in convs.values():
        if reactions.get(conv.id) != "love":
            continue
        for mid in conv.memory_ids:
            source = convs.get(memory_source.get(mid, ""))
            if source is not None and source.id != conv.id:
                add(conv, conv, source, f"memory distillation: reply with clarification #{mid} vs. the clarified reply")
    return pairs


def kept_datasets(records: list[dict[str, Any]], where: str) -> dict[str, list[BaseModel]]:
    """Artifact kind -> the validated records of that kind (every kind of `OUTPUT_OF`, in its order).

    Edits are stored with plain-text chosen/rejected; here they take the conversational shape
    of the pairs `preference_pairs` adds to the same dataset."""
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in dict.fromkeys(OUTPUT_OF.values())}
    for record in records:
        name = artifact_kind(record.get("kind"))
        if name is not None:
            rows[name].append(conversational_preference(record) if name == "preferences" else record)
    return {name: rows_to_records(name, kind_rows, f"{where} ({name})") for name, kind_rows in rows.items()}


def export_memory(memory: str | Path, dest: str | Path, screen: QuarantineSettings | None = None) -> dict[str, Any]:
    """Write every dataset under `dest` (replaced atomically); returns the counts (quarantine's too)."""
    memory, dest = Path(memory), Path(dest)
    if not memory.is_file():
        raise FileNotFoundError(f"{memory}: no memory file")
    store = MemoryStore(memory)
    screened = quarantine([candidate_from_record(record, created) for created, record in store.feedback_rows()], screen)
    kept = [c.record for c in screened.kept]
    datasets = kept_datasets(kept, f"{memory} feedback")
    datasets["preferences"] += preference_pairs(store, kept)
    held_memory = {
        json.loads(h.candidate.record["provenance"].get("extra") or "{}").get("memory_id")
        for h in screened.quarantined
        if h.candidate.kind == "clarification"
    }
    entries = [e.public() for e in store.entries() if e.id not in held_memory]
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    screen_counts = screened.counts()  # quarantined first: the report shows a stage's first metrics
    counts = {
        **{name: len(records) for name, records in datasets.items()},
        **{k: v for k, v in screen_counts.items() if k != "kept"},
        "memory": len(entries),
        "conversations": len(store.conversations()),
        "kept": screen_counts["kept"],
    }
    for name, records in datasets.items():
        rows = records_to_rows(records)
        if rows:
            save_rows(rows, tmp / name)
    write_jsonl(entries, tmp / "memory.jsonl")
    (tmp / "quarantine").mkdir()
    write_jsonl([h.row() for h in screened.quarantined], tmp / "quarantine" / "quarantine.jsonl")
    (tmp / "export.json").write_text(
        json.dumps({"memory": str(memory.resolve()), "exported": time.time(), "counts": counts}, indent=2)
    )
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    store.close()
    return counts
