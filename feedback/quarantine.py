"""Quarantine: users' feedback is untrusted input; hold back what should not train a model.

Served feedback (clarifications, critiques, reactions) becomes training data (`memory
export` -> `verbal_feedback`, `reactions`, `preferences`; the closed loop of issue 14).
One hostile user must not be able to steer that data, so before any training stage uses
a record it passes these checks, in this order (the first that fails names the reason):

1. ``unverified_author`` — the record's author was not proved by a credential (a server
   without auth, or a record from before authors were recorded). `allow_unverified` lifts it.
2. ``rate_cap`` — the author sent more than `max_per_user_per_hour` records within an hour
   (every submission counts, also the ones held back for another reason).
3. ``injection`` — text (any kind) that tries to reach past the data: "ignore previous
   instructions", "system prompt", "you are now", links, e-mail addresses, passwords,
   keys and tokens, "send/forward/upload ... to".
4. ``instruction`` — a *clarification* says what the user meant by a request ("by 'akin
   to' I mean a synonym"); one that tells the model how to behave from now on ("always",
   "never", "from now on", "in every answer", "answer in French", "pretend", "do not
   answer") is an instruction, not a clarification. Critiques are exempt from this one:
   "always cite sources" is legitimate critique (C3PO trains on exactly that) and gets
   checks 3, 5 and 6 only.
5. ``duplicate`` — the same author sent the same or nearly the same feedback on the same
   or nearly the same request before: the feedback texts (what the user wrote in this
   record) AND the requests are each near-identical (normalised, character 5-shingles,
   Jaccard >= `near_duplicate`; candidates found with MinHash LSH on the text, then both
   Jaccards are computed exactly). The request is part of it because one clarification
   legitimately recurs on different requests ("I want a synonym"): each is a different
   training example. The two are compared separately, not as one concatenated string,
   because a request can be longer than the feedback and even contain the user's earlier
   feedback (a second turn's request is their critique): "Thanks, that is what I needed."
   after the critique "you missed the question: ..." shares most shingles with it when
   joined to its request, yet is a different text.
6. ``flood`` — more than `max_copies` near-identical feedbacks on a near-identical request
   across authors (a campaign): the first `max_copies` are kept, the rest held back.
7. ``volume_cap`` — an author already has `max_per_user` records kept in this batch.

The heuristic is deliberately conservative: a false alarm costs one record held back for a
person to read (`quarantine.jsonl` beside the export), a miss lets one user's words into
every user's model. It is a screen, not a proof: paraphrased instructions, other languages
and slow, patient poisoning within the caps get through (docs/security.md).

Pure Python (+ numpy); no torch, so a pipeline stage or a server can call it cheaply.
"""

from __future__ import annotations

import json
import re
import unicodedata
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

REASONS = ("unverified_author", "rate_cap", "injection", "instruction", "duplicate", "flood", "volume_cap")

_LANGUAGES = (
    "english|french|german|spanish|italian|portuguese|dutch|russian|chinese|mandarin|japanese|korean|"
    "arabic|hindi|turkish|polish|swedish|greek|hebrew|latin|klingon|pig latin|emoji|emojis|code|base64|"
    "rot13|binary|hex"
)

#: (name, pattern) that mark text reaching past the data, whatever kind of feedback it is
INJECTION_PATTERNS: list[tuple[str, re.Pattern]] = [
    (name, re.compile(p, re.IGNORECASE))
    for name, p in [
        (
            "overrides instructions",
            r"\b(ignore|disregard|forget|override|bypass)\b.{0,40}\b(previous|prior|above|earlier|"
            r"all|any|your|the)\b.{0,20}\b(instructions?|prompts?|rules?|guidelines?|context)\b",
        ),
        ("addresses the system prompt", r"\b(system|developer)\s+(prompt|message|instructions?)\b"),
        ("re-casts the assistant", r"\b(you are now|act as|you must now|new (instructions?|persona|rules?))\b"),
        ("contains a link", r"(https?://|\bwww\.|\b[a-z0-9-]+\.(com|net|org|io|ru|cn|xyz|info|biz)\b)"),
        ("contains an e-mail address", r"\b[\w.+-]+@[\w-]+\.[\w.-]+\b"),
        (
            "mentions credentials",
            r"\b(password|passwd|passphrase|api[ _-]?keys?|secret keys?|access tokens?|"
            r"credentials?|credit card|social security|ssh key|private key)\b",
        ),
        (
            "asks to send data somewhere",
            r"\b(send|forward|upload|post|email|e-mail|transfer|exfiltrate|leak|share)\b"
            r".{0,40}\b(to|at|via)\b",
        ),
        ("chat markup", r"(<\|[a-z_]+\|>|\[/?inst\]|<<sys>>|</?s>)"),
    ]
]

#: (name, pattern) that make a "clarification" an instruction about future behaviour
INSTRUCTION_PATTERNS: list[tuple[str, re.Pattern]] = [
    (name, re.compile(p, re.IGNORECASE))
    for name, p in [
        (
            "standing order ('always'/'never')",
            r"\b(always|never|from now on|henceforth|every time|each time|"
            r"in (all|every|each) (of your )?(answers?|repl(y|ies)|responses?)|"
            r"for (all|every|each) (questions?|answers?|users?))\b",
        ),
        (
            "switches language or encoding",
            rf"\b(answer|respond|reply|write|speak|talk|translate|output)\w*\b.{{0,20}}"
            rf"\b(in|into|using)\s+({_LANGUAGES})\b",
        ),
        (
            "role play or refusal",
            r"\b(pretend|roleplay|role-play|refuse|do not answer|don't answer|stop answering|"
            r"say that|tell (them|users|everyone))\b",
        ),
    ]
]


def injection_findings(text: str) -> list[str]:
    return [name for name, pattern in INJECTION_PATTERNS if pattern.search(text or "")]


def instruction_findings(text: str, clarification: bool = True) -> list[str]:
    """Why `text` is not plain data: injection findings, plus instruction findings for clarifications."""
    found = injection_findings(text)
    if clarification:
        found += [name for name, pattern in INSTRUCTION_PATTERNS if pattern.search(text or "")]
    return found


def normalize(text: str) -> str:
    """Case, accents, punctuation and spacing removed: what makes two texts 'the same'."""
    text = unicodedata.normalize("NFKD", text or "")
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    return " ".join(re.findall(r"\w+", text))


def shingles(text: str, n: int = 5) -> set[str]:
    norm = normalize(text)
    if len(norm) <= n:
        return {norm} if norm else set()
    return {norm[i : i + n] for i in range(len(norm) - n + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


class MinHashLSH:
    """Near-duplicate candidates in about linear time: MinHash signatures, banded into buckets.

    With 16 bands of 4 rows, two texts with Jaccard 0.8 share a bucket with probability
    0.9998 (0.5: 0.64); candidates are confirmed with the exact Jaccard, so LSH only saves time.
    """

    _PRIME = (1 << 61) - 1

    def __init__(self, bands: int = 16, rows: int = 4, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.bands, self.rows = bands, rows
        self._a = rng.integers(1, 1 << 29, size=bands * rows, dtype=np.uint64)
        self._b = rng.integers(0, 1 << 29, size=bands * rows, dtype=np.uint64)
        self._buckets: dict[tuple, list[int]] = {}

    def signature(self, items: set[str]) -> np.ndarray:
        hashes = np.fromiter((zlib.crc32(s.encode("utf-8")) for s in items), dtype=np.uint64, count=len(items))
        if not len(hashes):
            hashes = np.zeros(1, dtype=np.uint64)
        return ((hashes[:, None] * self._a + self._b) % np.uint64(self._PRIME)).min(axis=0)

    def query_and_add(self, key: int, items: set[str]) -> set[int]:
        sig = self.signature(items)
        found: set[int] = set()
        for band in range(self.bands):
            bucket = (band, sig[band * self.rows : (band + 1) * self.rows].tobytes())
            members = self._buckets.setdefault(bucket, [])
            found.update(members)
            members.append(key)
        return found


class QuarantineSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    allow_unverified: bool = Field(default=False, description="train on feedback whose author no credential proved")
    max_per_user: int = Field(default=500, ge=1, description="records kept per author per batch (volume cap)")
    max_per_user_per_hour: int = Field(default=100, ge=1, description="submissions per author per hour (rate cap)")
    near_duplicate: float = Field(default=0.8, gt=0, le=1, description="Jaccard of 5-shingles counted as the same text")
    max_copies: int = Field(default=3, ge=1, description="near-identical texts kept across authors (flood)")
    check_text: bool = Field(default=True, description="injection / instruction checks")


@dataclass
class Candidate:
    """One feedback record on its way to training, with what the checks need."""

    id: str
    kind: str  # clarification | critique | reaction | ... (provenance.extra.feedback, else the record's kind)
    author: str | None
    verified: bool
    created: float  # seconds since the epoch
    text: str | None = None
    record: dict[str, Any] = field(default_factory=dict)
    context: str = ""  # the request the feedback is about (duplicates are judged on request + text)


@dataclass
class Held:
    candidate: Candidate
    reason: str
    detail: str

    def row(self) -> dict[str, Any]:
        c = self.candidate
        return {
            "id": c.id,
            "kind": c.kind,
            "author": c.author,
            "verified": c.verified,
            "created": c.created,
            "reason": self.reason,
            "detail": self.detail,
            "text": c.text,
            "record": c.record,
        }


@dataclass
class QuarantineResult:
    kept: list[Candidate]
    quarantined: list[Held]

    def counts(self) -> dict[str, int]:
        out = {"kept": len(self.kept), "quarantined": len(self.quarantined)}
        for reason in REASONS:
            n = sum(h.reason == reason for h in self.quarantined)
            if n:
                out[f"quarantined_{reason}"] = n
        return out


def _timestamp(value: Any) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def user_text(record: dict[str, Any]) -> str | None:
    """What the user wrote in a served feedback record, the text every text check screens.

    A critique or clarification (`verbal`), an edit (`preference`: the user's own version of the
    reply, in `chosen`), a follow-up turn (`followup`); a reaction's `text` when it has one. An edit
    and a follow-up are trained on as they are (sft/dpo learn to write the edit, the follow-up
    likelihood model learns from the follow-up), so they pass the same screen as a critique
    (docs/security.md). An edit's rationale is the critique sent with it, screened as its own
    `verbal` record, and no stage trains on a rationale."""
    kind = record.get("kind")
    if kind == "verbal":
        return record.get("critique")
    if kind == "preference":
        from pipeline.chat import reply_text

        chosen = record.get("chosen")
        return (reply_text(chosen) if chosen is not None else "") or None
    if kind == "followup":
        return record.get("followup")
    return record.get("text")


def candidate_from_record(record: dict[str, Any], created: float | None = None) -> Candidate:
    """A heedful feedback record (VerbalFeedback / Reaction / ... as JSON) as a Candidate.

    The author is `provenance.annotator`; it counts as verified only when the server that took
    the feedback wrote `author_verified: true` into `provenance.extra`.
    """
    prov = record.get("provenance") or {}
    try:
        extra = json.loads(prov.get("extra") or "{}")
    except ValueError:
        extra = {}
    kind = extra.get("feedback") or record.get("kind") or "unknown"
    text = user_text(record)
    context = record.get("scope") or ""
    prompt = record.get("prompt")
    if not context and isinstance(prompt, list):
        context = next((m.get("content", "") for m in reversed(prompt) if isinstance(m, dict) and m.get("role") == "user"), "")
    elif not context and isinstance(prompt, str):
        context = prompt
    return Candidate(
        id=str(record.get("id")),
        kind=str(kind),
        author=prov.get("annotator"),
        verified=extra.get("author_verified") is True,
        created=_timestamp(created if created is not None else prov.get("timestamp")),
        text=text,
        record=record,
        context=str(context),
    )


def quarantine(candidates: Iterable[Candidate], settings: QuarantineSettings | None = None) -> QuarantineResult:
    """Split candidates into kept and held back (with the reason), in the order they were received."""
    s = settings or QuarantineSettings()
    ordered = sorted(candidates, key=lambda c: c.created)
    kept: list[Candidate] = []
    held: list[Held] = []
    recent: dict[str | None, list[float]] = {}
    kept_by_author: dict[str | None, int] = {}
    lsh = MinHashLSH()
    texts: list[tuple[set[str], set[str], str | None, int]] = []  # (text, request shingles, author, cluster) of every text seen
    cluster_size: dict[int, int] = {}

    def hold(c: Candidate, reason: str, detail: str) -> None:
        held.append(Held(c, reason, detail))

    for c in ordered:
        window = [t for t in recent.get(c.author, []) if c.created - t < 3600] + [c.created]
        recent[c.author] = window
        if not c.verified and not s.allow_unverified:
            hold(c, "unverified_author", f"author {c.author!r} was not authenticated by a credential")
            continue
        if len(window) > s.max_per_user_per_hour:
            hold(c, "rate_cap", f"{len(window)} submissions by {c.author!r} within an hour (cap {s.max_per_user_per_hour})")
            continue
        if c.text is not None and s.check_text:
            found = injection_findings(c.text)
            if found:
                hold(c, "injection", "; ".join(found))
                continue
            if c.kind == "clarification":
                found = instruction_findings(c.text, clarification=True)
                if found:
                    hold(c, "instruction", "; ".join(found))
                    continue
        if c.text is not None:
            items, request = shingles(c.text), shingles(c.context)
            matches = [
                texts[j]
                for j in lsh.query_and_add(len(texts), items)
                if jaccard(items, texts[j][0]) >= s.near_duplicate and jaccard(request, texts[j][1]) >= s.near_duplicate
            ]
            cluster = min((m[3] for m in matches), default=len(texts))
            texts.append((items, request, c.author, cluster))
            if any(m[2] == c.author for m in matches):
                hold(c, "duplicate", f"{c.author!r} sent the same or nearly the same text before")
                continue
            cluster_size[cluster] = cluster_size.get(cluster, 0) + 1
            if cluster_size[cluster] > s.max_copies:
                hold(c, "flood", f"{cluster_size[cluster]} near-identical texts from several authors (cap {s.max_copies})")
                continue
        if kept_by_author.get(c.author, 0) >= s.max_per_user:
            hold(c, "volume_cap", f"{c.author!r} already has {s.max_per_user} records in this batch")
            continue
        kept_by_author[c.author] = kept_by_author.get(c.author, 0) + 1
        kept.append(c)
    return QuarantineResult(kept, held)
