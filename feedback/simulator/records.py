"""Transcripts -> heedful feedback records (pipeline/schema.py), each with provenance.

From one transcript:
  followups        every system turn and the user's next turn (FLR's raw material)
  verbal_feedback  every judged response with the user's critique or thanks
  reactions        every judged response: love / neutral / dislike from the satisfaction
  preferences      revised response preferred over the response that drew negative feedback
                   (rule `revised`), or only where the simulator also scored the revision
                   higher: more known facts mentioned, else a higher P(Yes) (`improved`)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from pipeline.schema import FollowUp, Preference, Provenance, Reaction, VerbalFeedback

from .protocol import Transcript, reaction_for


@dataclass
class ProvenanceInfo:
    simulator: str  # backend identity, e.g. hf:smollm2-135m
    policy_model: str
    policy_adapter: str | None
    seed: int
    prompt_version: str
    threshold: float
    judge: str = "verbal"
    run: str | None = None
    stage: str | None = None

    def for_(self, transcript: Transcript, round_: int, record_id: str) -> Provenance:
        extra = {
            "simulator_model": self.simulator,
            "seed": self.seed,
            "prompt_version": self.prompt_version,
            "persona": transcript.user.persona,
            "style": transcript.user.style,
            "need": transcript.user.need,
            "round": round_,
            "satisfied_threshold": self.threshold,
            "judge": self.judge,
            "facts_known": bool(transcript.user.facts),
        }
        return Provenance(
            source="convsim",
            annotator=f"convsim:{self.simulator}",
            model=self.policy_model,
            adapter=self.policy_adapter,
            record_id=record_id,
            run=self.run,
            stage=self.stage,
            dataset=transcript.user.id,
            extra=json.dumps(extra, sort_keys=True),
        )


def _messages(utterances) -> list[dict[str, str]]:
    return [{"role": "user" if u.participant == "user" else "assistant", "content": u.text} for u in utterances]


def _with_system(transcript: Transcript, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    system = transcript.user.system_prompt
    return ([{"role": "system", "content": system}] if system else []) + messages


def _score(u) -> tuple[float, float]:
    """How much the simulator liked a response: facts mentioned first (when known), then P(Yes)."""
    return (u.fact_coverage if u.fact_coverage is not None else 0.0, u.satisfaction or 0.0)


def transcript_records(
    t: Transcript, info: ProvenanceInfo, neutral_band: float, pair_rule: Literal["revised", "improved"] = "revised"
):
    """-> (followups, verbal, reactions, preferences) for one transcript."""
    followups, verbal, reactions, prefs = [], [], [], []
    cid = t.user.id
    utts = t.utterances
    responses: list[int] = []
    for i, u in enumerate(utts):
        if u.participant != "system" or i + 1 >= len(utts):
            if u.participant == "system" and u.type == "response" and u.satisfaction is not None:
                responses.append(i)
            continue
        nxt = utts[i + 1]
        prompt = _with_system(t, _messages(utts[:i]))
        rid = f"{cid}:t{i}"
        prov = info.for_(t, u.round, rid)
        satisfied = nxt.satisfied if nxt.type == "feedback" else None
        aspect = "answer" if nxt.type == "answer" else ("thanks" if nxt.satisfied else "feedback")
        followups.append(
            FollowUp(
                id=rid, prompt=prompt, response=u.text, followup=nxt.text, satisfied=satisfied, aspect=aspect, provenance=prov
            )
        )
        if u.type == "response" and u.satisfaction is not None:
            responses.append(i)
            verbal.append(
                VerbalFeedback(
                    id=rid,
                    prompt=prompt,
                    response=u.text,
                    critique=nxt.text,
                    judgment="good" if u.satisfied else "needs_work",
                    scope=t.user.need,
                    provenance=prov,
                )
            )
    for i in responses:
        u = utts[i]
        assert u.satisfaction is not None  # `responses` holds scored responses only
        rid = f"{cid}:t{i}"
        reactions.append(
            Reaction(
                id=rid,
                prompt=_with_system(t, _messages(utts[:i])),
                response=u.text,
                reaction=reaction_for(u.satisfaction, info.threshold, neutral_band, bool(u.satisfied)),
                user_id=f"convsim:{cid}",
                provenance=info.for_(t, u.round, rid),
            )
        )
    for a, b in zip(responses, responses[1:]):
        bad, good = utts[a], utts[b]
        drew_negative = a + 1 < len(utts) and utts[a + 1].type == "feedback" and not utts[a + 1].satisfied
        if not drew_negative or good.text.strip() == bad.text.strip() or not good.text.strip():
            continue
        if pair_rule == "improved" and not _score(good) > _score(bad):
            continue
        # the task as posed: the question and any clarifying exchanges before the revision, no feedback turns
        context = [x for x in utts[:b] if x.type in ("question", "clarifying_question", "answer")]
        rid = f"{cid}:pair{a}-{b}"
        prefs.append(
            Preference(
                id=rid,
                prompt=_with_system(t, _messages(context)),
                chosen=[{"role": "assistant", "content": good.text}],
                rejected=[{"role": "assistant", "content": bad.text}],
                rationale=utts[a + 1].text,
                provenance=info.for_(t, good.round, rid),
            )
        )
    return followups, verbal, reactions, prefs


def save_dataset(rows: list[dict], columns: list[str], path) -> None:
    """save_rows, except that an empty output still gets its columns (readable, zero rows)."""
    import os
    import shutil
    from pathlib import Path

    from pipeline.records import save_rows

    if rows:
        save_rows(rows, path)
        return
    from datasets import Dataset, Features, Value

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    empty = Dataset.from_dict({c: [] for c in columns}, features=Features({c: Value("string") for c in columns}))
    empty.save_to_disk(str(tmp), num_shards=1)  # without a shard, datasets cannot load a 0-row dataset
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
